"""Where examples come from: TFDS datasets read as array_record (cluttered_digits is built on
first use), or an image folder; and what the configured data is (`dataset_info`).

    info = dataset_info(config.data)     # DataInfo: classes, image shape, (capped) split sizes
    split = open_split(settings, settings.train_split, settings.train_examples)
    split.source[i]                      # {"image": encoded bytes or uint8 array, "label": int}

Every source is random access (`len`, `source[i]`), which grain's `MapDataset` needs; the
transforms (`vitoken.data.transforms`) decode and preprocess what it returns.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

from etils import epath
import grain
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

# digit_scenes and moving_digits are imported to register their TFDS builders.
from vitoken.data import cluttered_digits, digit_scenes, moving_digits, ops  # noqa: F401
from vitoken.data.config import Settings
from vitoken.errors import DataError, MissingPathError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


@dataclasses.dataclass(frozen=True)
class DataInfo:
  num_classes: int  # all label keys together: the width of batch["labels"]
  # (H, W, C) of the images the pipeline yields (after resize/crop); (T, H, W, C) for clips
  image_shape: tuple
  train_examples: int
  eval_examples: int
  # (key, classes) per label key, in batch["labels"]'s order; empty = the default, one key
  # "label" with num_classes
  label_classes: Tuple[Tuple[str, int], ...] = ()

  @property
  def image_size(self) -> Tuple[int, int]:
    """(H, W) of an image or of a clip's frames."""
    return tuple(self.image_shape[-3:-1])

  @property
  def frames(self) -> Optional[int]:
    """Frames per clip; None for images."""
    return self.image_shape[0] if len(self.image_shape) == 4 else None

  def label_splits(self) -> Tuple[Tuple[str, int], ...]:
    """(key, classes) of each label key (("label", num_classes) when not given)."""
    return self.label_classes or (("label", self.num_classes),)


def dataset_info(data_config) -> DataInfo:
  """Number of classes, output image shape and (capped) split sizes of the configured data."""
  settings = Settings.parse(data_config)
  train = open_split(settings, settings.train_split, settings.train_examples)
  evaluation = open_split(settings, settings.eval_split, settings.eval_examples)
  for _, split in settings.eval_splits:
    open_split(settings, split, settings.eval_examples)  # a missing split fails now, not at eval
  image_shape = (settings.image_size, settings.image_size, train.channels)
  return DataInfo(num_classes=train.num_classes,
                  image_shape=image_shape if train.frames is None else (train.frames, *image_shape),
                  train_examples=len(train.source), eval_examples=len(evaluation.source),
                  # One key named "label" is the default: left implicit, as before label_keys.
                  label_classes=(() if settings.label_keys == ("label",)
                                 else train.label_classes))


@dataclasses.dataclass(frozen=True)
class Split:
  source: Any  # random access: len(source), source[i] -> {"image": ..., "label": int, ...};
  # a grain MapDataset once `open_split` returns it
  label_classes: Tuple[Tuple[str, int], ...]  # (key, classes) per label key
  channels: int
  frames: Optional[int] = None  # clips: frames per clip (the image is [T, H, W, C])
  # (key, shape, dtype) of the features the batches carry as they are (digit_scenes' question,
  # answer, qtype, cells): the builder's EXTRA_FEATURES
  extra_fields: Tuple[Tuple[str, tuple, Any], ...] = ()

  @property
  def num_classes(self) -> int:
    return sum(n for _, n in self.label_classes)

  @property
  def class_counts(self) -> Tuple[int, ...]:
    return tuple(n for _, n in self.label_classes)


class PaddedSource:
  """A source padded to `length` with None; element i is (example or None, index)."""

  def __init__(self, source, length: int):
    self._source = source
    self._length = length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int):
    return (self._source[index] if index < len(self._source) else None), index


def open_split(settings: Settings, split: str, cap: Optional[int]) -> Split:
  """The split as a grain MapDataset (its first `cap` examples when cap is set), checked
  against the settings' mean/std."""
  if settings.folder is not None:
    opened = _open_folder(settings.folder, split, settings)
  else:
    opened = _open_tfds(settings, split)
  if len(opened.source) == 0:
    raise DataError(f"split {split!r} of {settings.folder or settings.name!r} is empty")
  for key in ("mean", "std"):
    if len(getattr(settings, key)) not in (1, opened.channels):
      raise DataError(f"{key} has {len(getattr(settings, key))} values but the images have "
                      f"{opened.channels} channel(s); give 1 (broadcast) or {opened.channels}")
  dataset = grain.MapDataset.source(opened.source)
  if cap is not None:
    dataset = dataset[:cap]  # the first `cap` examples (all of them when there are fewer)
  return dataclasses.replace(opened, source=dataset)


# ----------------------------------------------------------------------------- TFDS


