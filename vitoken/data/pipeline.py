"""The input pipeline the trainer calls: grain over TFDS array_record or an image folder.

    info = dataset_info(config.data)                    # classes, image shape, split sizes
    train = train_iterator(config.data, global_batch_size=256, seed=0)
    batch = next(train)   # {"image": f32 [B, H, W, C], "labels": f32 [B, num_classes]}
                          # clips: "image" f32 [B, T, H, W, C]; several label_keys: their
                          # one-hot vectors side by side in "labels"
    state = train.get_state()                         # or grain.checkpoint.CheckpointSave(train)
    for batch in eval_iterator(config.data, global_batch_size=256):
      ...   # {"image", "labels": f32 [B, num_classes] (zero rows = padding), "mask": bool [B]}

Both iterators are grain `DatasetIterator`s over index-addressable `MapDataset`s: element i
of the stream is a pure function of (config, seed, process, i). That is what makes
checkpoints exact (the state is a position) and lets per-record randomness come from grain
(`random_map` seeds a generator with the transform's seed and the element index).

Training: each process shuffles and repeats only its own strided shard of the split
(reshuffled every epoch), augments each example (resize or random-resized-crop, flip),
batches `global_batch_size // process_count` examples, then normalizes, one-hot encodes and
applies mixup/cutmix per batch. With `repeated_augmentation` > 1 the processes instead share
one permutation per epoch and stride through it with each image repeated, as DeiT's sampler
does (`RepeatedAugmentation`).

Evaluation is exact: the split is padded to a multiple of the global batch; global batch k
holds examples [k * B, (k + 1) * B) spread over the processes, so every example appears once
with mask True, padding has mask False (and an all-zero label row), and every process yields
the same number of batches.

This module assembles the iterators; the pieces live in `vitoken.data.config` (the data
config: `default_data_config`, `Settings`), `vitoken.data.sources` (`DataInfo`,
`dataset_info`, TFDS and image-folder sources) and `vitoken.data.transforms` (the grain
transforms). Their public names are re-exported here.
"""
from __future__ import annotations

import math
import sys
from typing import Optional, Tuple

from absl import flags
import grain
import jax
import numpy as np

from vitoken.data import sources, transforms
from vitoken.data.config import Settings, default_data_config
from vitoken.data.sources import (
  IMAGE_EXTENSIONS,
  DataInfo,
  ImageFolderSource,
  dataset_info,
  folder_classes,
  folder_files,
)
from vitoken.data.transforms import BatchFields
from vitoken.errors import ConfigError, DataError

__all__ = [
    "BatchFields", "DataInfo", "IMAGE_EXTENSIONS", "ImageFolderSource", "dataset_info",
    "RepeatedAugmentation", "default_data_config", "eval_iterator", "folder_classes",
    "folder_files", "train_iterator",
]

# In-process prefetching: threads overlap reading/augmenting with the trainer's device
# work (numpy and PIL release the GIL). Elements are whole batches, so the buffer is small.
_READ_THREADS = 2
_PREFETCH_BATCHES = 4

# Independent random streams derived from the user's seed.
_SHUFFLE_STREAM, _EXAMPLE_STREAM, _BATCH_STREAM, _TASK_STREAM = range(4)


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
  settings = Settings.parse(data_config)
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch(global_batch_size, process_count)
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ConfigError(f"seed must be a non-negative int, got {seed!r} (config.seed)")
  split = sources.open_split(settings, settings.train_split, settings.train_examples)
  stream_seed = lambda stream: _stream_seed(seed, process_index, stream)
  if settings.repeated_augmentation > 1:
    # One permutation for all processes (process 0's seed): the copies of an image must be
    # spread over the processes, so the processes must agree on the order.
    examples = RepeatedAugmentation(split.source, num_repeats=settings.repeated_augmentation,
                                    seed=_stream_seed(seed, 0, _SHUFFLE_STREAM),
                                    shuffle=settings.shuffle, process_index=process_index,
                                    process_count=process_count)
  else:
    examples = _shuffled_shard(split.source, settings, process_index, process_count,
                               stream_seed(_SHUFFLE_STREAM))
  # random_map draws from the element's position in this process's stream, so the copies of a
  # repeated image (at different positions or processes) are augmented differently.
  dataset = (examples
             .random_map(transforms.TrainExample(settings, split.channels, split.frames,
                                                 split.extra_fields),
                         seed=stream_seed(_EXAMPLE_STREAM))
             .batch(local_batch, drop_remainder=True)
             .random_map(transforms.TrainBatch(settings, split.class_counts),
                         seed=stream_seed(_BATCH_STREAM)))
  dataset = _with_task_fields(dataset, labels, batch_fields, stream_seed(_TASK_STREAM))
  return _iterate(dataset, settings.worker_count)


