"""Moving cluttered digits: clips whose digit moves as its direction label says, whole on the
canvas, over clutter that does not move; balanced labels; byte-identical per version."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from vitoken.data import cluttered_digits, moving_digits as md


@pytest.fixture(scope="module")
def glyphs():
  images, labels = cluttered_digits.load_glyphs()
  train, test = cluttered_digits.split_glyphs(labels)
  return images, labels, train, test


def _boxes(frames):
  """(top, left, bottom, right) of the nonzero pixels of each frame [T, H, W]."""
  out = []
  for f in frames:
    rows, cols = np.flatnonzero(f.any(1)), np.flatnonzero(f.any(0))
    out.append((rows[0], cols[0], rows[-1], cols[-1]))
  return np.array(out)


def test_the_digit_moves_as_its_direction_says_and_stays_whole(glyphs):
  images, labels, train, _ = glyphs
  clean, digit, direction = md.render(images, labels, train, 400, np.random.default_rng(5),
                                      clutter=False)
  assert clean.shape == (400, md.FRAMES, 64, 64, 1) and clean.dtype == np.uint8
  moves = set()
  for clip, d in zip(clean[..., 0], direction):
    boxes = _boxes(clip)
    steps = np.diff(boxes[:, :2], axis=0)  # (d top, d left) per frame
    assert np.all(steps == steps[0]), steps  # constant velocity
    dy, dx = steps[0]
    speed = max(abs(dx), abs(dy))
    assert md.SPEEDS[0] <= speed <= md.SPEEDS[1]
    assert (np.sign(dx), np.sign(dy)) == tuple(md.STEPS[d]), (d, dx, dy)
    # Same glyph every frame: each frame is the first one shifted.
    np.testing.assert_array_equal(np.roll(clip[0], (dy * 3, dx * 3), axis=(0, 1)), clip[3])
    moves.add((int(np.sign(dx)), int(np.sign(dy))))
  assert len(moves) == 8
  # With clutter: the same digit over a background that is the same in every frame (where
  # the digit covers neither frame, the pixels agree), and there is clutter.
  full, _, _ = md.render(images, labels, train, 400, np.random.default_rng(5))
  assert (full != clean).any(axis=(1, 2, 3, 4)).mean() > 0.5
  empty = clean == 0
  for t in range(1, md.FRAMES):
    both = empty[:, 0] & empty[:, t]
    np.testing.assert_array_equal(full[:, 0][both], full[:, t][both])
  np.testing.assert_array_equal(np.maximum(full, clean), full)  # the digit is on top, whole


def test_labels_are_balanced_and_splits_use_disjoint_glyphs(glyphs):
  images, labels, train, test = glyphs
  _, digit, direction = md.render(images, labels, test, 160, np.random.default_rng(0))
  assert np.all(np.bincount(digit, minlength=10) == 16)
  assert np.all(np.bincount(direction, minlength=8) == 20)
  assert not set(train) & set(test)


def test_a_version_is_byte_identical():
  a = md.generate_split("test", 300)
  b = md.generate_split("test", 300)
  for x, y in zip(a, b):
    assert x.tobytes() == y.tobytes()
  with pytest.raises(ValueError, match="splits"):
    next(md.iterate_split("validation", 10))


def test_tiny_builds_and_reads_through_tfds(tmp_path):
  md.build(str(tmp_path), config="tiny")
  source = tfds.data_source("moving_digits/tiny", split="train", data_dir=str(tmp_path))
  assert len(source) == 200
  example = source[7]
  assert example["image"].shape == (md.FRAMES, 64, 64, 1)
  clips, digit, direction = md.generate_split("train", 200)
  np.testing.assert_array_equal(example["image"], clips[7])
  assert (example["label"], example["direction"]) == (digit[7], direction[7])
