"""Digit scenes QA: every answer agrees with the scene (recomputed here from `cells`, and
`cells` from the pixels), answers are balanced per question type, a version is byte-identical,
train scenes never show a test glyph, and vitoken's pipeline carries the question fields into
the batches and refuses augmentations that would change the answers.

Tests render scenes directly (a 2,200-scene chunk, ~1 s) and build the `tiny` config (1,000 /
300 scenes, ~2 s) into a temporary data_dir; the default config is the same code.
"""
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vitoken.data import cluttered_digits, digit_scenes as ds, pipeline
from vitoken.errors import DataError

NUM_SCENES = 2_200  # 550 per question type: 275 yes/no, 55 per largest, 50 per cell answer
INK = 64  # a pixel this bright is ink; every glyph's ink spans its full upscaled side


@pytest.fixture(scope="module")
def glyphs():
  images, labels = cluttered_digits.load_glyphs()
  train, test = cluttered_digits.split_glyphs(labels)
  return images, labels, train, test


@pytest.fixture(scope="module")
def scenes(glyphs):
  """The same draws with and without clutter: (full, clean)."""
  images, labels, train, _ = glyphs
  full = ds.render(images, labels, train, NUM_SCENES, np.random.default_rng(0))
  clean = ds.render(images, labels, train, NUM_SCENES, np.random.default_rng(0), clutter=False)
  return full, clean


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  ds.build(str(data_dir), config="tiny")
  return str(data_dir)


def _expected_answer(question: str, cells: np.ndarray) -> str:
  """The answer to `question` about a scene whose row-major cells hold `cells` (-1 = empty),
  worked out from the question's words alone."""
  words = question.split()
  present = cells[cells >= 0]
  if words[:3] == ["is", "there", "a"]:
    return "yes" if int(words[3]) in present else "no"
  if words == ["how", "many", "digits", "?"]:
    return str(len(present))
  if words == ["what", "is", "the", "largest", "digit", "?"]:
    return str(present.max())
  assert words[:4] == ["what", "digit", "is", "at"] and len(words) == 7, question
  cell = ["top", "middle", "bottom"].index(words[4]) * 3 + ["left", "center", "right"].index(
      words[5])
  return "none" if cells[cell] < 0 else str(cells[cell])


def _ink_extent(image: np.ndarray) -> np.ndarray:
  """[9]: the larger of the height and width spanned by ink in each 32x32 cell of [96, 96]."""
  cells = image.reshape(3, 32, 3, 32).transpose(0, 2, 1, 3).reshape(9, 32, 32) >= INK
  extents = []
  for ink in cells:
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    extents.append(0 if len(rows) == 0 else max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1)
  return np.array(extents)


# ----------------------------------------------------------------------------- vocabulary


def test_vocabulary_and_question_round_trip():
  assert ds.VOCAB[0] == "<pad>" and len(set(ds.VOCAB)) == len(ds.VOCAB)
  assert set(ds.ANSWERS) == {*map(str, range(10)), "yes", "no", "none"} <= set(ds.VOCAB)
  assert ds.QTYPES == ("presence", "count", "largest", "cell")
  questions = set()
  for qtype, subjects in enumerate((range(10), [-1], [-1], range(9))):
    for subject in subjects:
      words = ds.question_words(qtype, subject)
      ids = ds.encode(words, ds.QUESTION_LENGTH)
      assert ids.dtype == np.int32 and ids.shape == (ds.QUESTION_LENGTH,)
      assert np.all(ids[len(words):] == 0) and np.all(ids[:len(words)] > 0)
      assert ds.decode(ids) == " ".join(words)
      np.testing.assert_array_equal(ds.encode(" ".join(words)), ids[:len(words)])
      questions.add(ds.decode(ids))
  assert len(questions) == 21
  assert "what digit is at bottom center ?" in questions
  assert ds.decode(ds.encode(["none"])[0]) == "none"  # an answer id alone
  with pytest.raises(DataError, match="not in digit_scenes.VOCAB"):
    ds.encode("is there a cat ?")
  with pytest.raises(DataError, match="length"):
    ds.encode("what digit is at top left ?", length=4)
  with pytest.raises(DataError, match="word ids"):
    ds.decode([len(ds.VOCAB)])


# ----------------------------------------------------------------------------- content


