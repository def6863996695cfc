"""Clips through the input pipeline and the tasks that read them: the clip ops against the
image ops applied frame by frame with one random draw per clip, moving-digits batches against
the raw records (both labels side by side, padding, `frames`), the errors that name a setting,
multi-label classification counted by hand, VideoMAE's tube and frame masks, and an image
run's params inflated into a video run (`init_from.inflate`).

Data: the tiny moving-digits build (8 frames of 64x64x1, labels `label` and `direction`) and
the tiny cluttered-digits build (images), written to a temporary data_dir.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import video as video_config
from vitoken import convert, tasks, visualize
from vitoken.data import cluttered_digits, config as config_lib, moving_digits, ops, pipeline
from vitoken.engine import checkpoint as ckpt_lib
from vitoken.errors import ConfigError, DataError, InputError
from vitoken.models import masking
from vitoken.tasks import base as task_base, runs, videomae
from vitoken.train import trainer as trainer_lib

FRAMES, SIZE = moving_digits.FRAMES, moving_digits.CANVAS  # 8 frames of 64 x 64
KEYS = ("label", "direction")
CLASSES = (10, 8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  moving_digits.build(str(root), config="tiny")
  cluttered_digits.build(str(root), config="tiny")
  return str(root)


@pytest.fixture(scope="module")
def raw(data_dir):
  """The tiny build's records as written: {split: (clips, labels, directions)}."""
  out = {}
  for split, count in (("train", 8), ("test", 8)):
    source = tfds.data_source("moving_digits/tiny", split=split, data_dir=data_dir)
    records = [source[i] for i in range(count)]
    out[split] = (np.stack([r["image"] for r in records]),
                  np.array([r["label"] for r in records]),
                  np.array([r["direction"] for r in records]))
  return out


def _video(data_dir, **overrides):
  return {"name": "moving_digits/tiny", "data_dir": data_dir, "label_keys": KEYS,
          "shuffle": False, **overrides}


def _normalised(uint8):
  """(x / 255 - 0.5) / 0.5, the default mean and std, in float64."""
  return (np.asarray(uint8, np.float64) / 255.0 - 0.5) / 0.5


def _one_hots(*columns_and_classes):
  return np.concatenate([np.eye(n)[c] for c, n in columns_and_classes], axis=-1)


def _pil_resize(frame, size, resample=Image.BILINEAR):
  """A 3-channel uint8 frame resized by PIL (what ops.resize does to an image)."""
  h, w = size
  return np.asarray(Image.fromarray(frame).resize((w, h), resample))


def _clip(seed=0, shape=(5, 37, 29, 3)):
  """uint8 frames that all differ, so a frame cropped or resized as another shows."""
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ----------------------------------------------------------------------------- clip ops


