"""Image ops checked against numpy references: resize, crop, flip, normalize, mixup, cutmix."""
import io

import numpy as np
from PIL import Image
import pytest

from vitoken.data import ops


def _png(array, mode=None):
  buffer = io.BytesIO()
  Image.fromarray(array, mode).save(buffer, format="PNG")
  return buffer.getvalue()


# ----------------------------------------------------------------------------- decode


def test_decode_png_bytes_keeps_pixels_and_channels():
  rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  np.testing.assert_array_equal(ops.decode(_png(rgb)), rgb)
  gray = rgb[..., 0]
  decoded = ops.decode(_png(gray))
  assert decoded.shape == (5, 7, 1) and decoded.dtype == np.uint8
  np.testing.assert_array_equal(decoded[..., 0], gray)


def test_decode_converts_channels():
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
  np.testing.assert_array_equal(ops.decode(_png(gray), channels=3), np.repeat(gray[..., None], 3, -1))
  np.testing.assert_array_equal(ops.decode(gray, channels=3), np.repeat(gray[..., None], 3, -1))
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[..., 0] = 200
  assert ops.decode(rgba).shape == (2, 2, 3)
  # RGB -> 1 channel is PIL's luma whether the input is bytes or an array.
  rgb = np.random.default_rng(1).integers(0, 256, (4, 4, 3), dtype=np.uint8)
  np.testing.assert_array_equal(ops.decode(rgb, channels=1), ops.decode(_png(rgb), channels=1))


@pytest.mark.parametrize("value,error,pattern", [
    (np.zeros((4, 4, 3), np.float32), ValueError, "must be uint8, got float32"),
    (np.zeros((4, 4, 2), np.uint8), ValueError, r"got shape \(4, 4, 2\)"),
    ("image.png", TypeError, "cannot decode an image from str"),
])
def test_decode_rejects_bad_input(value, error, pattern):
  with pytest.raises(error, match=pattern):
    ops.decode(value)


# ----------------------------------------------------------------------------- resize


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("size,expected", [(6, (6, 6)), ((5, 40), (5, 40)), (32, (32, 32))])
def test_resize_constant_image_stays_constant(channels, size, expected):
  values = np.array([7, 90, 200, 255][:channels], np.uint8)
  image = np.broadcast_to(values, (17, 23, channels)).copy()
  out = ops.resize(image, size)
  assert out.shape == expected + (channels,) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.broadcast_to(values, out.shape))


def test_resize_to_same_size_is_identity():
  image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  assert ops.resize(image, 8) is image


def test_resize_downscale_is_antialiased():
  # A 1-pixel checkerboard shrunk 8x: a point-sampling resize gives 0 or 255, an
  # antialiased one the local mean.
  checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)[..., None]
  out = ops.resize(checker, 8).astype(np.float64)
  np.testing.assert_allclose(out, 127.5, atol=3)


def test_resize_upscale_matches_linear_interpolation():
  # Half-pixel-centred bilinear, 2x up: interior output pixels are 3/4-1/4 blends.
  row = np.array([[0, 100, 200, 100]], np.uint8)
  image = np.repeat(row, 4, axis=0)[..., None]
  out = ops.resize(image, (4, 8))[0, :, 0].astype(float)
  src = np.clip((np.arange(8) + 0.5) / 2 - 0.5, 0, 3)
  expected = np.interp(src, np.arange(4), row[0].astype(float))
  np.testing.assert_allclose(out, expected, atol=1)


# ----------------------------------------------------------------------------- crop, flip


def test_random_resized_crop_box_respects_bounds_scale_and_ratio():
  rng = np.random.default_rng(0)
  height, width = 120, 90
  for _ in range(300):
    top, left, crop_h, crop_w = ops.random_resized_crop_box(height, width, rng,
                                                            (0.2, 0.9), (3 / 4, 4 / 3))
    assert 0 <= top and top + crop_h <= height and 0 <= left and left + crop_w <= width
    # Rounding the sides to pixels moves area and ratio by at most ~1 pixel's worth.
    assert 0.2 * 0.95 <= crop_h * crop_w / (height * width) <= 0.9 * 1.05
    assert 3 / 4 * 0.95 <= crop_w / crop_h <= 4 / 3 * 1.05