def test_answers_agree_with_cells_and_cells_with_the_pixels(scenes, glyphs):
  full, clean = scenes
  images, labels, _, _ = glyphs
  assert full["image"].shape == (NUM_SCENES, 96, 96, 1) and full["image"].dtype == np.uint8
  for key in ("question", "answer", "qtype", "cells", "glyph_ids"):
    assert full[key].dtype == np.int32, key
  for key in ("question", "answer", "qtype", "label", "cells", "glyph_ids", "boxes"):
    np.testing.assert_array_equal(full[key], clean[key])  # clutter draws after the layout

  qtype_of_words = {"is": 0, "how": 1}
  for i in range(NUM_SCENES):
    question, cells = ds.decode(full["question"][i]), full["cells"][i]
    answer = ds.decode(full["answer"][i])
    assert answer == _expected_answer(question, cells), (i, question, cells)
    assert ds.ANSWERS[full["label"][i]] == answer
    words = question.split()
    expected_qtype = qtype_of_words.get(words[0], 2 if words[2] == "the" else 3)
    assert full["qtype"][i] == expected_qtype, question
    assert 1 <= (cells >= 0).sum() <= 4

  occupied = full["cells"] >= 0
  # Cells from the pixels: a digit's ink spans >= 20 px, a fragment's <= 12 px and each cell
  # holds at most one fragment, so the ink's extent tells occupied cells from empty ones,
  # clutter or not; without clutter empty cells are black.
  for i in range(NUM_SCENES):
    extent = _ink_extent(full["image"][i, ..., 0])
    assert np.all(extent[occupied[i]] >= ds.DIGIT_SIZES[0]), (i, extent, full["cells"][i])
    assert np.all(extent[~occupied[i]] <= 12), (i, extent, full["cells"][i])
    assert np.all(_ink_extent(clean["image"][i, ..., 0])[~occupied[i]] == 0)
  # The digit in each cell: the recorded glyph (of that class), upscaled, whole inside the cell
  # and untouched by clutter.
  np.testing.assert_array_equal(labels[full["glyph_ids"][occupied]], full["cells"][occupied])
  assert np.all(full["glyph_ids"][~occupied] == -1) and np.all(full["boxes"][~occupied] == -1)
  for i, cell in zip(*np.nonzero(occupied)):
    top, left, side = full["boxes"][i, cell]
    assert ds.DIGIT_SIZES[0] <= side <= ds.DIGIT_SIZES[1]
    assert (top // 32, left // 32) == divmod(cell, 3)
    assert ((top + side - 1) // 32, (left + side - 1) // 32) == divmod(cell, 3)
    tile = cluttered_digits.upscale(images[full["glyph_ids"][i, cell]][None], side)[0]
    np.testing.assert_array_equal(clean["image"][i, top:top + side, left:left + side, 0], tile)
    np.testing.assert_array_equal(full["image"][i, top:top + side, left:left + side, 0], tile)
  np.testing.assert_array_equal(np.maximum(full["image"], clean["image"]), full["image"])
  assert (full["image"] != clean["image"]).any(axis=(1, 2, 3)).mean() > 0.95  # clutter


def test_answers_are_balanced_within_each_question_type(scenes, monkeypatch):
  full, _ = scenes

  def counts(values, n):
    return np.bincount(values, minlength=n)

  # One chunk: every count below is uniform, up to one where it does not divide.
  per_type = NUM_SCENES // 4
  np.testing.assert_array_equal(counts(full["qtype"], 4), [per_type] * 4)
  label, cells = full["label"], full["cells"]
  yes, no, none = (ds.ANSWERS.index(w) for w in ("yes", "no", "none"))
  expected = {0: {yes: 275, no: 275}, 2: {d: 55 for d in range(10)},
              3: {**{d: 50 for d in range(10)}, none: 50}}
  for qtype, answers in expected.items():
    got = counts(label[full["qtype"] == qtype], len(ds.ANSWERS))
    assert dict(enumerate(got)) == {a: answers.get(a, 0) for a in range(len(ds.ANSWERS))}
  count_answers = counts(label[full["qtype"] == 1], len(ds.ANSWERS))
  assert sorted(count_answers[1:5]) == [137, 137, 138, 138] and count_answers.sum() == 550
  for qtype in range(4):  # 1 to 4 digits, equally often, in every type
    digits_per_scene = (cells[full["qtype"] == qtype] >= 0).sum(1)
    assert sorted(counts(digits_per_scene, 5)[1:]) == [137, 137, 138, 138], qtype
  presence = full["question"][full["qtype"] == 0]
  asked_digit = np.array([int(ds.decode(q).split()[3]) for q in presence])
  np.testing.assert_array_equal(counts(asked_digit, 10), [55] * 10)
  cell_questions = [ds.decode(q).split()[4:6] for q in full["question"][full["qtype"] == 3]]
  _, asked_cells = np.unique(cell_questions, axis=0, return_counts=True)
  assert len(asked_cells) == 9 and asked_cells.max() - asked_cells.min() <= 1

  # A split of several chunks is balanced up to one per chunk: 3 chunks of <= 400 here.
  monkeypatch.setattr(ds, "CHUNK", 400)
  split = ds.generate_split("test", 1_100)
  assert np.ptp(counts(split["qtype"], 4)) <= 3
  for qtype, answers in ((0, [yes, no]), (1, [1, 2, 3, 4]), (2, range(10)),
                         (3, [*range(10), none])):
    got = counts(split["label"][split["qtype"] == qtype], len(ds.ANSWERS))
    assert np.ptp(got[list(answers)]) <= 3 and got.sum() == got[list(answers)].sum(), qtype


def test_a_version_is_byte_identical():
  a, b = ds.generate_split("test", 300), ds.generate_split("test", 300)
  assert a.keys() == b.keys()
  for key in a:
    assert a[key].tobytes() == b[key].tobytes(), key
  assert ds.generate_split("train", 300)["image"].tobytes() != a["image"].tobytes()
  with pytest.raises(ValueError, match="splits"):
    next(ds.iterate_split("validation", 10))


def test_train_scenes_never_show_test_glyphs(glyphs, monkeypatch):
  _, _, train, test = glyphs
  assert not set(train) & set(test)
  # Every glyph a split draws, digits and clutter fragments alike.
  drawn = []
  original = cluttered_digits.sample_glyphs_of_class
  monkeypatch.setattr(cluttered_digits, "sample_glyphs_of_class",
                      lambda *args: drawn.append(original(*args)) or drawn[-1])
  for split, pool in (("train", train), ("test", test)):
    drawn.clear()
    scenes = ds.generate_split(split, 400)
    used = np.concatenate(drawn)
    assert len(used) > 400 * 3 and set(used) <= set(pool), split
    recorded = scenes["glyph_ids"][scenes["glyph_ids"] >= 0]
    assert set(recorded) <= set(pool) and set(recorded) <= set(used)


def test_clutter_shows_no_digit_of_the_scene_nor_the_asked_one(glyphs, monkeypatch):
  images, labels, train, _ = glyphs
  classes = []
  original = cluttered_digits.sample_glyphs_of_class
  monkeypatch.setattr(cluttered_digits, "sample_glyphs_of_class",
                      lambda lab, pool, wanted, rng: classes.append(wanted) or original(
                          lab, pool, wanted, rng))
  scenes = ds.render(images, labels, train, 400, np.random.default_rng(3))
  # The first draw is the scenes' digits, then one fragment class per scene and slot.
  fragments = np.stack(classes[1:], axis=1)
  assert fragments.shape == (400, ds.FRAGMENTS_PER_SCENE[1])
  for i in range(400):
    words = ds.decode(scenes["question"][i]).split()
    banned = set(scenes["cells"][i][scenes["cells"][i] >= 0])
    if words[0] == "is":
      banned.add(int(words[3]))
    assert not banned & set(fragments[i]), (i, banned, fragments[i])


# ----------------------------------------------------------------------------- TFDS, pipeline


def test_tiny_builds_and_reads_through_tfds_without_tensorflow(tiny_dir):
  source = tfds.data_source("digit_scenes/tiny", split="train", data_dir=tiny_dir)
  assert len(source) == 1_000
  assert len(tfds.data_source("digit_scenes/tiny", split="test", data_dir=tiny_dir)) == 300
  generated = ds.generate_split("train", 1_000)
  for i in (0, 7, 999):
    example = source[i]
    assert example["image"].shape == (96, 96, 1) and example["image"].dtype == np.uint8
    assert example["question"].shape == (ds.QUESTION_LENGTH,)
    for key in ("question", "cells", "glyph_ids"):
      assert example[key].dtype == np.int32, key
    for key in ("question", "answer", "qtype", "cells", "glyph_ids"):
      # TFDS reads scalars (answer, qtype, label) as Python ints; the pipeline makes them int32.
      np.testing.assert_array_equal(example[key], generated[key][i])
    np.testing.assert_array_equal(example["image"], generated["image"][i])
    assert example["label"] == generated["label"][i]
    # The encoder's pretraining labels: whether each digit is in the scene.
    present = [example[key] for key in ds.PRESENCE_KEYS]
    assert present == [int(d in generated["cells"][i]) for d in range(10)], (i, present)
  assert "tensorflow" not in sys.modules


def _config(tiny_dir, **overrides):
  return {"name": "digit_scenes/tiny", "data_dir": tiny_dir, "image_size": 96,
          "shuffle": False, "worker_count": 0, **overrides}


def test_pipeline_batches_carry_question_answer_qtype_and_cells(tiny_dir):
  info = pipeline.dataset_info(_config(tiny_dir))
  assert info.num_classes == len(ds.ANSWERS) and info.image_shape == (96, 96, 1)
  raw = tfds.data_source("digit_scenes/tiny", split="train", data_dir=tiny_dir)
  records = [raw[i] for i in range(8)]
  batch = next(pipeline.train_iterator(_config(tiny_dir), global_batch_size=8, seed=0,
                                       process_index=0, process_count=1))
  assert batch["image"].shape == (8, 96, 96, 1) and batch["image"].dtype == np.float32
  expected = {"question": (8, ds.QUESTION_LENGTH), "answer": (8,), "qtype": (8,),
              "cells": (8, 9)}
  for key, shape in expected.items():
    assert batch[key].shape == shape and batch[key].dtype == np.int32, key
    np.testing.assert_array_equal(batch[key], np.stack([r[key] for r in records]))
  np.testing.assert_allclose(batch["image"],
                             np.stack([r["image"] for r in records]) / 127.5 - 1, atol=1e-6)
  np.testing.assert_array_equal(batch["labels"].argmax(1), [r["label"] for r in records])
  assert set(batch) == {"image", "labels", *expected}

  # Evaluation: 12 examples in batches of 8; the padding rows are zeros with mask False.
  test = tfds.data_source("digit_scenes/tiny", split="test", data_dir=tiny_dir)
  batches = list(pipeline.eval_iterator(_config(tiny_dir, eval_examples=12),
                                        global_batch_size=8, process_index=0, process_count=1))
  assert len(batches) == 2 and batches[1]["mask"].tolist() == [True] * 4 + [False] * 4
  for key, shape in expected.items():
    column = np.concatenate([b[key] for b in batches])
    assert column.dtype == np.int32 and column.shape == (16, *shape[1:]), key
    np.testing.assert_array_equal(column[:12], np.stack([test[i][key] for i in range(12)]))
    assert not column[12:].any(), key


@pytest.mark.parametrize("setting", [
    {"flip": True}, {"random_resized_crop": True}, {"randaugment": "rand-m9-mstd0.5"},
    {"random_erasing": 0.25}, {"mixup_alpha": 0.8}, {"cutmix_alpha": 1.0}, {"crop_pct": 0.875},
])
def test_augmentations_that_change_answers_are_refused(tiny_dir, setting):
  (key, value), = setting.items()
  off = {"flip": False, "random_resized_crop": False, "randaugment": "''", "crop_pct": None}
  with pytest.raises(DataError, match=f"digit_scenes/tiny.*layout.*data.{key}="
                                      f"{off.get(key, 0)}"):
    pipeline.dataset_info(_config(tiny_dir, **setting))


def test_resizing_is_allowed(tiny_dir):
  # Resizing keeps the layout, so the answers hold; the default image_size (64) resizes.
  batch = next(pipeline.train_iterator(_config(tiny_dir, image_size=64, crop_pct=1.0),
                                       global_batch_size=4, seed=0, process_index=0,
                                       process_count=1))
  assert batch["image"].shape == (4, 64, 64, 1) and batch["cells"].shape == (4, 9)
