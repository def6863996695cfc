"""Cluttered digits: builds offline, is deterministic, keeps train and test glyphs apart.

Tests build the `tiny` config (1,000 / 300 images, ~2 s); the default config is the same
code with 50,000 / 10,000 images.
"""
import concurrent.futures
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vitoken.data import cluttered_digits as cd


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  cd.build(str(data_dir), config="tiny")
  return str(data_dir)


def _read(data_dir, split, indices):
  source = tfds.data_source(f"{cd.NAME}/tiny", split=split, data_dir=data_dir)
  return [source[i] for i in indices]


def test_default_config_is_50k_train_10k_test():
  default = cd.ClutteredDigits.builder_configs["default"]
  assert (default.train_size, default.test_size) == (50_000, 10_000)
  assert cd.builder(config="default").builder_config.name == "default"


def test_split_sizes_and_storage(tiny_dir):
  builder = cd.builder(tiny_dir, "tiny")
  assert builder.is_prepared()
  assert builder.info.splits["train"].num_examples == 1_000
  assert builder.info.splits["test"].num_examples == 300
  assert str(builder.info.file_format.value) == "array_record"
  assert len(tfds.data_source(f"{cd.NAME}/tiny", split="test", data_dir=tiny_dir)) == 300


def test_reading_needs_no_tensorflow(tiny_dir):
  _read(tiny_dir, "train", [0])
  assert "tensorflow" not in sys.modules


def test_examples_are_64x64x1_uint8_with_labels_0_to_9(tiny_dir):
  examples = _read(tiny_dir, "train", range(200))
  for example in examples[:5]:
    assert example["image"].shape == (64, 64, 1) and example["image"].dtype == np.uint8
  labels = np.array([int(e["label"]) for e in examples])
  assert labels.min() >= 0 and labels.max() <= 9
  assert set(labels) == set(range(10))  # classes are balanced by construction


def test_two_builds_are_byte_identical(tiny_dir, tmp_path):
  cd.build(str(tmp_path), config="tiny")
  for split in ("train", "test"):
    first, second = _read(tiny_dir, split, range(8)), _read(str(tmp_path), split, range(8))
    for a, b in zip(first, second):
      assert a["image"].tobytes() == b["image"].tobytes() and a["label"] == b["label"]


def test_concurrent_builds_into_one_data_dir_publish_one_copy(tmp_path, monkeypatch):
  # Two builders racing on one data_dir (xdist workers, trainers on several hosts): each builds
  # privately, one publishes by a rename and the other uses that copy; no lock is needed, so
  # this works in buckets as well.
  calls = []
  original = cd.ClutteredDigits.download_and_prepare
  monkeypatch.setattr(cd.ClutteredDigits, "download_and_prepare",
                      lambda self, **kw: (calls.append(1), original(self, **kw))[1])
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    builders = list(pool.map(lambda _: cd.build(str(tmp_path), config="tiny"), range(2)))
  assert 1 <= len(calls) <= 2
  for builder in builders:
    assert builder.is_prepared() and builder.info.splits["test"].num_examples == 300
  assert len(tfds.data_source(f"{cd.NAME}/tiny", split="test", data_dir=str(tmp_path))) == 300
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cluttered_digits", "downloads"]
  assert [p.name for p in (tmp_path / "cluttered_digits" / "tiny").iterdir()] == ["1.0.0"]


def test_a_build_that_lost_the_race_uses_the_published_copy(tmp_path, monkeypatch):
  # Another process publishes while this one builds: this one's copy is dropped.
  original = cd.ClutteredDigits.download_and_prepare

  def build_while_another_publishes(self, **kw):
    if not calls:
      calls.append(1)
      cd.build(str(tmp_path), config="tiny")  # the other process, finishing first
    return original(self, **kw)
  calls = []
  monkeypatch.setattr(cd.ClutteredDigits, "download_and_prepare", build_while_another_publishes)
  builder = cd.build(str(tmp_path), config="tiny")
  assert builder.is_prepared() and builder.info.splits["train"].num_examples == 1_000
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".vitoken-build")]


def test_an_unfinished_dataset_left_in_place_is_named(tmp_path):
  leftover = tmp_path / "cluttered_digits" / "tiny" / "1.0.0"
  leftover.mkdir(parents=True)
  (leftover / "cluttered_digits-train.array_record-00000-of-00001").write_bytes(b"half")
  with pytest.raises(RuntimeError, match=r"1.0.0 holds an unfinished dataset .* delete it"):
    cd.build(str(tmp_path), config="tiny")
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".vitoken-build")]


