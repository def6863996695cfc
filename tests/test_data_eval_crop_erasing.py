"""timm's eval crop (`crop_pct`, `interpolation`) and random erasing, against timm itself.

The eval crop is deterministic, so vitoken's EvalExample must equal timm's
`create_transform(..., is_training=False)` pixel for pixel (both resize with PIL). Random
erasing cannot share timm's random stream (Python's `random` for the boxes, torch for the
fills), so the box sampler is checked twice: exactly, driven by Python's `random` through a
stand-in generator, and in distribution, on numpy's generator against timm seeded; the fills
are checked on fixed boxes.
"""
import math
import random

import numpy as np
from PIL import Image
import pytest
import scipy.stats

from vitoken.convert.torch_reference import import_timm
from vitoken.data import config as config_lib, ops, transforms
from vitoken.errors import ConfigError

import_timm()  # declares torchvision's missing C++ op schemas so torchvision imports on CPU
from timm.data import create_transform  # noqa: E402
from timm.data.random_erasing import RandomErasing  # noqa: E402
import torch  # noqa: E402
from torchvision import transforms as tv_transforms  # noqa: E402

# (height, width): landscape, portrait, smaller than every crop, square, odd margins, ImageNet.
SHAPES = [(37, 53), (61, 29), (11, 17), (36, 36), (40, 35), (375, 500)]
IMAGE_SIZE = 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image(shape, channels, seed):
  return np.random.default_rng(seed).integers(0, 256, shape + (channels,), dtype=np.uint8)


def _pil(image):
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _timm_eval(image, size, crop_pct, interpolation, normalize=False):
  """timm's eval transform as [H, W, C] numpy: uint8 (its prefetcher path, no normalisation)
  or float32 after its ToTensor and Normalize."""
  height, width = (size, size) if isinstance(size, int) else size
  channels = image.shape[-1]
  transform = create_transform(
      input_size=(channels, height, width), is_training=False, crop_pct=crop_pct,
      interpolation=interpolation, use_prefetcher=not normalize, mean=MEAN[:channels],
      std=STD[:channels])
  return transform(_pil(image)).numpy().transpose(1, 2, 0)


def _eval_example(image, **data):
  settings = config_lib.Settings.parse({"image_size": IMAGE_SIZE, **data})
  example = transforms.EvalExample(settings, image.shape[-1])
  return example.map(({"image": image, "label": 3}, 0))["image"]


# ----------------------------------------------------------------------------- eval crop