def test_resize_and_centre_crops_of_a_clip_are_those_of_each_frame():
  clip = _clip()
  for interpolation, resample in (("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)):
    got = ops.resize(clip, (20, 24), interpolation)
    want = np.stack([_pil_resize(f, (20, 24), resample) for f in clip])
    assert got.shape == (5, 20, 24, 3)
    np.testing.assert_array_equal(got, want)
  # torchvision's CenterCrop: top = round(17 / 2) = 8, left = round(5 / 2) = 2 (half to even).
  np.testing.assert_array_equal(ops.center_crop(clip, (20, 24)), clip[:, 8:28, 2:26])
  # Larger than the frames: zero-padded on both sides of H (3 = 1 + 2) and W (6 = 3 + 3).
  padded = ops.center_crop(clip, (40, 35))
  assert padded.shape == (5, 40, 35, 3)
  np.testing.assert_array_equal(padded[:, 1:38, 3:32], clip)
  assert not padded[:, :1].any() and not padded[:, 38:].any() and not padded[:, :, :3].any()
  np.testing.assert_array_equal(ops.resize_center_crop(clip, 16, 0.875, "bicubic"),
                                np.stack([ops.resize_center_crop(f, 16, 0.875, "bicubic")
                                          for f in clip]))


def test_random_resized_crop_of_a_clip_uses_one_box_for_every_frame():
  clip = _clip(1)
  boxes = set()
  for seed in range(8):
    rng = np.random.default_rng(seed)
    got = ops.random_resized_crop(clip, (16, 12), rng)
    reference_rng = np.random.default_rng(seed)
    top, left, h, w = ops.random_resized_crop_box(37, 29, reference_rng)
    boxes.add((top, left, h, w))
    want = np.stack([_pil_resize(f[top:top + h, left:left + w], (16, 12)) for f in clip])
    np.testing.assert_array_equal(got, want)
    # One draw for the clip, not one per frame: both generators are at the same point.
    assert rng.random() == reference_rng.random()
  assert len(boxes - {(0, 0, 37, 29)}) >= 6  # real crops, each seed its own


def test_flips_of_a_clip_flip_every_frame_or_none():
  clip = _clip(2)
  np.testing.assert_array_equal(ops.flip(clip), clip[:, :, ::-1])
  outcomes = set()
  for seed in range(10):
    flipped = np.random.default_rng(seed).random() < 0.5
    want = clip[:, :, ::-1] if flipped else clip
    np.testing.assert_array_equal(ops.random_flip(clip, np.random.default_rng(seed)), want)
    outcomes.add(flipped)
  assert outcomes == {True, False}


def test_cutmix_pastes_one_box_into_every_frame_from_the_same_frame_of_the_partner():
  rng = np.random.default_rng(3)
  images = rng.normal(size=(4, 3, 16, 12, 2)).astype(np.float32)
  targets = _one_hots((np.array([0, 1, 2, 3]), 5), (np.array([1, 0, 1, 0]), 2)).astype(np.float32)
  got, mixed, lam = ops.cutmix(images, targets, 0.6, np.random.default_rng(4))
  y0, y1, x0, x1 = ops.cutmix_box(16, 12, 0.6, np.random.default_rng(4))
  area = (y1 - y0) * (x1 - x0)
  assert 0 < area < 16 * 12
  want = images.copy()
  want[:, :, y0:y1, x0:x1] = images[::-1, :, y0:y1, x0:x1]
  np.testing.assert_array_equal(got, want)
  assert lam == pytest.approx(1 - area / (16 * 12))
  np.testing.assert_allclose(mixed, targets * lam + targets[::-1] * (1 - lam), rtol=1e-6)
  # Each key's mixed one-hot still sums to one.
  np.testing.assert_allclose(mixed[:, :5].sum(-1), 1, rtol=1e-6)
  np.testing.assert_allclose(mixed[:, 5:].sum(-1), 1, rtol=1e-6)


@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
def test_random_erasing_erases_one_box_with_one_fill_in_every_frame(mode):
  images = np.random.default_rng(5).normal(size=(6, 4, 20, 16, 3)).astype(np.float32)
  got = ops.random_erasing(images.copy(), np.random.default_rng(6), 1.0, mode, max_count=2)
  # timm's draws, in numpy: boxes of a clip, then each box's fill, once for all frames.
  rng, want = np.random.default_rng(6), images.copy()
  for clip in want:
    for top, left, h, w in ops.random_erasing_boxes(20, 16, rng, 1.0, 2):
      fill = (rng.standard_normal((h, w, 3), dtype=np.float32) if mode == "pixel"
              else rng.standard_normal(3, dtype=np.float32) if mode == "rand" else 0.0)
      clip[:, top:top + h, left:left + w] = fill
  np.testing.assert_array_equal(got, want)
  erased = got != images
  assert erased.any(axis=(1, 2, 3, 4)).all()  # probability 1: every clip has a box
  assert np.all(erased == erased[:, :1])  # the same pixels in every frame
  np.testing.assert_array_equal(np.where(erased, got, 0), np.where(erased, got[:, :1], 0))


# ----------------------------------------------------------------------------- the pipeline


def test_dataset_info_of_clips_with_two_label_keys(data_dir):
  info = pipeline.dataset_info(_video(data_dir))
  assert info.image_shape == (FRAMES, SIZE, SIZE, 1) and info.frames == FRAMES
  assert info.image_size == (SIZE, SIZE) and info.num_classes == 18
  assert info.label_classes == (("label", 10), ("direction", 8)) == info.label_splits()
  assert (info.train_examples, info.eval_examples) == (200, 64)
  one = pipeline.dataset_info(_video(data_dir, label_keys=("label",)))
  assert one.num_classes == 10 and one.label_splits() == (("label", 10),)
  images = pipeline.dataset_info({"name": "cluttered_digits/tiny", "data_dir": data_dir})
  assert images.frames is None and images.image_size == (64, 64)
  assert images.label_splits() == (("label", images.num_classes),)


def test_clip_batches_hold_the_clips_and_their_labels_side_by_side(data_dir, raw):
  clips, label, direction = raw["train"]
  batch = next(pipeline.train_iterator(_video(data_dir), global_batch_size=4, seed=0))
  assert batch["image"].shape == (4, FRAMES, SIZE, SIZE, 1) and batch["image"].dtype == np.float32
  np.testing.assert_allclose(batch["image"], _normalised(clips[:4]), atol=1e-6)
  np.testing.assert_array_equal(batch["labels"], _one_hots((label[:4], 10), (direction[:4], 8)))
  # The keys' order is the config's.
  swapped = next(pipeline.train_iterator(_video(data_dir, label_keys=("direction", "label")),
                                         global_batch_size=4, seed=0))
  np.testing.assert_array_equal(swapped["labels"], _one_hots((direction[:4], 8), (label[:4], 10)))


def test_eval_clips_are_padded_with_all_zero_labels_and_mask_false(data_dir, raw):
  clips, label, direction = raw["test"]
  batches = list(pipeline.eval_iterator(_video(data_dir, eval_examples=6), global_batch_size=4))
  assert len(batches) == 2
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["labels"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, [True] * 6 + [False] * 2)
  np.testing.assert_allclose(images[:6], _normalised(clips[:6]), atol=1e-6)
  np.testing.assert_array_equal(labels[:6], _one_hots((label[:6], 10), (direction[:6], 8)))
  assert images.shape == (8, FRAMES, SIZE, SIZE, 1)
  np.testing.assert_array_equal(labels[6:], 0)  # no class at all, for either key
  np.testing.assert_allclose(images[6:], -1.0)  # zero pixels, normalised


@pytest.mark.parametrize("frames", [1, 3])
def test_frames_keeps_the_first_frames_of_each_clip(data_dir, raw, frames):
  config = _video(data_dir, frames=frames, eval_examples=4)
  assert pipeline.dataset_info(config).image_shape == (frames, SIZE, SIZE, 1)
  train = next(pipeline.train_iterator(config, global_batch_size=2, seed=0))
  assert train["image"].shape == (2, frames, SIZE, SIZE, 1)
  np.testing.assert_allclose(train["image"], _normalised(raw["train"][0][:2, :frames]), atol=1e-6)
  (evaluation,) = list(pipeline.eval_iterator(config, global_batch_size=4))
  np.testing.assert_allclose(evaluation["image"], _normalised(raw["test"][0][:4, :frames]),
                             atol=1e-6)
  np.testing.assert_array_equal(evaluation["labels"],
                                _one_hots((raw["test"][1][:4], 10), (raw["test"][2][:4], 8)))


@pytest.mark.parametrize("frames, first, want", [(1, 4, [4]), (None, 5, [5, 6, 7]),
                                                 (2, 6, [6, 7])])
def test_first_frame_picks_where_the_kept_frames_start(data_dir, raw, frames, first, want):
  config = _video(data_dir, frames=frames, first_frame=first, eval_examples=2)
  assert pipeline.dataset_info(config).image_shape == (len(want), SIZE, SIZE, 1)
  train = next(pipeline.train_iterator(config, global_batch_size=2, seed=0))
  np.testing.assert_allclose(train["image"], _normalised(raw["train"][0][:2, want]), atol=1e-6)
  (evaluation,) = list(pipeline.eval_iterator(config, global_batch_size=2))
  np.testing.assert_allclose(evaluation["image"], _normalised(raw["test"][0][:2, want]),
                             atol=1e-6)


def test_random_resized_crops_in_the_pipeline_share_one_box_per_clip(data_dir, raw, monkeypatch):
  """Every train clip is the resize of one box of all its raw frames, a box the pipeline drew."""
  drawn = []
  box_of = ops.random_resized_crop_box

  def recording(*args, **kwargs):
    box = box_of(*args, **kwargs)
    drawn.append(box)
    return box

  monkeypatch.setattr(ops, "random_resized_crop_box", recording)
  config = _video(data_dir, random_resized_crop=True, image_size=32)
  batch = next(pipeline.train_iterator(config, global_batch_size=4, seed=3))
  assert batch["image"].shape == (4, FRAMES, 32, 32, 1)
  found = []
  for clip, got in zip(raw["train"][0][:4], batch["image"]):
    matches = [(top, left, h, w) for top, left, h, w in set(drawn)
               if np.allclose(got, _normalised(ops.resize(clip[:, top:top + h, left:left + w],
                                                          32)), atol=1e-6)]
    assert matches, "no single crop box gives all the frames of this clip"
    found.append(matches[0])
  assert any(box != (0, 0, SIZE, SIZE) for box in found)  # the crops were real crops


# ----------------------------------------------------------------------------- errors


def test_flip_is_refused_with_the_direction_label(data_dir):
  with pytest.raises(ConfigError, match=r"flip=True.*direction.*data\.flip=False"):
    config_lib.Settings.parse(_video(data_dir, flip=True))
  with pytest.raises(ConfigError, match="flip"):
    pipeline.train_iterator(_video(data_dir, flip=True), global_batch_size=2, seed=0)
  # The digit alone is not mirrored by a flip: allowed.
  assert config_lib.Settings.parse(_video(data_dir, flip=True, label_keys=("label",))).flip


@pytest.mark.parametrize("overrides, error, message", [
    ({"name": "cluttered_digits/tiny", "label_keys": ("label",), "frames": 4}, DataError,
     r"data\.frames=4.*holds images, not clips"),
    ({"frames": 9}, DataError, r"data\.frames=9.*clips of 8 frames"),
    ({"frames": 2, "first_frame": 7}, DataError, r"data\.frames=2.*first_frame=7.*clips of 8"),
    ({"label_keys": ("label", "speed")}, DataError, r"no 'speed' feature.*'direction'"),
    ({"label_keys": ("label", "image")}, DataError, r"'image' is not a class label"),
    ({"randaugment": "rand-m9-mstd0.5"}, DataError, r"RandAugment is for images.*clips"),
    ({"label_keys": ("label", "label")}, ConfigError, "distinct feature names"),
    ({"label_keys": ()}, ConfigError, "label_keys must be a non-empty tuple"),
    ({"frames": 0}, ConfigError, "frames must be None or a positive int"),
])
def test_clip_settings_that_cannot_work_name_the_setting(data_dir, overrides, error, message):
  config = _video(data_dir, **overrides)
  with pytest.raises(error, match=message):
    pipeline.dataset_info(config)
  with pytest.raises(error, match=message):
    pipeline.train_iterator(config, global_batch_size=2, seed=0)


def test_an_image_folder_refuses_clip_settings(tmp_path):
  for split in ("train", "test"):
    for name in ("a", "b"):
      (tmp_path / split / name).mkdir(parents=True)
      Image.fromarray(np.full((8, 8), 7, np.uint8), "L").save(tmp_path / split / name / "0.png")
  folder = {"folder": str(tmp_path), "image_size": 8}
  assert pipeline.dataset_info(folder).label_splits() == (("label", 2),)
  with pytest.raises(DataError, match=r"label_keys=\('label', 'direction'\).*one label"):
    pipeline.dataset_info({**folder, "label_keys": KEYS})
  with pytest.raises(DataError, match=r"data\.frames=2.*an image folder holds images"):
    pipeline.dataset_info({**folder, "frames": 2})


# ----------------------------------------------------------------------------- classification


def _classification(label_smoothing=0.0, label_classes=(("label", 3), ("direction", 2))):
  info = pipeline.DataInfo(num_classes=5, image_shape=(8, 8, 1), train_examples=0,
                           eval_examples=0, label_classes=label_classes)
  config = ml_collections.ConfigDict({
      "model": {"variant": "Ti/8", "width": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32},
      "task": {"name": "classification"}, "label_smoothing": label_smoothing,
      "eval_model_overrides": {}})
  return tasks.build(config, info)


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  z = x - x.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


# Rows 0-3 are examples; rows 4 and 5 are padding (mask False, all-zero labels), one of them
# with NaN logits, which must not reach a sum. Per key (label: columns 0-2, direction: 3-4)
# the argmaxes are right for label in rows 0, 1, 2 and for direction in rows 0, 3, so the
# accuracies differ (3/4, 2/4); the argmax over all 5 columns would give other counts.
LOGITS = np.array([[2.0, 0.1, -1.0, 0.3, 0.2],
                   [0.0, 1.5, 0.2, 3.0, 0.1],
                   [0.1, -0.5, 0.9, 0.6, 0.5],
                   [0.1, 0.3, 0.4, -2.0, 4.0],
                   [9.0, 0.0, 0.0, 0.0, 0.0],
                   [np.nan, 0.0, 0.0, 0.0, 0.0]], np.float32)
LABEL, DIRECTION = np.array([0, 1, 2, 0]), np.array([0, 1, 1, 1])


def _eval_batch():
  labels = np.zeros((6, 5), np.float32)
  labels[:4] = _one_hots((LABEL, 3), (DIRECTION, 2))
  return {"image": np.zeros((6, 8, 8, 1), np.float32), "labels": labels,
          "mask": np.array([True] * 4 + [False] * 2)}


def test_multi_label_eval_sums_each_key_and_leaves_padding_out(monkeypatch):
  task = _classification()
  monkeypatch.setattr(task, "apply", lambda *a, **k: (jnp.asarray(LOGITS), {}))
  sums = {k: float(v) for k, v in task.eval_sums(None, {}, _eval_batch(), None).items()}
  ce_label = -_log_softmax(LOGITS[:4, :3])[np.arange(4), LABEL]
  ce_direction = -_log_softmax(LOGITS[:4, 3:])[np.arange(4), DIRECTION]
  right_label = LOGITS[:4, :3].argmax(-1) == LABEL
  right_direction = LOGITS[:4, 3:].argmax(-1) == DIRECTION
  assert (right_label.sum(), right_direction.sum()) == (3, 2)
  want = {"count": 4.0,
          "accuracy/label_sum": 3.0, "accuracy/direction_sum": 2.0,
          "loss/label_sum": ce_label.sum(), "loss/direction_sum": ce_direction.sum(),
          "loss_sum": ce_label.sum() + ce_direction.sum(), "accuracy_sum": 2.5}
  assert set(sums) == set(want)
  for key, value in want.items():
    assert sums[key] == pytest.approx(value, rel=1e-5), key
  summary = task.eval_summary(sums)
  assert summary["accuracy/label"] == pytest.approx(0.75)
  assert summary["accuracy/direction"] == pytest.approx(0.5)
  assert summary["accuracy"] == pytest.approx(0.625)  # the keys' mean
  assert summary["loss"] == pytest.approx((ce_label + ce_direction).mean(), rel=1e-5)
  assert summary["loss/direction"] == pytest.approx(ce_direction.mean(), rel=1e-5)
  assert summary["examples"] == 4


def test_multi_label_training_loss_is_the_sum_of_per_key_smoothed_cross_entropies(monkeypatch):
  s = 0.2
  task = _classification(label_smoothing=s)
  logits, batch = LOGITS[:4], {"labels": _eval_batch()["labels"][:4]}
  ce, accuracy, metrics = task.classification_terms(jnp.asarray(logits), batch)

  def smoothed_ce(lg, y):  # smoothing spread over the key's own classes
    y = y * (1 - s) + s / y.shape[-1]
    return -(y * _log_softmax(lg)).sum(-1).mean()

  want_label = smoothed_ce(logits[:, :3], np.eye(3)[LABEL])
  want_direction = smoothed_ce(logits[:, 3:], np.eye(2)[DIRECTION])
  assert float(ce) == pytest.approx(want_label + want_direction, rel=1e-5)
  assert float(accuracy) == pytest.approx(0.625)
  assert set(metrics) == {"loss/ce/label", "loss/ce/direction", "accuracy/label",
                          "accuracy/direction"}
  assert float(metrics["loss/ce/label"]) == pytest.approx(want_label, rel=1e-5)
  assert float(metrics["loss/ce/direction"]) == pytest.approx(want_direction, rel=1e-5)
  assert float(metrics["accuracy/label"]) == 0.75 and float(metrics["accuracy/direction"]) == 0.5
  # Through `loss`, as the trainer calls it.
  monkeypatch.setattr(task, "apply", lambda *a, **k: (jnp.asarray(logits), {}))
  total, logged = task.loss(None, {}, batch, None, 0, None)
  assert float(total) == pytest.approx(want_label + want_direction, rel=1e-5)
  assert float(logged["loss"]) == float(total) and float(logged["accuracy"]) == 0.625
  assert float(logged["accuracy/direction"]) == 0.5
  # One key: one softmax over all five classes, no per-key metrics.
  single = _classification(label_smoothing=s, label_classes=())
  y = np.zeros((4, 5))
  y[np.arange(4), [0, 4, 2, 3]] = 1
  ce, accuracy, metrics = single.classification_terms(jnp.asarray(logits), {"labels": y})
  assert metrics == {} and float(ce) == pytest.approx(smoothed_ce(logits, y), rel=1e-5)
  assert float(accuracy) == pytest.approx(np.mean(logits.argmax(-1) == [0, 4, 2, 3]))


# ----------------------------------------------------------------------------- VideoMAE


def _videomae(mask_ratio=0.75, masking_kind="tube", image_shape=(FRAMES, 32, 32, 1),
              norm_target=True):
  info = pipeline.DataInfo(num_classes=0, image_shape=image_shape, train_examples=0,
                           eval_examples=0)
  config = ml_collections.ConfigDict({
      "model": {"variant": "Ti/8", "width": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32,
                "patch_size": (4, 8, 8)},
      "task": {"name": "videomae", "mask_ratio": mask_ratio, "masking": masking_kind,
               "decoder_width": 16, "decoder_depth": 1, "decoder_heads": 2,
               "norm_target": norm_target},
      "eval_model_overrides": {}})
  return tasks.build(config, info)


def test_tube_masks_hide_the_same_positions_in_every_slice():
  task = _videomae()
  fields = task.batch_fields()
  assert isinstance(fields, videomae.ClipMasks)
  # 8 frames in tubelets of 4: 2 slices of 4 x 4 positions; int(0.75 * 16) = 12 masked.
  assert (fields.frames, fields.positions, fields.count) == (2, 16, 12)
  batch = {"image": np.zeros((5, FRAMES, 32, 32, 1), np.float32)}
  mask = fields(dict(batch), np.random.default_rng(7))["tube_mask"]
  assert mask.shape == (5, 32) and mask.dtype == np.float32
  per_slice = mask.reshape(5, 2, 16)
  assert np.all(per_slice == per_slice[:, :1]) and np.all(per_slice.sum(-1) == 12)
  # The 12 positions of highest noise, as masking.tube_mask (VideoMAE's reference) ranks them.
  noise = np.random.default_rng(7).random((5, 1, 16), dtype=np.float32)[:, 0]
  np.testing.assert_array_equal(mask, np.asarray(masking.tube_mask(noise, 0.75, frames=2)))
  # Determinism: the same generator position gives the same masks; another one others.
  again = fields(dict(batch), np.random.default_rng(7))["tube_mask"]
  np.testing.assert_array_equal(again, mask)
  assert not np.array_equal(fields(dict(batch), np.random.default_rng(8))["tube_mask"], mask)


def test_frame_masks_draw_the_same_count_anew_in_each_slice():
  fields = _videomae(masking_kind="frame").batch_fields()
  batch = {"image": np.zeros((6, FRAMES, 32, 32, 1), np.float32)}
  mask = fields(dict(batch), np.random.default_rng(9))["tube_mask"]
  per_slice = mask.reshape(6, 2, 16)
  assert np.all(per_slice.sum(-1) == 12)
  assert all(not np.array_equal(clip[0], clip[1]) for clip in per_slice)
  noise = np.random.default_rng(9).random((6, 2, 16), dtype=np.float32)
  for s in range(2):  # each slice is a one-slice tube mask of its own noise
    np.testing.assert_array_equal(per_slice[:, s],
                                  np.asarray(masking.tube_mask(noise[:, s], 0.75, frames=1)))
  np.testing.assert_array_equal(fields(dict(batch), np.random.default_rng(9))["tube_mask"], mask)


def test_pipeline_masks_are_reproduced_from_the_data_position(data_dir):
  fields = _videomae(image_shape=(FRAMES, SIZE, SIZE, 1)).batch_fields()
  config = _video(data_dir, shuffle=True, eval_examples=4)

  def masks(seed):
    it = pipeline.train_iterator(config, global_batch_size=2, seed=seed, labels=False,
                                 batch_fields=fields)
    return [next(it) for _ in range(2)]

  first, second = masks(0), masks(0)
  assert "labels" not in first[0] and first[0]["tube_mask"].shape == (2, 2 * 64)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a["tube_mask"], b["tube_mask"])
    np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(first[0]["tube_mask"], first[1]["tube_mask"])
  assert not np.array_equal(masks(1)[0]["tube_mask"], first[0]["tube_mask"])
  assert np.all(first[0]["tube_mask"].reshape(2, 2, 64).sum(-1) == 48)
  evals = [next(pipeline.eval_iterator(config, global_batch_size=4, labels=False,
                                       batch_fields=fields))["tube_mask"] for _ in range(2)]
  np.testing.assert_array_equal(evals[0], evals[1])


def test_videomae_refuses_images_and_a_ratio_that_masks_nothing():
  with pytest.raises(ConfigError, match=r"videomae pretrains on clips.*\(32, 32, 1\)"):
    _videomae(image_shape=(32, 32, 1))
  # 16 positions per slice: int(0.05 * 16) = 0.
  with pytest.raises(ConfigError, match="masks nothing"):
    _videomae(mask_ratio=0.05)
  with pytest.raises(ConfigError, match="masking must be one of"):
    _videomae(masking_kind="random")


def test_clip_previews_show_original_masked_and_reconstruction_rows(tmp_path):
  rng = np.random.default_rng(10)
  original = rng.normal(size=(1, 2, 4, 4, 1)).astype(np.float32)
  reconstruction = rng.normal(size=original.shape).astype(np.float32)
  pixel_mask = np.zeros(original.shape, np.float32)
  pixel_mask[:, :, :2] = 1  # the top halves are masked
  grid = visualize.clip_reconstruction_grid(original, pixel_mask, reconstruction, gap=1)
  assert grid.shape == (3 * 4 + 2, 2 * 4 + 1, 3) and grid.dtype == np.uint8
  lo, hi = float(original.min()), float(original.max())

  def px(a):
    return np.round(np.clip((a - lo) / (hi - lo), 0, 1) * 255)

  for t in range(2):
    x = slice(5 * t, 5 * t + 4)
    np.testing.assert_array_equal(grid[0:4, x, 0], px(original[0, t, ..., 0]))
    np.testing.assert_array_equal(grid[5:7, x, 0], 128)  # masked: grey (0.5)
    np.testing.assert_array_equal(grid[7:9, x, 0], px(original[0, t, 2:, ..., 0]))
    np.testing.assert_array_equal(grid[10:12, x, 0], px(reconstruction[0, t, :2, ..., 0]))
    np.testing.assert_array_equal(grid[12:14, x, 0], px(original[0, t, 2:, ..., 0]))
  np.testing.assert_array_equal(grid[4], 255)  # the separators are white
  task = _videomae()
  task.write_preview({"original": original, "pixel_mask": pixel_mask,
                      "reconstruction": reconstruction}, str(tmp_path), 6)
  for name in ("reconstructions.png", "reconstructions_000006.png"):
    picture = np.asarray(Image.open(tmp_path / "previews" / name))
    scale = 128 // 4
    np.testing.assert_array_equal(picture[::scale, ::scale],
                                  visualize.clip_reconstruction_grid(original, pixel_mask,
                                                                     reconstruction))


def _numpy_tubes(clips, t=4, p=8):
  """[B, T, H, W, C] -> [B, T/t * H/p * W/p, t*p*p*C]: tokens time-major, each tubelet
  flattened (time, row, column, channel), VideoMAE's `(p0 p1 p2 c)`."""
  b, frames, h, w, c = clips.shape
  x = clips.reshape(b, frames // t, t, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, -1, t * p * p * c)


def _numpy_clips(tubes, shape, t=4, p=8):
  b, frames, h, w, c = shape
  x = tubes.reshape(b, frames // t, h // p, w // p, t, p, p, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(shape)


@pytest.mark.parametrize("norm_target", [False, True])
def test_videomae_preview_pastes_the_visible_tubelets_and_shows_the_predicted_ones(norm_target):
  """The preview's reconstruction: the input where the tubelets were visible, the model's
  prediction (un-normalised per tubelet with norm_target) where they were masked."""
  task = _videomae(norm_target=norm_target)
  rng = np.random.default_rng(12)
  batch = task.batch_fields()({"image": rng.normal(size=(2, FRAMES, 32, 32, 1))
                               .astype(np.float32)}, rng)
  params = task.init_params(jax.random.key(0), batch)
  out = jax.tree.map(np.asarray, task.preview(params, batch))
  _, pred, mask = task.apply(params, batch, None, train=False)
  pred, mask = np.asarray(pred, np.float64), np.asarray(mask)
  np.testing.assert_array_equal(mask, batch["tube_mask"])
  pixels = np.asarray(batch["image"], np.float64) * 0.5 + 0.5  # the data's mean and std
  tubes = _numpy_tubes(pixels)
  if norm_target:  # the prediction is in per-tubelet normalised units
    order = np.argsort(1 - mask, axis=1, kind="stable")[:, :pred.shape[1]]
    own = np.take_along_axis(tubes, order[..., None], axis=1)
    pred = pred * (own.std(-1, ddof=1, keepdims=True) + 1e-6) + own.mean(-1, keepdims=True)
  for b in range(2):
    tubes[b, np.flatnonzero(mask[b])] = pred[b]
  want = (_numpy_clips(tubes, pixels.shape) - 0.5) / 0.5
  pixel_mask = _numpy_clips(np.repeat(mask[..., None], 4 * 8 * 8, axis=-1), pixels.shape)
  np.testing.assert_array_equal(out["pixel_mask"], pixel_mask)
  visible = pixel_mask == 0
  assert visible.mean() == pytest.approx(1 - 12 / 16)
  np.testing.assert_allclose(out["reconstruction"][visible], batch["image"][visible], atol=1e-5,
                             err_msg="visible tubelets are not the input")
  np.testing.assert_allclose(out["reconstruction"][~visible], want[~visible], atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(out["masked"], batch["image"] * (1 - pixel_mask))


@pytest.mark.parametrize("name, fields", [
    ("mae", {"decoder_width": 16, "decoder_depth": 1, "decoder_heads": 2}),
    ("simmim", {"mask_patch_size": 16}),
])
def test_image_pretraining_tasks_refuse_clips_by_name(name, fields):
  """MAE and SimMIM pretrain on images; on clip data the error must say so. (SimMIM reads the
  clip's (T, H) = (8, 64) as the image size and says "mask_patch_size 16 does not divide the
  image size 8x64": the image tasks take `info.image_shape[:2]`.)"""
  info = pipeline.DataInfo(num_classes=0, image_shape=(FRAMES, 64, 64, 1), train_examples=0,
                           eval_examples=0)
  config = ml_collections.ConfigDict({
      "model": {"variant": "Ti/8", "width": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32},
      "task": {"name": name, **fields}, "eval_model_overrides": {}})
  with pytest.raises((ConfigError, InputError), match="clip"):
    task = tasks.build(config, info)
    jax.eval_shape(task.init_params, jax.random.key(0), task.example_batch())


# ----------------------------------------------------------------------------- inflation

NARROW = dict(width=32, mlp_dim=64, depth=2)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
  """An image run's workdir as the trainer writes it (config + params checkpoint), untrained:
  configs/video.py's image stage, narrowed; its params randomised so that nothing is zero."""
  config = video_config.get_config("stage=image,runlocal")
  config.model.update(NARROW)
  info = pipeline.DataInfo(num_classes=10, image_shape=(64, 64, 1), train_examples=0,
                           eval_examples=0)
  model = task_base.vit_from_config(config.model, info)
  params = model.init(jax.random.key(0), np.zeros((1, 64, 64, 1), np.float32))["params"]
  leaves, tree = jax.tree.flatten(params)
  rngs = np.random.default_rng(11)
  params = jax.tree.unflatten(tree, [np.asarray(x) + rngs.normal(size=x.shape).astype(np.float32)
                                     * 0.1 for x in leaves])
  workdir = tmp_path_factory.mktemp("image_run")
  checkpointer = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), every_steps=1, keep=1,
                                       async_save=False)
  meta = {"step": 1, "config": config.to_dict(), "process_count": 1,
          "format_version": ckpt_lib.FORMAT_VERSION}
  checkpointer.save(1, {"step": np.int32(1), "params": params}, None, meta, force=True)
  checkpointer.close()
  return str(workdir), model, params


def _video_model(**fields):
  config = video_config.get_config("runlocal")
  config.model.update(NARROW, **fields)
  info = pipeline.DataInfo(num_classes=18, image_shape=(FRAMES, 64, 64, 1), train_examples=0,
                           eval_examples=0, label_classes=tuple(zip(KEYS, CLASSES)))
  return task_base.vit_from_config(config.model, info)


@pytest.mark.parametrize("kernel", ["central", "average"])
def test_inflated_params_are_the_image_runs_inflated(image_run, kernel):
  workdir, image_model, params = image_run
  video = _video_model()
  assert tuple(video.patch_size) == (4, 8, 8)
  got = runs.inflated_params(workdir, video, (FRAMES, 64, 64, 1), kernel=kernel)
  _, want = convert.inflate(image_model, params, num_frames=FRAMES, tubelet=4, kernel=kernel,
                            image_size=(64, 64), posemb=video.posemb,
                            prefix_per_slice=video.prefix_per_slice)
  flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  assert flat_got.keys() == flat_want.keys()
  for path, value in flat_want.items():
    np.testing.assert_array_equal(np.asarray(flat_got[path]), np.asarray(value), str(path))
  # By hand: the tubelet kernel and the table tiled over the 2 time slices.
  image_kernel = np.asarray(params["embedding"]["kernel"])
  kernel_got = np.asarray(got["embedding"]["kernel"])
  assert kernel_got.shape == (4, 8, 8, 1, 32)
  if kernel == "central":
    np.testing.assert_array_equal(kernel_got[2], image_kernel)
    assert not kernel_got[[0, 1, 3]].any()
  else:
    np.testing.assert_allclose(kernel_got, np.repeat(image_kernel[None] / 4, 4, axis=0),
                               rtol=1e-6)
  table = np.asarray(params["pos_embedding"])
  np.testing.assert_array_equal(np.asarray(got["pos_embedding"]), np.tile(table, (1, 2, 1)))
  # They fit the video model, except the image head (the run's init_from excludes it).
  expected = jax.eval_shape(video.init, jax.random.key(0),
                            jnp.zeros((1, FRAMES, 64, 64, 1)))["params"]
  shapes = {p: v.shape for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
  mismatched = {jax.tree_util.keystr(p) for p in shapes
                if p not in flat_got or flat_got[p].shape != shapes[p]}
  assert mismatched == {"['head']['kernel']", "['head']['bias']"}


def test_inflating_refuses_another_spatial_patch_or_an_image_model(image_run):
  workdir, _, _ = image_run
  with pytest.raises(ConfigError, match=r"\(8, 8\) patches, the video model \(16, 16\)"):
    runs.inflated_params(workdir, _video_model(patch_size=(4, 16, 16)), (FRAMES, 64, 64, 1))
  image_model = image_run[1]
  with pytest.raises(ConfigError, match=r"inflate needs a \(t, p, p\) patch and clips"):
    runs.inflated_params(workdir, image_model, (64, 64, 1))


def test_init_from_inflate_starts_the_video_run_from_the_inflated_params(image_run, data_dir,
                                                                         tmp_path):
  workdir, _, _ = image_run
  config = video_config.get_config(f"stage=inflate,init={workdir},runlocal")
  config.model.update(NARROW)
  config.data.data_dir = data_dir
  assert config.init_from.inflate == "central" and config.init_from.exclude == "^head/"
  trainer = trainer_lib.Trainer(config, str(tmp_path / "video_run"))
  step, state = trainer.initial_state(None)
  assert step == 0
  want = runs.inflated_params(workdir, trainer.task.backbone(), (FRAMES, 64, 64, 1))
  params = jax.device_get(state["params"])
  for path, value in jax.tree_util.tree_flatten_with_path(want)[0]:
    if jax.tree_util.keystr(path).startswith("['head']"):
      continue
    got = params
    for key in path:
      got = got[key.key]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(value),
                                  jax.tree_util.keystr(path))
  assert params["head"]["kernel"].shape == (32, 18)  # fresh: 10 digits + 8 directions


def test_budget_accuracy_of_a_two_label_run_is_the_mean_of_the_keys(data_dir, raw):
  """vitoken.bench.budget's accuracy (the budget picker, the experiments) reads each key's
  slice of the logits, not an argmax over all of them."""
  from vitoken.bench import budget  # pylint: disable=import-outside-toplevel
  data = _video(data_dir, eval_examples=8)
  labels, directions = raw["test"][1], raw["test"][2]

  def predict(clips):
    # The digit right for the first 6 clips, the direction for the first 3; the direction
    # logits are large, so an argmax over all 18 columns would always pick a direction.
    b = clips.shape[0]
    digit = np.eye(10)[np.where(np.arange(b) < 6, labels[:b], (labels[:b] + 1) % 10)]
    direction = np.eye(8)[np.where(np.arange(b) < 3, directions[:b], (directions[:b] + 1) % 8)]
    return np.concatenate([digit, 10 * direction], axis=-1)

  accuracy, examples = budget.predict_accuracy(predict, data, batch_size=8)
  assert examples == 8
  assert accuracy == pytest.approx((6 / 8 + 3 / 8) / 2)