def test_stored_examples_are_the_rendered_ones_in_order(tiny_dir):
  images, labels = cd.generate_split("test", 300)
  for index in (0, 1, 150, 299):
    example = _read(tiny_dir, "test", [index])[0]
    np.testing.assert_array_equal(example["image"], images[index])
    assert example["label"] == labels[index]


def test_glyph_split_is_disjoint_stratified_and_complete():
  train, test = cd.load_glyph_split()
  _, labels = cd.load_glyphs()
  assert not set(train) & set(test)
  assert len(train) + len(test) == len(labels) == 1797
  assert 0.18 < len(test) / len(labels) < 0.22
  for digit in range(10):
    share = np.mean(labels[test] == digit) / np.mean(labels == digit)
    assert 0.9 < share < 1.1
  np.testing.assert_array_equal(cd.load_glyph_split()[1], test)  # fixed, not re-drawn


@pytest.mark.parametrize("split", ["train", "test"])
def test_each_split_draws_glyphs_only_from_its_own_pool(split, monkeypatch):
  train_pool, test_pool = cd.load_glyph_split()
  pool = set(train_pool if split == "train" else test_pool)
  drawn = []
  original = cd.sample_glyphs_of_class

  def spy(labels, pool_arg, classes, rng):
    chosen = original(labels, pool_arg, classes, rng)
    assert np.all(labels[chosen] == classes)
    drawn.append(chosen)
    return chosen

  monkeypatch.setattr(cd, "sample_glyphs_of_class", spy)
  cd.generate_split(split, 200)
  # The digit and every clutter fragment: 1 + max fragments draws per image.
  assert len(drawn) == 1 + cd.FRAGMENTS_PER_IMAGE[1]
  assert set(np.concatenate(drawn)) <= pool


def test_clutter_never_shows_the_label_class(monkeypatch):
  classes_seen = []
  original = cd.sample_glyphs_of_class

  def spy(labels, pool, classes, rng):
    classes_seen.append(np.array(classes))
    return original(labels, pool, classes, rng)

  monkeypatch.setattr(cd, "sample_glyphs_of_class", spy)
  _, targets = cd.generate_split("train", 300)
  digit_classes, *fragment_classes = classes_seen
  np.testing.assert_array_equal(digit_classes, targets)
  for classes in fragment_classes:
    assert np.all(classes != targets)


def test_most_patches_are_background(tiny_dir):
  images = np.stack([e["image"][..., 0] for e in _read(tiny_dir, "train", range(300))])
  patch_max = images.reshape(-1, 8, 8, 8, 8).max(axis=(2, 4))  # [N, 8, 8] per 8x8 patch
  assert np.mean(patch_max < 32) > 0.5


def test_clutter_stays_off_the_digit(monkeypatch):
  # The digit is drawn before any clutter, so the same seeds without clutter give the
  # same digits: clutter may only add ink, and never where the digit is.
  glyphs, labels = cd.load_glyphs()
  pool = cd.load_glyph_split()[0]
  full, _ = cd.render(glyphs, labels, pool, 200, np.random.default_rng(0))
  monkeypatch.setattr(cd, "FRAGMENTS_PER_IMAGE", (0, 0))
  clean, _ = cd.render(glyphs, labels, pool, 200, np.random.default_rng(0))
  assert np.all(full >= clean)
  np.testing.assert_array_equal(full[clean > 0], clean[clean > 0])
  assert np.all((clean > 128).sum(axis=(1, 2, 3)) >= 30)  # every image shows its digit
  assert (full > 0).sum() > 1.2 * (clean > 0).sum()  # and clutter is really there


def test_bilinear_matrix_rows_sum_to_one():
  weights = cd.bilinear_matrix(8, 27)
  np.testing.assert_allclose(weights.sum(1), 1, rtol=1e-6)
  np.testing.assert_array_equal(cd.upscale(np.ones((2, 8, 8), np.float32), 30), 255)


def test_unknown_split_is_rejected():
  with pytest.raises(ValueError, match="cluttered_digits has splits"):
    cd.generate_split("validation", 10)