def eval_iterator(data_config, *, global_batch_size: int,
                  process_index: Optional[int] = None, process_count: Optional[int] = None,
                  labels: bool = True, batch_fields: Optional[BatchFields] = None, seed: int = 0,
                  split: Optional[str] = None):
  """One pass over the eval split, padded to whole global batches, without augmentation.

  `split` (a split name or slice, e.g. "train[99%:]", or a folder's subfolder; capped by
  `eval_examples` too) replaces `eval_split`, for the named `eval_splits`.

  Yields {"image": float32 [B, H, W, C], "labels": float32 [B, num_classes], "mask": bool [B]}:
  the labels take the training form (one-hot), with all-zero rows where mask is False
  (padding); every process yields ceil(N / global_batch_size) batches. `labels` and
  `batch_fields` as for `train_iterator` (the fields' randomness depends on `seed` and the
  batch only, so every evaluation sees the same fields).
  """
  settings = Settings.parse(data_config)
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch(global_batch_size, process_count)
  split = sources.open_split(settings, settings.eval_split if split is None else split,
                             settings.eval_examples)
  num_batches = math.ceil(len(split.source) / global_batch_size)
  padded = sources.PaddedSource(split.source, num_batches * global_batch_size)
  dataset = (grain.MapDataset.source(padded)[process_index::process_count]
             .map(transforms.EvalExample(settings, split.channels, split.frames,
                                         split.extra_fields))
             .batch(local_batch, drop_remainder=True)
             .map(transforms.EvalBatch(settings, split.class_counts)))
  dataset = _with_task_fields(dataset, labels, batch_fields,
                              _stream_seed(seed, process_index, _TASK_STREAM))
  return _iterate(dataset, settings.worker_count)


def _shuffled_shard(source, settings: Settings, process_index: int, process_count: int,
                    shuffle_seed: int) -> grain.MapDataset:
  """This process's strided shard, shuffled per epoch and repeated forever."""
  shard = source[process_index::process_count]
  if len(shard) == 0:
    raise DataError(f"train split {settings.train_split!r} has {len(source)} examples: "
                    f"too few for {process_count} processes; run fewer processes or give more "
                    "examples (data.train_examples)")
  if settings.shuffle:
    # Shuffle before repeat: grain folds the epoch into the shuffle seed, so each epoch
    # is a fresh permutation and epochs never mix.
    shard = shard.shuffle(seed=shuffle_seed)
  return shard.repeat(None)


class RepeatedAugmentation(grain.MapDataset):
  """DeiT's repeated-augmentation sampler (timm's `RepeatAugSampler`) as an infinite MapDataset.

  Epoch e takes a permutation P_e of the N examples, the same on every process (grain's
  shuffle of range(N), epoch folded into `seed`; the identity when `shuffle` is False), repeats
  each entry `num_repeats` times in a row (R_e[j] = P_e[j // num_repeats]) and gives process p
  the positions p, p + process_count, p + 2 * process_count, ... of R_e, M = N // process_count
  of them; element i of the stream is R_{i // M}[p + (i % M) * process_count]. That is
  timm's sampler with `selected_round=1` (num_selected_samples = floor(N / process_count); DeiT
  rounds N down to a multiple of 256 first): M * process_count <= N positions are taken, so
  every process sees the same number per epoch and no padding is needed. An epoch is as long as
  one without repeats and shows its first ceil(M * process_count / num_repeats) images of P_e,
  each num_repeats times (the last maybe fewer); with process_count >= num_repeats the copies
  of an image fall on different processes, at (nearly) the same step.
  """

  def __init__(self, parent: grain.MapDataset, *, num_repeats: int, seed: int, shuffle: bool,
               process_index: int, process_count: int):
    super().__init__(parent)
    self._num_repeats = num_repeats
    self._process_index = process_index
    self._process_count = process_count
    self._per_epoch = len(parent) // process_count
    if self._per_epoch == 0:
      raise DataError(f"the train split has {len(parent)} examples: too few for "
                      f"{process_count} processes; run fewer processes or give more examples "
                      "(data.train_examples)")
    # Indexed past its length, grain's shuffle reads the epoch from the index: element
    # e * N + q is P_e[q].
    self._order = grain.MapDataset.range(len(parent))
    if shuffle:
      self._order = self._order.shuffle(seed=seed)

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f"RepeatedAugmentation(num_repeats={self._num_repeats})"

  def source_index(self, index: int) -> int:
    """The example (an index of the parent) at position `index` of this process's stream."""
    epoch, k = divmod(index, self._per_epoch)
    position = (self._process_index + k * self._process_count) // self._num_repeats
    return int(self._order[epoch * len(self._parent) + position])

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self.source_index(index)]


def _with_task_fields(dataset, labels: bool, batch_fields, seed: int):
  if not labels:
    dataset = dataset.map(transforms.DropLabels())
  if batch_fields is not None:
    dataset = dataset.random_map(transforms.TaskFields(batch_fields), seed=seed)
  return dataset


def _process(process_index, process_count) -> Tuple[int, int]:
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got {process_index} "
                     f"and {process_count}")
  return int(process_index), int(process_count)


def _local_batch(global_batch_size: int, process_count: int) -> int:
  if not isinstance(global_batch_size, (int, np.integer)) or global_batch_size < 1:
    raise ConfigError(f"global_batch_size must be a positive int, got {global_batch_size!r} "
                      "(config.batch_size)")
  if global_batch_size % process_count:
    raise ConfigError(f"global_batch_size {global_batch_size} is not divisible by the process "
                      f"count {process_count}; set config.batch_size to a multiple of it")
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
