"""Per-example and per-batch preprocessing as grain transforms (built from `Settings`).

Training:   TrainExample (decode, random-resized-crop or resize, flip; uint8)
            -> batch -> TrainBatch (normalize, one-hot, random erasing, mixup/cutmix).
Evaluation: EvalExample (decode, resize or resize + centre crop; padding = zero image,
            mask False) -> batch -> EvalBatch (normalize, one-hot with all-zero rows for
            padding).
Then, for every task: DropLabels (label-free tasks) and TaskFields (a task's `batch_fields`).

Both kinds of batch carry "labels" as float32 [B, num_classes]: one-hot (mixed in training),
and in evaluation an all-zero row where batch["mask"] is False. With several `label_keys`
the one-hot vectors of the keys sit side by side, in the keys' order. A dataset's extra fields
(`sources.Split.extra_fields`: digit_scenes' question, answer, qtype, cells) ride along
unchanged, as zeros in padding.

Clips ([T, H, W, C], datasets whose image feature has 4 dimensions) go through the same ops:
every random draw (crop box, flip, erased box, cutmix box) is made once per clip and applied
to all of its frames.

The random ones are `grain.transforms.RandomMap`s: grain seeds their generator from the
transform's seed and the element index, so every draw is reproducible. All are module-level
classes, so they pickle for grain worker processes.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import grain
import numpy as np

from vitoken.data import ops, randaugment
from vitoken.data.config import Settings

# (key, shape, dtype) of dataset features carried into the batches as they are (sources.Split).
ExtraFields = Tuple[Tuple[str, tuple, Any], ...]

# A task's extra batch fields: (batch of numpy arrays, generator) -> batch. Must be picklable
# (a module-level class or function) for worker_count > 0.
BatchFields = Callable[[Dict[str, np.ndarray], np.random.Generator], Dict[str, np.ndarray]]


class TrainExample(grain.transforms.RandomMap):
  """Decode, random-resized-crop (or resize), flip and RandAugment one example; stays uint8."""

  def __init__(self, settings: Settings, channels: int, frames: Optional[int] = None,
               extra_fields: ExtraFields = ()):
    self._settings = settings
    self._channels = channels
    self._frames = None if frames is None else (settings.first_frame, frames)
    self._randaugment = settings.randaugment_spec()
    self._extra_fields = tuple(extra_fields)

  def random_map(self, example, rng: np.random.Generator):
    s = self._settings
    image = _decode(example["image"], self._channels, self._frames)
    if s.random_resized_crop:
      image = ops.random_resized_crop(image, s.image_size, rng, s.crop_scale, s.crop_ratio,
                                      s.interpolation)
    else:
      image = ops.resize(image, s.image_size, s.interpolation)
    if s.flip:
      image = ops.random_flip(image, rng)
    if self._randaugment is not None:  # after crop and flip, as timm's training transform
      image = randaugment.apply(image, self._randaugment, rng)
    return {"image": image, "label": _labels(example, s.label_keys),
            **_extras(example, self._extra_fields)}


def _decode(value, channels: int, frames: Optional[Tuple[int, int]]) -> np.ndarray:
  """An image, or `frames` = (first, count) frames of a clip (None: an image). A clip's frames
  then share every random draw (one crop box, one flip): the ops take the clip whole."""
  if frames is None:
    return ops.decode(value, channels)
  first, count = frames
  return ops.decode_clip(value, channels)[first:first + count]


def _labels(example, keys) -> np.ndarray:
  """int32 [K]: the example's label per key (batched to [B, K])."""
  return np.array([example[k] for k in keys], np.int32)


def _extras(example, fields: ExtraFields) -> Dict[str, np.ndarray]:
  """The extra fields of an example, or zeros of their shapes for padding (example None)."""
  if example is None:
    return {k: np.zeros(shape, dtype) for k, shape, dtype in fields}
  return {k: np.asarray(example[k], dtype).reshape(shape) for k, shape, dtype in fields}


def _passed_on(batch, used) -> Dict[str, np.ndarray]:
  """The batch's extra fields: what the batch transforms pass on untouched."""
  return {k: v for k, v in batch.items() if k not in used}


