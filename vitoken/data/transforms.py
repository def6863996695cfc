"""Per-example and per-batch preprocessing as grain transforms (built from `Settings`).

Training:   TrainExample (decode, random-resized-crop or resize, flip; uint8)
            -> batch -> TrainBatch (normalize, one-hot, random erasing, mixup/cutmix).
Evaluation: EvalExample (decode, resize or resize + centre crop; padding = zero image,
            mask False) -> batch -> EvalBatch (normalize, one-hot with all-zero rows for
            padding).
Then, for every task: DropLabels (label-free tasks) and TaskFields (a task's `batch_fields`).

Both kinds of batch carry "labels" as float32 [B, num_classes]: one-hot (mixed in training),
and in evaluation an all-zero row where batch["mask"] is False.

The random ones are `grain.transforms.RandomMap`s: grain seeds their generator from the
transform's seed and the element index, so every draw is reproducible. All are module-level
classes, so they pickle for grain worker processes.
"""
from __future__ import annotations

from typing import Callable, Dict

import grain
import numpy as np

from vitoken.data import ops, randaugment
from vitoken.data.config import Settings

# A task's extra batch fields: (batch of numpy arrays, generator) -> batch. Must be picklable
# (a module-level class or function) for worker_count > 0.
BatchFields = Callable[[Dict[str, np.ndarray], np.random.Generator], Dict[str, np.ndarray]]


class TrainExample(grain.transforms.RandomMap):
  """Decode, random-resized-crop (or resize), flip and RandAugment one example; stays uint8."""

  def __init__(self, settings: Settings, channels: int):
    self._settings = settings
    self._channels = channels
    self._randaugment = settings.randaugment_spec()

  def random_map(self, example, rng: np.random.Generator):
    s = self._settings
    image = ops.decode(example["image"], self._channels)
    if s.random_resized_crop:
      image = ops.random_resized_crop(image, s.image_size, rng, s.crop_scale, s.crop_ratio,
                                      s.interpolation)
    else:
      image = ops.resize(image, s.image_size, s.interpolation)
    if s.flip:
      image = ops.random_flip(image, rng)
    if self._randaugment is not None:  # after crop and flip, as timm's training transform
      image = randaugment.apply(image, self._randaugment, rng)
    return {"image": image, "label": np.int32(example["label"])}


class TrainBatch(grain.transforms.RandomMap):
  """Normalize, one-hot, random-erase (per image) and mixup/cutmix a batch (one lambda per
  batch, as timm).

  Erasing comes before mixing, as in DeiT (timm's transform erases each image, the Mixup then
  mixes the batch); it draws nothing when off, so the mixing draws stay as they were.
  """

  def __init__(self, settings: Settings, num_classes: int):
    self._settings = settings
    self._num_classes = num_classes

  def random_map(self, batch, rng: np.random.Generator):
    s = self._settings
    images = ops.normalize(batch["image"], s.mean, s.std)
    labels = ops.one_hot(batch["label"], self._num_classes)
    if s.random_erasing > 0:
      images = ops.random_erasing(images, rng, s.random_erasing, s.random_erasing_mode,
                                  s.random_erasing_count)
    images, labels = ops.mix_batch(images, labels, rng, mixup_alpha=s.mixup_alpha,
                                   cutmix_alpha=s.cutmix_alpha, mix_prob=s.mix_prob)
    return {"image": images, "labels": labels}


class EvalExample(grain.transforms.Map):
  """Decode and resize (crop_pct None) or resize and centre-crop (timm's eval transform) one
  example of a `PaddedSource`; padding becomes a zero image with label 0 and mask False
  (EvalBatch zeroes its one-hot row)."""

  def __init__(self, settings: Settings, channels: int):
    self._size = settings.image_size
    self._crop_pct = settings.crop_pct
    self._interpolation = settings.interpolation
    self._channels = channels

  def map(self, element):
    example, _ = element
    if example is None:
      return {"image": np.zeros((self._size, self._size, self._channels), np.uint8),
              "label": np.int32(0), "mask": np.bool_(False)}
    image = ops.decode(example["image"], self._channels)
    if self._crop_pct is None:
      image = ops.resize(image, self._size, self._interpolation)
    else:
      image = ops.resize_center_crop(image, self._size, self._crop_pct, self._interpolation)
    return {"image": image, "label": np.int32(example["label"]), "mask": np.bool_(True)}


class EvalBatch(grain.transforms.Map):
  """Normalize a batch and one-hot its labels, as in training; padding rows (mask False) get
  all-zero label rows, so they count for no class."""

  def __init__(self, settings: Settings, num_classes: int):
    self._mean, self._std = settings.mean, settings.std
    self._num_classes = num_classes

  def map(self, batch):
    mask = batch["mask"].astype(bool)
    labels = ops.one_hot(batch["label"], self._num_classes) * mask[:, None].astype(np.float32)
    return {"image": ops.normalize(batch["image"], self._mean, self._std),
            "labels": labels, "mask": mask}


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