def test_random_resized_crop_box_falls_back_to_central_crop():
  # No 90%-area crop with ratio <= 4/3 fits a 10x1000 strip: torchvision then takes the
  # widest allowed centred crop, h = 10, w = round(10 * 4/3).
  box = ops.random_resized_crop_box(10, 1000, np.random.default_rng(0), (0.9, 1.0),
                                    (3 / 4, 4 / 3))
  assert box == (0, (1000 - 13) // 2, 10, 13)
  box = ops.random_resized_crop_box(1000, 10, np.random.default_rng(0), (0.9, 1.0),
                                    (3 / 4, 4 / 3))
  assert box == ((1000 - 13) // 2, 0, 13, 10)


def test_random_resized_crop_output_and_content():
  image = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
  out = ops.random_resized_crop(image, 16, np.random.default_rng(3))
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  # Same generator, same box: the op is the box's crop resized.
  top, left, h, w = ops.random_resized_crop_box(40, 30, np.random.default_rng(3))
  np.testing.assert_array_equal(out, ops.resize(image[top:top + h, left:left + w], 16))


def test_flip():
  image = np.arange(2 * 3 * 2, dtype=np.uint8).reshape(2, 3, 2)
  np.testing.assert_array_equal(ops.flip(image), image[:, ::-1, :])
  flips = [ops.random_flip(image, np.random.default_rng(s))[0, 0, 0] != image[0, 0, 0]
           for s in range(200)]
  assert 60 < sum(flips) < 140


# ----------------------------------------------------------------------------- normalize


def test_normalize_matches_reference():
  images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  expected = (images / 255.0 - np.array(mean)) / np.array(std)
  out = ops.normalize(images, mean, std)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  # A one-element mean/std broadcasts; the defaults map [0, 255] onto [-1, 1].
  np.testing.assert_allclose(ops.normalize(np.array([0, 255], np.uint8), (0.5,), (0.5,)),
                             [-1, 1], atol=1e-6)


def test_one_hot_rejects_out_of_range_labels():
  np.testing.assert_array_equal(ops.one_hot(np.array([2, 0]), 3), [[0, 0, 1], [1, 0, 0]])
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
    ops.one_hot(np.array([3]), 3)


# ----------------------------------------------------------------------------- mixing


def _batch(size=6, height=10, width=12, classes=5):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(size, height, width, 3)).astype(np.float32)
  targets = ops.one_hot(np.arange(size) % classes, classes)
  return images, targets


def test_mixup_blends_with_the_reversed_batch():
  images, targets = _batch()
  mixed, mixed_targets = ops.mixup(images, targets, 0.3)
  np.testing.assert_allclose(mixed, 0.3 * images + 0.7 * images[::-1], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(mixed_targets, 0.3 * targets + 0.7 * targets[::-1], rtol=1e-6)
  np.testing.assert_allclose(mixed_targets.sum(-1), 1, rtol=1e-6)


@pytest.mark.parametrize("lam", [0.05, 0.3, 0.7, 0.95])
@pytest.mark.parametrize("seed", range(4))
def test_cutmix_label_lambda_is_the_pasted_area(lam, seed):
  batch, height, width = 4, 10, 12
  # Example b is the constant b: a pixel shows where it came from.
  images = np.broadcast_to(np.arange(batch, dtype=np.float32)[:, None, None, None],
                           (batch, height, width, 1)).copy()
  targets = ops.one_hot(np.arange(batch), batch)
  out, out_targets, used = ops.cutmix(images, targets, lam, np.random.default_rng(seed))
  pasted = out[0, ..., 0] == batch - 1  # example 0's partner is the last one
  assert np.all(out[0, ..., 0][~pasted] == 0)
  assert used == pytest.approx(1 - pasted.mean())
  np.testing.assert_allclose(out_targets[0], used * targets[0] + (1 - used) * targets[-1],
                             rtol=1e-6)
  np.testing.assert_allclose(out_targets.sum(-1), 1, rtol=1e-6)
  # The pasted region is one axis-aligned box of the reversed batch, in every example.
  rows, cols = np.flatnonzero(pasted.any(1)), np.flatnonzero(pasted.any(0))
  if pasted.any():
    assert pasted[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
  np.testing.assert_array_equal(out[..., 0] == images[::-1, ..., 0],
                                np.broadcast_to(pasted, (batch, height, width)))


def test_cutmix_box_area_follows_lambda_away_from_the_border():
  # timm: sides are int(side * sqrt(1 - lam)), halved around a uniform centre.
  height = width = 100
  rng = np.random.default_rng(0)
  y0, y1, x0, x1 = ops.cutmix_box(height, width, 0.75, rng)
  assert 0 <= y0 <= y1 <= height and 0 <= x0 <= x1 <= width
  assert y1 - y0 <= 50 and x1 - x0 <= 50


def test_mix_batch_switches_between_mixup_and_cutmix():
  images, targets = _batch()
  unchanged = ops.mix_batch(images, targets, np.random.default_rng(0), mixup_alpha=1.0,
                            cutmix_alpha=1.0, mix_prob=0.0)
  assert unchanged[0] is images and unchanged[1] is targets
  kinds = set()
  for seed in range(40):
    mixed, mixed_targets = ops.mix_batch(images, targets, np.random.default_rng(seed),
                                         mixup_alpha=0.8, cutmix_alpha=1.0)
    np.testing.assert_allclose(mixed_targets.sum(-1), 1, rtol=1e-5)
    # Cutmix only moves pixels; mixup blends them into values neither image had.
    moved = np.isclose(mixed, images) | np.isclose(mixed, images[::-1])
    kinds.add("cutmix" if moved.all() else "mixup")
  assert kinds == {"cutmix", "mixup"}


def test_mix_batch_without_alphas_is_a_no_op():
  images, targets = _batch()
  out = ops.mix_batch(images, targets, np.random.default_rng(0))
  assert out[0] is images and out[1] is targets


def test_mixup_lambda_follows_beta():
  images, targets = _batch(size=2, classes=2)
  lams = [ops.mix_batch(images, targets, np.random.default_rng(s), mixup_alpha=0.5)[1][0, 0]
          for s in range(400)]
  # Beta(0.5, 0.5) has mean 1/2 and variance 1/8.
  assert abs(np.mean(lams) - 0.5) < 0.05
  assert abs(np.var(lams) - 0.125) < 0.02
  assert 0 <= min(lams) and max(lams) <= 1