def _open_tfds(settings: Settings, split: str) -> Split:
  builder = _prepared_builder(settings)
  try:
    source = builder.as_data_source(split=split)
  except ValueError as e:
    raise DataError(f"dataset {settings.name!r} has no split {split!r}: {e}") from None
  features = builder.info.features
  for key in ("image", *settings.label_keys):
    if key not in features:
      raise DataError(f"dataset {settings.name!r} has no {key!r} feature (features: "
                      f"{sorted(features.keys())}); the pipeline reads 'image' and the "
                      f"label_keys {settings.label_keys}")
  for key in settings.label_keys:
    if getattr(features[key], "num_classes", None) is None:
      raise DataError(f"dataset {settings.name!r}'s feature {key!r} is not a class label "
                      f"(label_keys {settings.label_keys}); pick ClassLabel features")
  shape = features["image"].shape
  channels = shape[-1] or 3
  if channels not in (1, 3):
    raise DataError(f"dataset {settings.name!r} has {channels}-channel images; "
                    f"the pipeline takes 1 or 3")
  frames = shape[0] if len(shape) == 4 else None
  if frames is not None:
    _check_clip_settings(settings)
  if settings.frames is not None or settings.first_frame:
    wanted = (settings.frames or 1) + settings.first_frame
    if frames is None or wanted > frames:
      raise DataError(
          f"data.frames={settings.frames}, data.first_frame={settings.first_frame}: dataset "
          f"{settings.name!r} holds "
          + ("images, not clips; set data.frames=None and data.first_frame=0" if frames is None
             else f"clips of {frames} frames, frames {settings.first_frame} to {wanted - 1} "
                  "are not all there"))
    frames = (settings.frames if settings.frames is not None
              else frames - settings.first_frame)
  if getattr(builder, "LAYOUT_BOUND_LABELS", False):
    _check_layout_settings(settings)
  extra_fields = tuple((k, tuple(features[k].shape), np.dtype(features[k].np_dtype))
                       for k in getattr(builder, "EXTRA_FEATURES", ()))
  return Split(source=source, channels=channels, frames=frames, extra_fields=extra_fields,
               label_classes=tuple((k, features[k].num_classes) for k in settings.label_keys))


# Settings that move, mirror, cut, erase or mix pixels, with the value that turns each off.
_LAYOUT_CHANGING = {"flip": False, "random_resized_crop": False, "randaugment": "",
                    "random_erasing": 0, "mixup_alpha": 0, "cutmix_alpha": 0, "crop_pct": None}


def _check_layout_settings(settings: Settings) -> None:
  """Datasets whose answers depend on where things are (digit_scenes: which cell, how many)
  refuse the augmentations that would make them wrong, rather than train on wrong answers."""
  on = [k for k, off in _LAYOUT_CHANGING.items()
        if getattr(settings, k) != off and not (k == "crop_pct" and settings.crop_pct == 1)]
  if on:
    raise DataError(f"dataset {settings.name!r} asks about the layout of its images (which "
                    f"cell, how many, left or right), which {', '.join(on)} would change; set "
                    + ", ".join(f"data.{k}={_LAYOUT_CHANGING[k]!r}" for k in on))


def _check_clip_settings(settings: Settings) -> None:
  """Augmentations the clip pipeline does not implement are refused, never applied per frame."""
  if settings.randaugment:
    raise DataError(f"data.randaugment={settings.randaugment!r}: RandAugment is for images; "
                    f"dataset {settings.name!r} holds clips. Set data.randaugment=''")


def _prepared_builder(settings: Settings):
  """The TFDS builder of `settings.name`, built first if missing and allowed."""
  name, data_dir = settings.name, settings.data_dir
  where = data_dir or "the default TFDS data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
  make_builder = lambda directory=data_dir: tfds.builder(name, data_dir=directory,
                                                        file_format="array_record")
  try:
    builder = make_builder()
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(f"unknown dataset name {name!r}: neither {cluttered_digits.NAME!r} nor a "
                    f"registered TFDS dataset (set `folder` to read an image folder)") from None
  if builder.is_prepared():
    _check_random_access(builder, name)
    return builder
  if not settings.build:
    raise MissingPathError(f"dataset {name!r} is not in data_dir {where} (looked for "
                           f"{builder.data_dir}); set build=True or point data_dir at it")
  try:
    return cluttered_digits.prepare_once(make_builder)
  except Exception as e:  # pylint: disable=broad-except
    raise _build_error(builder, name, where, e) from e


def _check_random_access(builder, name: str) -> None:
  file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
  if file_format not in ("array_record", "parquet"):
    raise DataError(f"dataset {name!r} in {builder.data_dir} is stored as {file_format}, which "
                    f"grain cannot index; rebuild it with file_format='array_record' "
                    f"(download_and_prepare) or use another data_dir")


