"""The data config: every key with its default, and its validation.

    config.data = default_data_config()     # an ml_collections.ConfigDict, one entry per key
    settings = Settings.parse(config.data)  # a frozen, validated copy (unknown keys raise)

Sources (`vitoken.data.sources`), transforms (`vitoken.data.transforms`) and the iterators
(`vitoken.data.pipeline`) read `Settings`, never the raw config.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Dict, Optional, Tuple

import ml_collections
from ml_collections import config_dict
import numpy as np

from vitoken import settings as settings_lib
from vitoken.data import cluttered_digits, ops, randaugment
from vitoken.errors import ConfigError

# Defaults of every data config key; a key not listed here is a typo and is rejected.
DEFAULTS: Dict[str, Any] = {
    "name": cluttered_digits.NAME,  # cluttered_digits[/config] or any TFDS name
    "folder": None,  # root/<split>/<class_name>/*.png|jpg|jpeg; when set, `name` is unused
    "data_dir": None,  # TFDS data dir; None = $TFDS_DATA_DIR or ~/tensorflow_datasets
    "train_split": "train",
    "eval_split": "test",  # evaluated as split "eval" (and "eval_ema")
    # More splits evaluated at every evaluation, {name: split}: logged as "eval/<name>" (and
    # "eval_ema/<name>"), e.g. {"minival": "train[99%:]"}; a split is TFDS's split syntax
    # (slices too) or, with `folder`, a subfolder. `eval_examples` caps each.
    "eval_splits": {},
    "image_size": 64,  # output height = width
    "random_resized_crop": False,  # train only; otherwise train images are resized
    "crop_scale": (0.08, 1.0),
    "crop_ratio": (3 / 4, 4 / 3),
    "flip": False,  # random horizontal flip (train); off by default: digits are not symmetric
    # timm's RandAugment string (train, after crop and flip), e.g. DeiT's "rand-m9-mstd0.5-inc1";
    # "" is off (vitoken.data.randaugment)
    "randaugment": "",
    # Eval: None squashes the image to image_size (the digits); a fraction is timm's eval
    # crop: shorter side to floor(image_size / crop_pct), then the central image_size.
    "crop_pct": None,
    "interpolation": "bilinear",  # or "bicubic" (PIL); every resize, train and eval
    "mean": (0.5,),  # per channel, on images scaled to [0, 1]; one value broadcasts
    "std": (0.5,),
    "mixup_alpha": 0.0,
    "cutmix_alpha": 0.0,
    "mix_prob": 1.0,  # probability that a batch is mixed at all (when an alpha is > 0)
    # timm's RandomErasing (train, per image, after normalisation, before mixup/cutmix):
    # the probability (DeiT: 0.25), the fill (ops.ERASING_MODES) and the most boxes per image.
    "random_erasing": 0.0,
    "random_erasing_mode": "pixel",
    "random_erasing_count": 1,
    "worker_count": 0,  # grain worker processes; 0 = this process (threads only)
    "build": True,  # build cluttered_digits / offline-buildable TFDS datasets when missing
    "shuffle": True,
    # DeiT's repeated augmentation: each image of an epoch's shuffled order is shown this many
    # times in a row, the copies spread over the processes and augmented apart; an epoch keeps
    # its length, so it shows 1/n of the images. 1 is off; DeiT uses 3.
    "repeated_augmentation": 1,
    # The dataset's integer features used as labels, each one-hot with its own classes and
    # concatenated in this order in batch["labels"]; classification puts one head on each
    # (e.g. ("label", "direction") for moving_digits) and reports accuracy/<key>.
    "label_keys": ("label",),
    # Clips: keep `frames` frames from `first_frame` on (frames=1, first_frame=4: one middle
    # frame); frames None keeps all from first_frame.
    "frames": None,
    "first_frame": 0,
    "train_examples": None,  # cap on the train split (smoke tests); None = all of it
    "eval_examples": None,  # cap on the eval split (smoke tests); None = all of it
}

_SPLIT_NAME_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$")

# Keys whose default is None but whose value has a type, so `--config.data.<key>=...` can
# override them on the command line.
_TYPED_NONE = {"folder": str, "data_dir": str, "train_examples": int, "eval_examples": int,
               "crop_pct": float, "frames": int}


def default_data_config() -> ml_collections.ConfigDict:
  """Every data config key with its default (see `DEFAULTS` for what each means)."""
  return ml_collections.ConfigDict({
      k: (config_dict.placeholder(_TYPED_NONE[k]) if v is None and k in _TYPED_NONE else v)
      for k, v in DEFAULTS.items()})


@dataclasses.dataclass(frozen=True)
class Settings:
  """A validated data config (the keys of `DEFAULTS`)."""
  name: str
  folder: Optional[str]
  data_dir: Optional[str]
  train_split: str
  eval_split: str
  eval_splits: Tuple[Tuple[str, str], ...]  # (name, split) pairs, in the config's order
  image_size: int
  random_resized_crop: bool
  crop_scale: Tuple[float, float]
  crop_ratio: Tuple[float, float]
  flip: bool
  randaugment: str
  crop_pct: Optional[float]
  interpolation: str
  mean: Tuple[float, ...]
  std: Tuple[float, ...]
  mixup_alpha: float
  cutmix_alpha: float
  mix_prob: float
  random_erasing: float
  random_erasing_mode: str
  random_erasing_count: int
  worker_count: int
  build: bool
  shuffle: bool
  repeated_augmentation: int
  label_keys: Tuple[str, ...]
  frames: Optional[int]
  first_frame: int
  train_examples: Optional[int]
  eval_examples: Optional[int]

  def randaugment_spec(self) -> Optional[randaugment.Spec]:
    """The parsed `randaugment` string (None when off); fills with the dataset's mean."""
    if not self.randaugment:
      return None
    return randaugment.parse(self.randaugment, image_mean=self.mean,
                             interpolation=self.interpolation)

  @classmethod
  def parse(cls, data_config) -> "Settings":
    """`data_config` (None, a ConfigDict or a mapping) over `DEFAULTS`, validated."""
    values = settings_lib.resolve(data_config, DEFAULTS, "data config")
    for key in ("crop_scale", "crop_ratio", "mean", "std"):
      values[key] = _float_tuple(key, values[key])
    for key in ("folder", "data_dir"):
      if values[key] is not None:
        values[key] = os.fspath(values[key])
    for key in ("random_erasing_count", "repeated_augmentation"):
      if settings_lib.is_count(values[key]):
        values[key] = int(values[key])
    values["eval_splits"] = _named_splits(values["eval_splits"])
    values["label_keys"] = _label_keys(values["label_keys"])
    settings = cls(**values)
    settings.validate()
    return settings

  def validate(self) -> None:
    _check(isinstance(self.image_size, (int, np.integer)) and self.image_size > 0,
           f"image_size must be a positive int, got {self.image_size!r}")
    _check(len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
           f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {self.crop_scale}")
    _check(len(self.crop_ratio) == 2 and 0 < self.crop_ratio[0] <= self.crop_ratio[1],
           f"crop_ratio must be (low, high) with 0 < low <= high, got {self.crop_ratio}")
    _check(all(s > 0 for s in self.std), f"std must be positive, got {self.std}")
    _check(isinstance(self.randaugment, str),
           f"randaugment must be a timm RandAugment string like 'rand-m9-mstd0.5-inc1' or '' "
           f"(off), got {self.randaugment!r}")
    if self.randaugment:
      self.randaugment_spec()  # a bad string is a ConfigError naming the bad part
    _check(self.mixup_alpha >= 0 and self.cutmix_alpha >= 0,
           f"mixup_alpha and data.cutmix_alpha must be >= 0, got {self.mixup_alpha}, "
           f"{self.cutmix_alpha}")
    _check(0 <= self.mix_prob <= 1, f"mix_prob must lie in [0, 1], got {self.mix_prob}")
    _check(self.crop_pct is None or (_is_number(self.crop_pct) and 0 < self.crop_pct <= 1),
           f"crop_pct must be None (squash to image_size) or a fraction in (0, 1], got "
           f"{self.crop_pct!r}")
    _check(isinstance(self.interpolation, str) and self.interpolation in ops.INTERPOLATIONS,
           f"interpolation must be one of {sorted(ops.INTERPOLATIONS)}, got {self.interpolation!r}")
    _check(_is_number(self.random_erasing) and 0 <= self.random_erasing <= 1,
           f"random_erasing must be a probability in [0, 1], got {self.random_erasing!r}")
    _check(self.random_erasing_mode in ops.ERASING_MODES,
           f"random_erasing_mode must be one of {list(ops.ERASING_MODES)}, got "
           f"{self.random_erasing_mode!r}")
    _check(settings_lib.is_count(self.random_erasing_count),
           f"random_erasing_count must be an int >= 1, got {self.random_erasing_count!r}")
    _check(settings_lib.is_count(self.repeated_augmentation),
           f"repeated_augmentation must be an int >= 1 (1 is off, DeiT uses 3), got "
           f"{self.repeated_augmentation!r}")
    mirrored = [k for k in self.label_keys if k in MIRRORED_LABELS]
    _check(not (self.flip and mirrored),
           f"flip=True mirrors left and right, which changes the {mirrored} label(s) of "
           f"label_keys={self.label_keys} (a clip moving east would be labelled east but move "
           f"west); set data.flip=False")
    _check(isinstance(self.worker_count, (int, np.integer)) and self.worker_count >= 0,
           f"worker_count must be an int >= 0, got {self.worker_count!r}")
    _check(isinstance(self.first_frame, (int, np.integer)) and self.first_frame >= 0,
           f"first_frame must be an int >= 0, got {self.first_frame!r}")
    for key in ("train_examples", "eval_examples", "frames"):
      value = getattr(self, key)
      _check(value is None or (isinstance(value, (int, np.integer)) and value > 0),
             f"{key} must be None or a positive int, got {value!r}")


# Labels a horizontal flip changes, so `flip` is refused with them.
MIRRORED_LABELS = ("direction",)


def _label_keys(value) -> Tuple[str, ...]:
  if isinstance(value, str):
    value = (value,)
  keys = tuple(value) if isinstance(value, (tuple, list)) else None
  if not keys or not all(isinstance(k, str) and k for k in keys) or len(set(keys)) != len(keys):
    raise ConfigError(f"data.label_keys must be a non-empty tuple of distinct feature names, "
                      f"e.g. ('label',) or ('label', 'direction'), got {value!r}")
  return keys


def _named_splits(value) -> Tuple[Tuple[str, str], ...]:
  if not isinstance(value, dict):
    raise ConfigError(f"data.eval_splits must be a dict {{name: split}}, e.g. "
                      f"{{'minival': 'train[99%:]'}}, got {value!r}")
  for name, split in value.items():
    # The name becomes a metrics split and a TensorBoard folder: one path component.
    if not (isinstance(name, str) and _SPLIT_NAME_RE.match(name)):
      raise ConfigError(f"data.eval_splits name {name!r} must be letters, digits, '_', '-' or "
                        f"'.' (it is logged as split 'eval/<name>')")
    if not (isinstance(split, str) and split):
      raise ConfigError(f"data.eval_splits[{name!r}] must be a split name like 'validation' or "
                        f"'train[99%:]', got {split!r}")
  return tuple(value.items())


def _float_tuple(key: str, value) -> Tuple[float, ...]:
  if isinstance(value, (int, float)):
    value = (value,)
  try:
    return tuple(float(v) for v in value)
  except (TypeError, ValueError):
    raise ConfigError(f"data.{key} must be a sequence of numbers, got {value!r}") from None


def _is_number(value) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(f"data.{message}")
