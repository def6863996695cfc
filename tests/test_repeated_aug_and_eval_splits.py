"""Repeated augmentation (DeiT's sampler, exact resume) and several named eval splits per run.

Data: image folders whose pixels encode an example id (so a batch says which examples it
holds), the tiny cluttered-digits build, and the quickstart smoke run for the trainer.
"""
import json
import math
import os

import numpy as np
from PIL import Image
import pytest

from configs import quickstart
from vitoken.data import cluttered_digits, pipeline
from vitoken.engine.metrics import read_jsonl
from vitoken.errors import ConfigError, DataError, MissingPathError
from vitoken.train import trainer

CLASSES = ("ant", "bee", "cat")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """root/<split>/<class>/<id>.png, pixel value 5 + 10 * id (ids 0..23), class id % 3."""
  root = tmp_path_factory.mktemp("folder")
  for split, count in {"train": 24, "val": 7, "extra": 5}.items():
    for example_id in range(count):
      (root / split / CLASSES[example_id % 3]).mkdir(parents=True, exist_ok=True)
      pixels = np.full((8, 8), 5 + 10 * example_id, np.uint8)
      Image.fromarray(pixels, "L").save(root / split / CLASSES[example_id % 3] / f"{example_id:03d}.png")
  return str(root)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  cluttered_digits.build(str(data_dir), config="tiny")
  return str(data_dir)


def _ids(images):
  """Example ids encoded in normalized batches (mean = std = 0.5)."""
  return ((np.round((images[:, 0, 0, 0] * 0.5 + 0.5) * 255) - 5) / 10).astype(int)


def _folder_order(root):
  """The folder source's example ids in its index order (sorted by class, then file)."""
  paths, _ = pipeline.folder_files(root, "train", list(CLASSES))
  return np.array([int(os.path.basename(p)[:3]) for p in paths])