@pytest.mark.parametrize("channels", [3, 1], ids=["rgb", "gray"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("crop_pct", [0.875, 0.9, 1.0])
def test_eval_crop_equals_timms_eval_transform(crop_pct, interpolation, channels):
  for i, shape in enumerate(SHAPES):
    image = _image(shape, channels, seed=i)
    want = _timm_eval(image, IMAGE_SIZE, crop_pct, interpolation)
    got = _eval_example(image, crop_pct=crop_pct, interpolation=interpolation)
    assert got.dtype == np.uint8 and got.shape == (IMAGE_SIZE, IMAGE_SIZE, channels), shape
    np.testing.assert_array_equal(got, want, err_msg=str(shape))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_eval_batch_equals_timms_normalized_tensor(interpolation):
  images = [_image(shape, 3, seed=10 + i) for i, shape in enumerate(SHAPES)]
  settings = config_lib.Settings.parse({"image_size": 224, "crop_pct": 0.875, "mean": MEAN,
                                        "std": STD, "interpolation": interpolation})
  example = transforms.EvalExample(settings, 3)
  batch = [example.map(({"image": image, "label": 0}, 0)) for image in images]
  batch = {k: np.stack([b[k] for b in batch]) for k in batch[0]}
  got = transforms.EvalBatch(settings, (2,)).map(batch)["image"]
  want = np.stack([_timm_eval(image, 224, 0.875, interpolation, normalize=True)
                   for image in images])
  # Same pixels; only the order of the float ops differs (one fused scale-and-shift).
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("size", [(24, 40), (40, 24), (33, 32)])
@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
def test_non_square_crop_equals_timms_resize_keep_ratio(size, crop_pct):
  # The data config's image_size is square; the op takes (height, width) like timm.
  for i, shape in enumerate(SHAPES[:5]):
    image = _image(shape, 3, seed=20 + i)
    for interpolation in ("bilinear", "bicubic"):
      np.testing.assert_array_equal(
          ops.resize_center_crop(image, size, crop_pct, interpolation),
          _timm_eval(image, size, crop_pct, interpolation), err_msg=str(shape))


@pytest.mark.parametrize("shape,size", [((9, 12), 5), ((10, 13), (4, 6)), ((12, 12), (9, 7)),
                                        ((5, 6), (8, 7)), ((6, 9), (4, 12))])
def test_center_crop_rounds_and_pads_as_torchvision(shape, size):
  image = _image(shape, 3, seed=30)
  want = np.asarray(tv_transforms.CenterCrop(size)(Image.fromarray(image)))
  np.testing.assert_array_equal(ops.center_crop(image, size), want)


def test_default_eval_is_still_the_bilinear_squash():
  image = _image((37, 53), 3, seed=40)
  want = np.asarray(Image.fromarray(image).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
  np.testing.assert_array_equal(_eval_example(image), want)
  bicubic = np.asarray(Image.fromarray(image).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC))
  np.testing.assert_array_equal(_eval_example(image, interpolation="bicubic"), bicubic)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_interpolation_also_resizes_training_crops(interpolation):
  image = _image((61, 29), 3, seed=50)
  resample = ops.INTERPOLATIONS[interpolation]
  for crop in (False, True):
    settings = config_lib.Settings.parse({"image_size": IMAGE_SIZE, "random_resized_crop": crop,
                                          "interpolation": interpolation})
    got = transforms.TrainExample(settings, 3).random_map(
        {"image": image, "label": 1}, np.random.default_rng(7))["image"]
    top, left, h, w = (ops.random_resized_crop_box(61, 29, np.random.default_rng(7))
                       if crop else (0, 0, 61, 29))
    want = Image.fromarray(image[top:top + h, left:left + w]).resize((IMAGE_SIZE, IMAGE_SIZE),
                                                                     resample)
    np.testing.assert_array_equal(got, np.asarray(want))


@pytest.mark.parametrize("key,value", [
    ("crop_pct", 0.0), ("crop_pct", 1.5), ("crop_pct", "0.9"), ("crop_pct", True),
    ("interpolation", "nearest"), ("interpolation", None), ("interpolation", {"a": 1}),
    ("random_erasing", -0.1), ("random_erasing", 1.5), ("random_erasing", None),
    ("random_erasing_mode", "zeros"), ("random_erasing_count", 0),
    ("random_erasing_count", 1.5),
])
def test_bad_values_are_config_errors(key, value):
  with pytest.raises(ConfigError, match=f"data.{key} "):
    config_lib.Settings.parse({key: value})


def test_new_keys_default_to_todays_behaviour_and_override_from_the_command_line():
  config = config_lib.default_data_config()
  defaults = config_lib.Settings.parse(config)
  assert defaults.crop_pct is None and defaults.interpolation == "bilinear"
  assert defaults.random_erasing == 0.0 and defaults.random_erasing_count == 1
  config.crop_pct = 0.875  # a typed placeholder, so --config.data.crop_pct=0.875 works
  config.random_erasing_count = 3
  settings = config_lib.Settings.parse(config)
  assert settings.crop_pct == 0.875 and settings.random_erasing_count == 3


# ----------------------------------------------------------------------------- random erasing


class _PythonRandom:
  """The generator methods the box sampler calls, on Python's `random` stream (timm's)."""

  def __init__(self, seed):
    self._random = random.Random(seed)

  def random(self):
    return self._random.random()

  def uniform(self, low, high):
    return self._random.uniform(low, high)

  def integers(self, low, high):  # numpy's high is exclusive, randint's inclusive
    return self._random.randint(low, high - 1)


def _timm_erased(height, width, count, probability, images, seed, mode="const"):
  """timm's RandomErasing on `images` ones images [N, 3, H, W]: (erased mask [N, H, W], the
  erased tensor)."""
  random.seed(seed)
  torch.manual_seed(seed)
  x = torch.ones(images, 3, height, width)
  RandomErasing(probability, mode=mode, max_count=count, device="cpu")(x)
  return (x != 1).any(1).numpy(), x.numpy()


def _mask(height, width, boxes_per_image):
  mask = np.zeros((len(boxes_per_image), height, width), bool)
  for mask_i, boxes in zip(mask, boxes_per_image):
    for top, left, h, w in boxes:
      mask_i[top:top + h, left:left + w] = True
  return mask


@pytest.mark.parametrize("height,width", [(24, 32), (40, 20), (7, 9), (224, 224)])
@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("probability", [0.25, 1.0])
def test_erasing_boxes_equal_timms_on_its_own_random_stream(height, width, count, probability):
  want, _ = _timm_erased(height, width, count, probability, images=64, seed=5)
  source = _PythonRandom(5)
  got = _mask(height, width, [ops.random_erasing_boxes(height, width, source, probability, count)
                              for _ in range(64)])
  np.testing.assert_array_equal(got, want)


DRAWS = 4000


def _box_stats(mask):
  """Per erased image: area fraction, log(h / w), centre (y, x) of one box (its bounding box)."""
  rows, cols = mask.any(2), mask.any(1)
  erased = rows.any(1)
  rows, cols = rows[erased], cols[erased]
  height, width = mask.shape[1:]
  top, bottom = rows.argmax(1), height - rows[:, ::-1].argmax(1)
  left, right = cols.argmax(1), width - cols[:, ::-1].argmax(1)
  h, w = bottom - top, right - left
  return {"area": h * w / (height * width), "log_aspect": np.log(h / w),
          "center_y": (top + bottom) / (2 * height), "center_x": (left + right) / (2 * width)}


@pytest.mark.parametrize("height,width", [(24, 32), (40, 20)])
def test_erasing_boxes_have_timms_distribution(height, width):
  rng = np.random.default_rng(0)
  ours = _mask(height, width, [ops.random_erasing_boxes(height, width, rng, 1.0)
                               for _ in range(DRAWS)])
  theirs, _ = _timm_erased(height, width, 1, 1.0, images=DRAWS, seed=0)
  a, b = _box_stats(ours), _box_stats(theirs)
  for key in a:
    p = scipy.stats.ks_2samp(a[key], b[key]).pvalue
    assert p > 1e-3, (key, p)
  # All 10 tries fail when a drawn box is as tall or wide as the image: the same rate.
  fa, fb = 1 - ours.any((1, 2)).mean(), 1 - theirs.any((1, 2)).mean()
  assert abs(fa - fb) < 4 * math.sqrt(max(fb * (1 - fb), 1e-4) * 2 / DRAWS) + 1e-3, (fa, fb)


def test_erasing_count_and_probability_have_timms_distribution():
  height, width, count, probability = 24, 32, 3, 0.25
  rng = np.random.default_rng(1)
  ours = _mask(height, width, [ops.random_erasing_boxes(height, width, rng, probability, count)
                               for _ in range(DRAWS)])
  theirs, _ = _timm_erased(height, width, count, probability, images=DRAWS, seed=1)
  ea, eb = ours.any((1, 2)), theirs.any((1, 2))
  tolerance = 4 * math.sqrt(probability * (1 - probability) / DRAWS)
  assert abs(ea.mean() - probability) < tolerance and abs(eb.mean() - probability) < tolerance
  # Up to 3 boxes, each of a third of the area: the erased fraction (overlaps counted once).
  p = scipy.stats.ks_2samp(ours[ea].mean((1, 2)), theirs[eb].mean((1, 2))).pvalue
  assert p > 1e-3, p


def test_erasing_probability_over_many_images():
  settings = config_lib.Settings.parse({"random_erasing": 0.25, "random_erasing_mode": "const",
                                        "mean": (0.0,), "std": (1 / 255,)})
  images = np.full((8000, 16, 16, 1), 3, np.uint8)  # 3 after normalising; erased: 0
  out = transforms.TrainBatch(settings, (2,)).random_map(
      {"image": images, "label": np.zeros((8000, 1), np.int32)}, np.random.default_rng(2))["image"]
  erased = (out == 0).any((1, 2, 3)).mean()
  assert abs(erased - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 8000), erased


BOX = (3, 5, 6, 4)  # top, left, h, w


def _erase(mode, seed=0, channels=3, images=1):
  out = np.full((images, 12, 10, channels), 7.0, np.float32)
  rng = np.random.default_rng(seed)
  for image in out:
    ops.erase(image, BOX, mode, rng)
  return out


def _inside(x):
  top, left, h, w = BOX
  return x[..., top:top + h, left:left + w, :]


def test_erase_touches_only_the_box():
  for mode in ops.ERASING_MODES:
    out = _erase(mode)
    _inside(out)[...] = 7.0
    np.testing.assert_array_equal(out, 7.0)


def test_erase_fills_as_timm():
  # timm's fills on a box it chose, then ours on a fixed box: the same shape of randomness.
  _, timm_pixel = _timm_erased(24, 32, 1, 1.0, images=400, seed=3, mode="pixel")
  _, timm_rand = _timm_erased(24, 32, 1, 1.0, images=400, seed=3, mode="rand")
  _, timm_const = _timm_erased(24, 32, 1, 1.0, images=50, seed=3, mode="const")
  timm_pixel, timm_rand = timm_pixel[timm_pixel != 1], timm_rand.transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(np.unique(timm_const[timm_const != 1]), [0.0])
  np.testing.assert_array_equal(np.unique(_inside(_erase("const"))), [0.0])
  # "rand": one value per channel and box, shared by the box's pixels.
  ours = _inside(_erase("rand", images=400))
  np.testing.assert_array_equal(ours, np.broadcast_to(ours[:, :1, :1], ours.shape))
  assert (ours[:, 0, 0, 0] != ours[:, 0, 0, 1]).all()
  theirs = [image[(image != 1).all(-1)] for image in timm_rand]
  assert all((t == t[:1]).all() for t in theirs if len(t))
  theirs = np.concatenate([t[:1] for t in theirs if len(t)])
  assert scipy.stats.ks_2samp(ours[:, 0, 0].ravel(), theirs.ravel()).pvalue > 1e-3
  # "pixel": every pixel and channel its own standard normal value.
  ours = _inside(_erase("pixel", images=400)).ravel()
  assert len(np.unique(ours)) > 0.99 * ours.size  # float32 normals: rare exact repeats
  assert scipy.stats.ks_2samp(ours, timm_pixel).pvalue > 1e-3
  assert scipy.stats.kstest(ours, "norm").pvalue > 1e-3
  assert _erase("pixel").dtype == np.float32


def test_train_batch_erases_before_mixing_and_draws_nothing_when_off():
  images = np.random.default_rng(3).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
  # Labels as the examples give them: one column per label key.
  batch = {"image": images, "label": (np.arange(6, dtype=np.int32) % 4)[:, None]}
  mix = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}

  def expected(erasing, seed):
    rng = np.random.default_rng(seed)
    x = ops.normalize(images, (0.5,), (0.5,))
    if erasing:
      x = ops.random_erasing(x, rng, 1.0, "pixel", 2)
    return ops.mix_batch(x, ops.one_hot(batch["label"][:, 0], 4), rng, **mix)

  for seed in range(4):
    off = config_lib.Settings.parse(mix)
    got = transforms.TrainBatch(off, (4,)).random_map(dict(batch), np.random.default_rng(seed))
    want = expected(False, seed)
    np.testing.assert_array_equal(got["image"], want[0])
    np.testing.assert_array_equal(got["labels"], want[1])
    on = config_lib.Settings.parse({**mix, "random_erasing": 1.0, "random_erasing_count": 2})
    got = transforms.TrainBatch(on, (4,)).random_map(dict(batch), np.random.default_rng(seed))
    want = expected(True, seed)
    np.testing.assert_array_equal(got["image"], want[0])
    np.testing.assert_array_equal(got["labels"], want[1])