def _build_error(builder, name: str, where: str, error: Exception) -> Exception:
  """Why TFDS's build failed first, then how to get the dataset prepared."""
  raised = f"{type(error).__name__}: {error}"
  # prepare_once builds with download_dir=<data_dir>/downloads, whose manual/ TFDS reads.
  manual_dir = epath.Path(builder.data_dir_root) / "downloads" / "manual"
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS and not (manual_dir.is_dir()
                                                   and any(manual_dir.iterdir())):
    # Whatever the build stopped at, it cannot succeed without these files.
    return MissingPathError(
        f"dataset {name!r} is not in data_dir {where} and needs a manual download: put its "
        f"files in {manual_dir} to build it here, or build it elsewhere and point data_dir at "
        f"it (README, Data). TFDS says: {builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()} "
        f"The build attempt raised {raised}")

  def elsewhere(machine):
    return (f"run `tfds build {name} --data_dir=<dir> --file_format=array_record` once {machine}, "
            f"copy <dir>/{name} to this machine or a bucket and point data_dir at <dir> "
            f"(README, Data)")

  module = (getattr(error, "name", None) or "").split(".")[0]
  if isinstance(error, ModuleNotFoundError) and module == "tensorflow":
    # TFDS builds imagenet2012 (and many others) through tf.io but reads the built
    # array_record files without it: TensorFlow is needed once, where the dataset is built.
    return DataError(
        f"TensorFlow is not installed, and TFDS needs it to build dataset {name!r} into "
        f"data_dir {where} ({raised}). Training reads the built dataset without TensorFlow: "
        f"pip install tensorflow for the build, or {elsewhere('on any machine with TensorFlow')}; "
        f"or read the images as an image folder tree (data.folder)")
  if isinstance(error, ModuleNotFoundError) and module:
    return DataError(f"{module!r} is not installed, and TFDS needs it to build dataset {name!r} "
                     f"into data_dir {where} ({raised}). Install it, or "
                     f"{elsewhere('where the build works')}")
  return DataError(f"{raised} (building dataset {name!r} into data_dir {where}). Fix that, or "
                   f"{elsewhere('where the build works')}")


# ----------------------------------------------------------------------------- image folders


class ImageFolderSource:
  """Random access to root/<split>/<class_name>/*.{png,jpg,jpeg}.

  Labels index the sorted class names; images decode to `channels` channels.
  """

  def __init__(self, paths: Sequence[str], labels: Sequence[int], channels: int):
    self._paths = list(paths)
    self._labels = np.asarray(labels, np.int64)
    self._channels = channels

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    data = epath.Path(self._paths[index]).read_bytes()
    return {"image": ops.decode(data, self._channels), "label": self._labels[index]}


def _open_folder(root: str, split: str, settings: Settings) -> Split:
  splits = (settings.train_split, settings.eval_split, *(s for _, s in settings.eval_splits))
  if settings.frames is not None or settings.first_frame:
    raise DataError(f"data.frames={settings.frames}, data.first_frame={settings.first_frame}: an "
                    "image folder holds images, not clips; set data.frames=None and "
                    "data.first_frame=0")
  if settings.label_keys != ("label",):
    raise DataError(f"data.label_keys={settings.label_keys}: an image folder has one label (its "
                    f"class folders); set data.label_keys=('label',)")
  classes = folder_classes(root, splits)
  paths, labels = folder_files(root, split, classes)
  channels = _folder_channels(root, splits, classes)
  return Split(source=ImageFolderSource(paths, labels, channels), channels=channels,
               label_classes=(("label", len(classes)),))


def folder_classes(root: str, splits: Sequence[str]) -> List[str]:
  """Sorted class names: the subfolders of every existing root/<split>."""
  root_path = epath.Path(root)
  if not root_path.is_dir():
    raise MissingPathError(f"image folder {root} does not exist")
  split_dirs = [root_path / split for split in dict.fromkeys(splits) if (root_path / split).is_dir()]
  if not split_dirs:
    raise MissingPathError(f"image folder {root} has none of the split folders {list(splits)} "
                           f"(expected {root}/<split>/<class_name>/*.png)")
  classes = sorted({d.name for split_dir in split_dirs for d in split_dir.iterdir() if d.is_dir()})
  if not classes:
    raise DataError(f"image folder {root} has no classes: no subfolders in "
                    f"{[str(d) for d in split_dirs]} (expected {root}/<split>/<class_name>/*.png)")
  return classes


def folder_files(root: str, split: str, classes: Sequence[str]) -> Tuple[List[str], List[int]]:
  """Sorted image paths of root/<split> and their class indices."""
  split_dir = epath.Path(root) / split
  if not split_dir.is_dir():
    raise MissingPathError(f"image folder {root} has no split folder {split!r} "
                           f"(expected {split_dir}/<class_name>/*.png)")
  paths, labels = [], []
  for label, name in enumerate(classes):
    class_dir = split_dir / name
    if class_dir.is_dir():
      files = sorted(p for p in class_dir.iterdir()
                     if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
      paths.extend(str(p) for p in files)
      labels.extend([label] * len(files))
  if not paths:
    raise DataError(f"image folder split {split_dir} has no {'/'.join(IMAGE_EXTENSIONS)} "
                    f"images in its class folders {list(classes)}")
  return paths, labels


def _folder_channels(root: str, splits: Sequence[str], classes: Sequence[str]) -> int:
  """1 if the folder's first image is grayscale, else 3: one answer for every split."""
  for split in dict.fromkeys(splits):
    if (epath.Path(root) / split).is_dir():
      try:
        first = folder_files(root, split, classes)[0][0]
      except ValueError:
        continue
      with epath.Path(first).open("rb") as f, Image.open(f) as image:
        return ops.channels_of_mode(image.mode)
  return 3