def deit_sampler(permutation, num_repeats, rank, num_replicas):
  """timm's RepeatAugSampler.__iter__ (DeiT's RASampler) for one epoch's permutation, with
  selected_round=1: num_selected_samples = floor(N / num_replicas)."""
  n = len(permutation)
  num_samples = math.ceil(n * num_repeats / num_replicas)
  total_size = num_samples * num_replicas
  indices = [i for i in permutation for _ in range(num_repeats)]
  indices += indices[:total_size - len(indices)]
  indices = indices[rank:total_size:num_replicas]
  return np.array(indices[:n // num_replicas])


def _stream_ids(root, *, repeats, process_count, epochs, shuffle, seed=0):
  """Per process: the example ids of `epochs` epochs of its stream (batch 1 per process)."""
  config = {"folder": root, "image_size": 8, "repeated_augmentation": repeats, "shuffle": shuffle}
  per_epoch = 24 // process_count
  streams = []
  for p in range(process_count):
    it = pipeline.train_iterator(config, global_batch_size=process_count, seed=seed,
                                 process_index=p, process_count=process_count)
    ids = np.concatenate([_ids(next(it)["image"]) for _ in range(epochs * per_epoch)])
    streams.append(ids.reshape(epochs, per_epoch))
  return streams


# ----------------------------------------------------------------------------- repeats


@pytest.mark.parametrize("process_count", [1, 2])
@pytest.mark.parametrize("repeats", [2, 3])
def test_unshuffled_repeats_equal_deits_sampler(folder, process_count, repeats):
  order = _folder_order(folder)
  streams = _stream_ids(folder, repeats=repeats, process_count=process_count, epochs=2,
                        shuffle=False)
  for p, stream in enumerate(streams):
    want = order[deit_sampler(np.arange(24), repeats, p, process_count)]
    for epoch in stream:
      np.testing.assert_array_equal(epoch, want)


@pytest.mark.parametrize("process_count", [1, 2])
def test_shuffled_repeats_have_deits_structure_with_one_order_per_epoch(folder, process_count):
  repeats = 3
  streams = _stream_ids(folder, repeats=repeats, process_count=process_count, epochs=3,
                        shuffle=True)
  permutations = []
  for epoch in range(3):
    # Interleaving the processes' streams gives the epoch's repeated order R_e; the
    # permutation it repeats is its ids in order of first appearance (ids are unique).
    merged = np.stack([s[epoch] for s in streams], axis=1).reshape(-1)
    firsts = list(dict.fromkeys(merged.tolist()))
    permutation = np.array(firsts + sorted(set(range(24)) - set(firsts)))
    for p in range(process_count):
      np.testing.assert_array_equal(
          streams[p][epoch], deit_sampler(permutation, repeats, p, process_count))
    # An epoch keeps its length and shows a third of the images, each three times.
    assert len(merged) == 24 and len(firsts) == 8
    permutations.append(tuple(firsts))
  assert len(set(permutations)) == 3  # reshuffled every epoch


def test_two_processes_get_different_copies_of_each_image(folder):
  first, second = _stream_ids(folder, repeats=2, process_count=2, epochs=1, shuffle=True)
  # DeiT's point: with as many processes as repeats, the copies go to different processes,
  # at the same step.
  np.testing.assert_array_equal(first, second)
  assert len(set(first[0].tolist())) == 12


def test_copies_are_augmented_apart(digits_dir):
  config = {"name": "cluttered_digits/tiny", "data_dir": digits_dir, "shuffle": False,
            "repeated_augmentation": 3, "image_size": 32}
  plain = next(pipeline.train_iterator(config, global_batch_size=6, seed=0))["image"]
  # Without augmentation the three copies are the same image...
  np.testing.assert_array_equal(plain[0], plain[1])
  np.testing.assert_array_equal(plain[0], plain[2])
  assert not np.array_equal(plain[2], plain[3])
  cropped = next(pipeline.train_iterator({**config, "random_resized_crop": True},
                                         global_batch_size=6, seed=0))["image"]
  # ...and with it each copy has its own crop.
  assert len({cropped[i].tobytes() for i in range(3)}) == 3


@pytest.mark.parametrize("process_index", [0, 1])
def test_resume_mid_epoch_gives_the_same_next_batches(digits_dir, process_index):
  config = {"name": "cluttered_digits/tiny", "data_dir": digits_dir, "image_size": 16,
            "train_examples": 40, "repeated_augmentation": 3, "random_resized_crop": True,
            "flip": True, "mixup_alpha": 0.8, "cutmix_alpha": 1.0}
  make = lambda: pipeline.train_iterator(config, global_batch_size=16, seed=3,
                                         process_index=process_index, process_count=2)
  uninterrupted = make()
  reference = [next(uninterrupted) for _ in range(8)]
  interrupted = make()
  for _ in range(3):  # 24 elements: past a 20-element epoch, so restored mid-epoch
    next(interrupted)
  state = interrupted.get_state()
  resumed = make()
  resumed.set_state(json.loads(json.dumps(state)))  # as grain.checkpoint stores it
  for want in reference[3:]:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_repeated_augmentation_is_checked(folder):
  for bad in (0, -1, 1.5, True, "3"):
    with pytest.raises(ConfigError, match="repeated_augmentation"):
      pipeline.train_iterator({"folder": folder, "repeated_augmentation": bad},
                              global_batch_size=2, seed=0)
  with pytest.raises(DataError, match="too few"):
    pipeline.train_iterator({"folder": folder, "train_examples": 3, "repeated_augmentation": 3},
                            global_batch_size=4, seed=0, process_index=0, process_count=4)


# ----------------------------------------------------------------------------- eval splits


def test_eval_iterator_reads_a_named_split(folder, digits_dir):
  config = {"folder": folder, "image_size": 8, "eval_split": "val",
            "eval_splits": {"extra": "extra"}}
  batches = list(pipeline.eval_iterator(config, global_batch_size=4, split="extra"))
  ids = np.concatenate([_ids(b["image"])[b["mask"]] for b in batches])
  assert sorted(ids.tolist()) == list(range(5))
  digits = {"name": "cluttered_digits/tiny", "data_dir": digits_dir, "eval_examples": 30}
  sliced = list(pipeline.eval_iterator(digits, global_batch_size=16, split="train[:5%]"))
  assert sum(int(b["mask"].sum()) for b in sliced) == 30  # 50 examples, capped at 30


def test_eval_splits_are_checked(folder, digits_dir):
  for bad in ({"a/b": "val"}, {"": "val"}, {"..": "val"}, {"v": ""}, {"v": 3}, ["val"]):
    with pytest.raises(ConfigError, match="eval_splits"):
      pipeline.dataset_info({"folder": folder, "eval_splits": bad})
  with pytest.raises(DataError, match="nope"):
    pipeline.dataset_info({"name": "cluttered_digits/tiny", "data_dir": digits_dir,
                           "eval_splits": {"v": "nope"}})
  with pytest.raises(MissingPathError, match="nope"):
    pipeline.dataset_info({"folder": folder, "eval_split": "val", "eval_splits": {"v": "nope"}})


def _smoke_config(**data):
  c = quickstart.get_config("runlocal")
  c.progress_bar = False
  c.checkpoint.async_save = False
  c.total_steps, c.eval_every_steps, c.log_every_steps, c.checkpoint.every_steps = 2, 1, 1, 2
  c.data.eval_examples = 64
  c.data.update(data)
  return c


def _tensorboard(workdir, split):
  from tensorboard.backend.event_processing import event_accumulator
  events = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard", split))
  events.Reload()
  return {tag: [(s.step, s.value) for s in events.Scalars(tag)]
          for tag in events.Tags()["scalars"]}


def test_named_eval_splits_each_log_their_metrics(tmp_path):
  c = _smoke_config(eval_splits={"same": "test", "minival": "train[:1%]"})
  c.ema_decay = 0.9
  c.data.eval_examples = 48
  summary = trainer.run(c, str(tmp_path))
  names = ["eval", "eval/same", "eval/minival", "eval_ema", "eval_ema/same", "eval_ema/minival"]
  records = read_jsonl(str(tmp_path / "metrics.jsonl"))
  saved = json.load(open(tmp_path / "summary.json"))
  for name in names:
    logged = [r for r in records if r["split"] == name]
    assert [r["step"] for r in logged] == [1, 2], name
    board = _tensorboard(str(tmp_path), name)
    for key in ("accuracy", "loss", "examples"):
      assert [v for _, v in board[key]] == pytest.approx([r[key] for r in logged], rel=1e-6)
      assert summary[name][key] == saved[name][key] == logged[-1][key]
  # "same" is the eval split again: the same numbers; minival is another split.
  for base in ("eval", "eval_ema"):
    assert summary[f"{base}/same"] == summary[base]
    assert summary[f"{base}/minival"]["loss"] != summary[base]["loss"]
  assert summary["eval"]["examples"] == 48


def test_one_eval_split_logs_as_before(tmp_path):
  summary = trainer.run(_smoke_config(), str(tmp_path))
  splits = {r["split"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))}
  assert splits == {"train", "eval"}
  assert sorted(os.listdir(tmp_path / "tensorboard")) == ["eval", "train"]
  assert not [k for k in summary if k.startswith("eval") and k != "eval"]
  assert summary["eval"]["examples"] == 64
