"""The input pipeline the trainer calls: grain over TFDS array_record or an image folder.

    info = dataset_info(config.data)                    # classes, image shape, split sizes
    train = train_iterator(config.data, global_batch_size=256, seed=0)
    batch = next(train)   # {"image": f32 [B, H, W, C], "labels": f32 [B, num_classes]}
    state = train.get_state()                         # or grain.checkpoint.CheckpointSave(train)
    for batch in eval_iterator(config.data, global_batch_size=256):
      ...                 # {"image", "labels": int32 [B], "mask": bool [B]}

Both iterators are grain `DatasetIterator`s over index-addressable `MapDataset`s: element i
of the stream is a pure function of (config, seed, process, i). That is what makes
checkpoints exact (the state is a position) and lets per-record randomness come from grain
(`random_map` seeds a generator with the transform's seed and the element index).

Training: each process shuffles and repeats only its own strided shard of the split
(reshuffled every epoch), augments each example (resize or random-resized-crop, flip),
batches `global_batch_size // process_count` examples, then normalizes, one-hot encodes and
applies mixup/cutmix per batch.

Evaluation is exact: the split is padded to a multiple of the global batch; global batch k
holds examples [k * B, (k + 1) * B) spread over the processes, so every example appears once
with mask True, padding has mask False, and every process yields the same number of batches.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import flags
from etils import epath
import grain
import jax
import ml_collections
from ml_collections import config_dict
import numpy as np
import tensorflow_datasets as tfds

from vitoken import settings as settings_lib
from vitoken.data import cluttered_digits
from vitoken.data import ops

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

# Defaults of every data config key; a key not listed here is a typo and is rejected.
_DEFAULTS: Dict[str, Any] = {
    "name": cluttered_digits.NAME,  # cluttered_digits[/config] or any TFDS name
    "folder": None,  # root/<split>/<class_name>/*.png|jpg|jpeg; when set, `name` is unused
    "data_dir": None,  # TFDS data dir; None = $TFDS_DATA_DIR or ~/tensorflow_datasets
    "train_split": "train",
    "eval_split": "test",
    "image_size": 64,  # output height = width
    "random_resized_crop": False,  # train only; otherwise train images are resized
    "crop_scale": (0.08, 1.0),
    "crop_ratio": (3 / 4, 4 / 3),
    "flip": False,  # random horizontal flip (train); off by default: digits are not symmetric
    "mean": (0.5,),  # per channel, on images scaled to [0, 1]; one value broadcasts
    "std": (0.5,),
    "mixup_alpha": 0.0,
    "cutmix_alpha": 0.0,
    "mix_prob": 1.0,  # probability that a batch is mixed at all (when an alpha is > 0)
    "worker_count": 0,  # grain worker processes; 0 = this process (threads only)
    "build": True,  # build cluttered_digits / offline-buildable TFDS datasets when missing
    "shuffle": True,
    "train_examples": None,  # cap on the train split (smoke tests); None = all of it
    "eval_examples": None,  # cap on the eval split (smoke tests); None = all of it
}

# In-process prefetching: threads overlap reading/augmenting with the trainer's device
# work (numpy and PIL release the GIL). Elements are whole batches, so the buffer is small.
_READ_THREADS = 2
_PREFETCH_BATCHES = 4

# Independent random streams derived from the user's seed.
_SHUFFLE_STREAM, _EXAMPLE_STREAM, _BATCH_STREAM, _TASK_STREAM = range(4)

# A task's extra batch fields: (batch of numpy arrays, generator) -> batch. Must be picklable
# (a module-level class or function) for worker_count > 0.
BatchFields = Callable[[Dict[str, np.ndarray], np.random.Generator], Dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class DataInfo:
  num_classes: int
  image_shape: tuple  # (H, W, C) of the images the pipeline yields (after resize/crop)
  train_examples: int
  eval_examples: int


def default_data_config() -> ml_collections.ConfigDict:
  """Every data config key with its default (see `_DEFAULTS` for what each means)."""
  # Typed placeholders, so `--config.data.data_dir=...` can override a None default.
  typed = {"folder": str, "data_dir": str, "train_examples": int, "eval_examples": int}
  return ml_collections.ConfigDict({
      k: (config_dict.placeholder(typed[k]) if v is None and k in typed else v)
      for k, v in _DEFAULTS.items()})


def dataset_info(data_config) -> DataInfo:
  """Number of classes, output image shape and (capped) split sizes of the configured data."""
  settings = _Settings.parse(data_config)
  train = _open_split(settings, settings.train_split, settings.train_examples)
  evaluation = _open_split(settings, settings.eval_split, settings.eval_examples)
  return DataInfo(num_classes=train.num_classes,
                  image_shape=(settings.image_size, settings.image_size, train.channels),
                  train_examples=len(train.source), eval_examples=len(evaluation.source))


def train_iterator(data_config, *, global_batch_size: int, seed: int,
                   process_index: Optional[int] = None, process_count: Optional[int] = None,
                   labels: bool = True, batch_fields: Optional[BatchFields] = None):
  """Infinite, shuffled, augmented batches of this process's shard of the train split.

  Yields {"image": float32 [B, H, W, C], "labels": float32 [B, num_classes]} with
  B = global_batch_size // process_count (no "labels" with labels=False). `batch_fields`
  (a task's `(batch, np.random.Generator) -> batch`) then adds fields such as masks; its
  generator is seeded by the batch's position, so they are reproduced exactly on resume.
  Returns a grain `DatasetIterator`: `get_state()` / `set_state()` (or
  grain.checkpoint.CheckpointSave/Restore) resume it exactly.
  """
  settings = _Settings.parse(data_config)
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch(global_batch_size, process_count)
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}")
  split = _open_split(settings, settings.train_split, settings.train_examples)
  shard = split.source[process_index::process_count]
  if len(shard) == 0:
    raise ValueError(f"train split {settings.train_split!r} has {len(split.source)} examples: "
                     f"too few for {process_count} processes")
  stream_seed = lambda stream: _stream_seed(seed, process_index, stream)
  if settings.shuffle:
    # Shuffle before repeat: grain folds the epoch into the shuffle seed, so each epoch
    # is a fresh permutation and epochs never mix.
    shard = shard.shuffle(seed=stream_seed(_SHUFFLE_STREAM))
  dataset = (shard.repeat(None)
             .random_map(_TrainExample(settings, split.channels), seed=stream_seed(_EXAMPLE_STREAM))
             .batch(local_batch, drop_remainder=True)
             .random_map(_TrainBatch(settings, split.num_classes), seed=stream_seed(_BATCH_STREAM)))
  dataset = _with_task_fields(dataset, labels, batch_fields, stream_seed(_TASK_STREAM))
  return _iterate(dataset, settings.worker_count)


def eval_iterator(data_config, *, global_batch_size: int,
                  process_index: Optional[int] = None, process_count: Optional[int] = None,
                  labels: bool = True, batch_fields: Optional[BatchFields] = None, seed: int = 0):
  """One pass over the eval split, padded to whole global batches, without augmentation.

  Yields {"image": float32 [B, H, W, C], "labels": int32 [B], "mask": bool [B]};
  every process yields ceil(N / global_batch_size) batches. `labels` and `batch_fields` as
  for `train_iterator` (the fields' randomness depends on `seed` and the batch only, so every
  evaluation sees the same fields).
  """
  settings = _Settings.parse(data_config)
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch(global_batch_size, process_count)
  split = _open_split(settings, settings.eval_split, settings.eval_examples)
  num_batches = math.ceil(len(split.source) / global_batch_size)
  padded = _PaddedSource(split.source, num_batches * global_batch_size)
  dataset = (grain.MapDataset.source(padded)[process_index::process_count]
             .map(_EvalExample(settings, split.channels))
             .batch(local_batch, drop_remainder=True)
             .map(_EvalBatch(settings)))
  dataset = _with_task_fields(dataset, labels, batch_fields,
                              _stream_seed(seed, process_index, _TASK_STREAM))
  return _iterate(dataset, settings.worker_count)


def _with_task_fields(dataset, labels: bool, batch_fields, seed: int):
  if not labels:
    dataset = dataset.map(_DropLabels())
  if batch_fields is not None:
    dataset = dataset.random_map(_TaskFields(batch_fields), seed=seed)
  return dataset


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class _Settings:
  """A validated data config (the keys of `_DEFAULTS`)."""
  name: str
  folder: Optional[str]
  data_dir: Optional[str]
  train_split: str
  eval_split: str
  image_size: int
  random_resized_crop: bool
  crop_scale: Tuple[float, float]
  crop_ratio: Tuple[float, float]
  flip: bool
  mean: Tuple[float, ...]
  std: Tuple[float, ...]
  mixup_alpha: float
  cutmix_alpha: float
  mix_prob: float
  worker_count: int
  build: bool
  shuffle: bool
  train_examples: Optional[int]
  eval_examples: Optional[int]

  @classmethod
  def parse(cls, data_config) -> "_Settings":
    values = settings_lib.resolve(data_config, _DEFAULTS, "data config")
    for key in ("crop_scale", "crop_ratio", "mean", "std"):
      values[key] = _float_tuple(key, values[key])
    for key in ("folder", "data_dir"):
      if values[key] is not None:
        values[key] = os.fspath(values[key])
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
    _check(self.mixup_alpha >= 0 and self.cutmix_alpha >= 0,
           f"mixup_alpha and cutmix_alpha must be >= 0, got {self.mixup_alpha}, "
           f"{self.cutmix_alpha}")
    _check(0 <= self.mix_prob <= 1, f"mix_prob must lie in [0, 1], got {self.mix_prob}")
    _check(isinstance(self.worker_count, (int, np.integer)) and self.worker_count >= 0,
           f"worker_count must be an int >= 0, got {self.worker_count!r}")
    for key in ("train_examples", "eval_examples"):
      value = getattr(self, key)
      _check(value is None or (isinstance(value, (int, np.integer)) and value > 0),
             f"{key} must be None or a positive int, got {value!r}")


def _float_tuple(key: str, value) -> Tuple[float, ...]:
  if isinstance(value, (int, float)):
    value = (value,)
  try:
    return tuple(float(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(f"{key} must be a sequence of numbers, got {value!r}") from None


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


def _process(process_index, process_count) -> Tuple[int, int]:
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got {process_index} "
                     f"and {process_count}")
  return int(process_index), int(process_count)


def _local_batch(global_batch_size: int, process_count: int) -> int:
  if not isinstance(global_batch_size, (int, np.integer)) or global_batch_size < 1:
    raise ValueError(f"global_batch_size must be a positive int, got {global_batch_size!r}")
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by the "
                     f"process count {process_count}")
  return global_batch_size // process_count


def _stream_seed(seed: int, process_index: int, stream: int) -> int:
  # Processes get different augmentation draws; grain wants seeds in [0, 2**32).
  return int(np.random.SeedSequence([int(seed), process_index, stream]).generate_state(1)[0])


def _iterate(dataset: grain.MapDataset, worker_count: int):
  read_options = grain.ReadOptions(num_threads=_READ_THREADS,
                                   prefetch_buffer_size=_PREFETCH_BATCHES)
  stream = dataset.to_iter_dataset(read_options)
  if worker_count > 0:
    # grain's worker start-up reads an absl flag; outside absl.app (notebooks, pytest,
    # plain scripts) nothing parsed flags, so mark them parsed: every flag keeps its default.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(stream)


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class _Split:
  source: Any  # random access: len(source), source[i] -> {"image": ..., "label": int, ...};
  # a grain MapDataset once `_open_split` returns it
  num_classes: int
  channels: int


class _PaddedSource:
  """A source padded to `length` with None; element i is (example or None, index)."""

  def __init__(self, source, length: int):
    self._source = source
    self._length = length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int):
    return (self._source[index] if index < len(self._source) else None), index


def _open_split(settings: _Settings, split: str, cap: Optional[int]) -> _Split:
  if settings.folder is not None:
    opened = _open_folder(settings.folder, split, settings)
  else:
    opened = _open_tfds(settings, split)
  if len(opened.source) == 0:
    raise ValueError(f"split {split!r} of {settings.folder or settings.name!r} is empty")
  for key in ("mean", "std"):
    if len(getattr(settings, key)) not in (1, opened.channels):
      raise ValueError(f"{key} has {len(getattr(settings, key))} values but the images have "
                       f"{opened.channels} channel(s); give 1 (broadcast) or {opened.channels}")
  dataset = grain.MapDataset.source(opened.source)
  if cap is not None:
    dataset = dataset[:cap]  # the first `cap` examples (all of them when there are fewer)
  return dataclasses.replace(opened, source=dataset)


def _open_tfds(settings: _Settings, split: str) -> _Split:
  builder = _prepared_builder(settings)
  try:
    source = builder.as_data_source(split=split)
  except ValueError as e:
    raise ValueError(f"dataset {settings.name!r} has no split {split!r}: {e}") from None
  features = builder.info.features
  for key in ("image", "label"):
    if key not in features:
      raise ValueError(f"dataset {settings.name!r} has no {key!r} feature (features: "
                       f"{sorted(features.keys())}); the pipeline reads 'image' and 'label'")
  channels = features["image"].shape[-1] or 3
  if channels not in (1, 3):
    raise ValueError(f"dataset {settings.name!r} has {channels}-channel images; "
                     f"the pipeline takes 1 or 3")
  return _Split(source=source, num_classes=features["label"].num_classes, channels=channels)


def _prepared_builder(settings: _Settings):
  """The TFDS builder of `settings.name`, built first if missing and allowed."""
  name, data_dir = settings.name, settings.data_dir
  where = data_dir or "the default TFDS data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
  make_builder = lambda directory=data_dir: tfds.builder(name, data_dir=directory,
                                                        file_format="array_record")
  try:
    builder = make_builder()
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f"unknown dataset name {name!r}: neither {cluttered_digits.NAME!r} nor a "
                     f"registered TFDS dataset (set `folder` to read an image folder)") from None
  if builder.is_prepared():
    _check_random_access(builder, name)
    return builder
  if not settings.build:
    raise FileNotFoundError(f"dataset {name!r} is not in data_dir {where} (looked for "
                            f"{builder.data_dir}); set build=True or point data_dir at it")
  try:
    return cluttered_digits.prepare_once(make_builder)
  except Exception as e:  # pylint: disable=broad-except
    raise _build_error(builder, name, where, e) from e


def _check_random_access(builder, name: str) -> None:
  file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
  if file_format not in ("array_record", "parquet"):
    raise ValueError(f"dataset {name!r} in {builder.data_dir} is stored as {file_format}, which "
                     f"grain cannot index; rebuild it with file_format='array_record' "
                     f"(download_and_prepare) or use another data_dir")


def _build_error(builder, name: str, where: str, error: Exception) -> Exception:
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    return FileNotFoundError(
        f"dataset {name!r} is not in data_dir {where} and needs a manual download: put its "
        f"files in <data_dir>/downloads/manual and build it with file_format='array_record'. "
        f"TFDS says: {builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()} "
        f"[{type(error).__name__}: {error}]")
  return RuntimeError(f"could not build dataset {name!r} into data_dir {where}: "
                      f"{type(error).__name__}: {error}. Prepare it where the download "
                      f"works, with file_format='array_record', and point data_dir at it")


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


def _open_folder(root: str, split: str, settings: _Settings) -> _Split:
  classes = folder_classes(root, (settings.train_split, settings.eval_split))
  paths, labels = folder_files(root, split, classes)
  channels = _folder_channels(root, (settings.train_split, settings.eval_split), classes)
  return _Split(source=ImageFolderSource(paths, labels, channels), num_classes=len(classes),
                channels=channels)


def folder_classes(root: str, splits: Sequence[str]) -> List[str]:
  """Sorted class names: the subfolders of every existing root/<split>."""
  root_path = epath.Path(root)
  if not root_path.is_dir():
    raise FileNotFoundError(f"image folder {root} does not exist")
  split_dirs = [root_path / split for split in dict.fromkeys(splits) if (root_path / split).is_dir()]
  if not split_dirs:
    raise FileNotFoundError(f"image folder {root} has none of the split folders {list(splits)} "
                            f"(expected {root}/<split>/<class_name>/*.png)")
  classes = sorted({d.name for split_dir in split_dirs for d in split_dir.iterdir() if d.is_dir()})
  if not classes:
    raise ValueError(f"image folder {root} has no classes: no subfolders in "
                     f"{[str(d) for d in split_dirs]} (expected {root}/<split>/<class_name>/*.png)")
  return classes


def folder_files(root: str, split: str, classes: Sequence[str]) -> Tuple[List[str], List[int]]:
  """Sorted image paths of root/<split> and their class indices."""
  split_dir = epath.Path(root) / split
  if not split_dir.is_dir():
    raise FileNotFoundError(f"image folder {root} has no split folder {split!r} "
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
    raise ValueError(f"image folder split {split_dir} has no {'/'.join(IMAGE_EXTENSIONS)} "
                     f"images in its class folders {list(classes)}")
  return paths, labels


def _folder_channels(root: str, splits: Sequence[str], classes: Sequence[str]) -> int:
  """1 if the folder's first image is grayscale, else 3: one answer for every split."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for split in dict.fromkeys(splits):
    if (epath.Path(root) / split).is_dir():
      try:
        first = folder_files(root, split, classes)[0][0]
      except ValueError:
        continue
      with epath.Path(first).open("rb") as f, Image.open(f) as image:
        return ops.channels_of_mode(image.mode)
  return 3


# ----------------------------------------------------------------------------- transforms


class _TrainExample(grain.transforms.RandomMap):
  """Decode, random-resized-crop (or resize) and flip one example; stays uint8."""

  def __init__(self, settings: _Settings, channels: int):
    self._settings = settings
    self._channels = channels

  def random_map(self, example, rng: np.random.Generator):
    s = self._settings
    image = ops.decode(example["image"], self._channels)
    if s.random_resized_crop:
      image = ops.random_resized_crop(image, s.image_size, rng, s.crop_scale, s.crop_ratio)
    else:
      image = ops.resize(image, s.image_size)
    if s.flip:
      image = ops.random_flip(image, rng)
    return {"image": image, "label": np.int32(example["label"])}


class _TrainBatch(grain.transforms.RandomMap):
  """Normalize, one-hot and mixup/cutmix a batch (one lambda per batch, as timm)."""

  def __init__(self, settings: _Settings, num_classes: int):
    self._settings = settings
    self._num_classes = num_classes

  def random_map(self, batch, rng: np.random.Generator):
    s = self._settings
    images = ops.normalize(batch["image"], s.mean, s.std)
    labels = ops.one_hot(batch["label"], self._num_classes)
    images, labels = ops.mix_batch(images, labels, rng, mixup_alpha=s.mixup_alpha,
                                   cutmix_alpha=s.cutmix_alpha, mix_prob=s.mix_prob)
    return {"image": images, "labels": labels}


class _EvalExample(grain.transforms.Map):
  """Decode and resize one example; padding becomes a zero image with mask False."""

  def __init__(self, settings: _Settings, channels: int):
    self._size = settings.image_size
    self._channels = channels

  def map(self, element):
    example, _ = element
    if example is None:
      return {"image": np.zeros((self._size, self._size, self._channels), np.uint8),
              "labels": np.int32(0), "mask": np.bool_(False)}
    image = ops.resize(ops.decode(example["image"], self._channels), self._size)
    return {"image": image, "labels": np.int32(example["label"]), "mask": np.bool_(True)}


class _DropLabels(grain.transforms.Map):
  """Label-free batches for tasks that learn from images alone."""

  def map(self, batch):
    return {k: v for k, v in batch.items() if k != "labels"}


class _TaskFields(grain.transforms.RandomMap):
  """Runs a task's `batch_fields` with grain's per-element generator."""

  def __init__(self, fn: BatchFields):
    self._fn = fn

  def random_map(self, batch, rng: np.random.Generator):
    out = self._fn(dict(batch), rng)
    if not isinstance(out, dict) or "image" not in out:
      raise ValueError(f"a task's batch_fields must return the batch dict (with 'image'), got "
                       f"{type(out).__name__}")
    return out


class _EvalBatch(grain.transforms.Map):

  def __init__(self, settings: _Settings):
    self._mean, self._std = settings.mean, settings.std

  def map(self, batch):
    return {"image": ops.normalize(batch["image"], self._mean, self._std),
            "labels": batch["labels"].astype(np.int32), "mask": batch["mask"].astype(bool)}