class TrainBatch(grain.transforms.RandomMap):
  """Normalize, one-hot, random-erase (per image) and mixup/cutmix a batch (one lambda per
  batch, as timm).

  Erasing comes before mixing, as in DeiT (timm's transform erases each image, the Mixup then
  mixes the batch); it draws nothing when off, so the mixing draws stay as they were.
  """

  def __init__(self, settings: Settings, class_counts: Tuple[int, ...]):
    self._settings = settings
    self._class_counts = tuple(class_counts)

  def random_map(self, batch, rng: np.random.Generator):
    s = self._settings
    images = ops.normalize(batch["image"], s.mean, s.std)
    labels = ops.one_hot_keys(batch["label"], self._class_counts)
    if s.random_erasing > 0:
      images = ops.random_erasing(images, rng, s.random_erasing, s.random_erasing_mode,
                                  s.random_erasing_count)
    images, labels = ops.mix_batch(images, labels, rng, mixup_alpha=s.mixup_alpha,
                                   cutmix_alpha=s.cutmix_alpha, mix_prob=s.mix_prob)
    return {"image": images, "labels": labels, **_passed_on(batch, ("image", "label"))}


class EvalExample(grain.transforms.Map):
  """Decode and resize (crop_pct None) or resize and centre-crop (timm's eval transform) one
  example of a `PaddedSource`; padding becomes a zero image with label 0 and mask False
  (EvalBatch zeroes its one-hot row)."""

  def __init__(self, settings: Settings, channels: int, frames: Optional[int] = None,
               extra_fields: ExtraFields = ()):
    self._size = settings.image_size
    self._crop_pct = settings.crop_pct
    self._interpolation = settings.interpolation
    self._channels = channels
    self._frames = None if frames is None else (settings.first_frame, frames)
    self._label_keys = settings.label_keys
    self._extra_fields = tuple(extra_fields)

  def map(self, element):
    example, _ = element
    extras = _extras(example, self._extra_fields)
    if example is None:
      shape = (self._size, self._size, self._channels)
      return {"image": np.zeros(shape if self._frames is None else (self._frames[1], *shape),
                                np.uint8),
              "label": np.zeros(len(self._label_keys), np.int32), "mask": np.bool_(False),
              **extras}
    image = _decode(example["image"], self._channels, self._frames)
    if self._crop_pct is None:
      image = ops.resize(image, self._size, self._interpolation)
    else:
      image = ops.resize_center_crop(image, self._size, self._crop_pct, self._interpolation)
    return {"image": image, "label": _labels(example, self._label_keys), "mask": np.bool_(True),
            **extras}


class EvalBatch(grain.transforms.Map):
  """Normalize a batch and one-hot its labels, as in training; padding rows (mask False) get
  all-zero label rows, so they count for no class."""

  def __init__(self, settings: Settings, class_counts: Tuple[int, ...]):
    self._mean, self._std = settings.mean, settings.std
    self._class_counts = tuple(class_counts)

  def map(self, batch):
    mask = batch["mask"].astype(bool)
    labels = (ops.one_hot_keys(batch["label"], self._class_counts)
              * mask[:, None].astype(np.float32))
    return {"image": ops.normalize(batch["image"], self._mean, self._std),
            "labels": labels, "mask": mask, **_passed_on(batch, ("image", "label", "mask"))}


class DropLabels(grain.transforms.Map):
  """Label-free batches for tasks that learn from images alone."""

  def map(self, batch):
    return {k: v for k, v in batch.items() if k != "labels"}


class TaskFields(grain.transforms.RandomMap):
  """Runs a task's `batch_fields` with grain's per-element generator."""

  def __init__(self, fn: BatchFields):
    self._fn = fn

  def random_map(self, batch, rng: np.random.Generator):
    out = self._fn(dict(batch), rng)
    if not isinstance(out, dict) or "image" not in out:
      raise ValueError(f"a task's batch_fields must return the batch dict (with 'image'), got "
                       f"{type(out).__name__}")
    return out
