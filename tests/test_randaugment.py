"""RandAugment checked against timm's own PIL implementation, op by op and in distribution.

timm draws from Python's `random` (and numpy's global state), vitoken from the Generator it
is given, so the streams cannot match: each op is compared with its random decisions pinned
(timm's `random.random` mocked for the sign, its interpolation fixed through hparams), and
the random parts (magnitude noise, op choice, probability) are compared as distributions.
"""
import ast
import dataclasses
import importlib
import pickle
import random
from unittest import mock

import numpy as np
from PIL import Image, ImageOps
import pytest
import scipy.stats

from vitoken.convert.torch_reference import import_timm
from vitoken.data import ops, randaugment
from vitoken.errors import ConfigError

import_timm()  # registers the torchvision op schemas timm's import needs on CPU-only torch
auto_augment = importlib.import_module("timm.data.auto_augment")

_MEAN = (0.485, 0.456, 0.406)
_BILINEAR, _BICUBIC = Image.Resampling.BILINEAR, Image.Resampling.BICUBIC
# Every op any RandAugment op set of timm's uses: standard, increasing and the 3-Augment ones.
_ALL_OPS = sorted(set(auto_augment._RAND_TRANSFORMS) | set(auto_augment._RAND_INCREASING_TRANSFORMS)
                  | set(auto_augment._RAND_3A) | set(auto_augment._RAND_WEIGHTED_3A))
# (magnitude, mmax): inside [0, 10], above it (clipped to 10) and past 10 with mmax20.
_MAGNITUDES = [(0, None), (2, None), (5.5, None), (9, None), (10, None), (13.7, None),
               (13.7, 20), (20, 20)]


def _test_image(channels, height=37, width=53, seed=0):
  """Gradients plus noise in [12, 240]: autocontrast, equalize and solarize all change it, and
  the channels differ, so colour ops do too."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width].astype(np.float64)
  planes = [40 + 120 * x / width + 60 * y / height, 200 - 150 * y / height, 90 + 80 * x / width]
  image = np.stack(planes[:channels], axis=-1) + rng.normal(0, 12, (height, width, channels))
  return np.clip(image, 12, 240).astype(np.uint8)


def _spec(mmax=None, **kwargs):
  return randaugment.parse("rand" + (f"-mmax{mmax}" if mmax else ""), image_mean=_MEAN,
                           **kwargs)


def _timm_hparams(spec, channels, resample, mmax=None):
  # timm's geometric ops fail on "L" images given a 3-value fill, so grey gets its one value.
  fill = spec.fill_rgb if channels == 3 else (spec.fill_gray,)
  hparams = dict(translate_const=250, img_mean=fill, interpolation=resample)
  if mmax:
    hparams["magnitude_max"] = mmax
  return hparams


def _pinned_sign(negate):
  """timm negates a level when random.random() > 0.5; pin that draw."""
  return mock.patch.object(auto_augment.random, "random", return_value=0.75 if negate else 0.25)


def _timm_op(image, name, magnitude, negate, resample, spec, mmax=None):
  hparams = _timm_hparams(spec, image.shape[-1], resample, mmax)
  op = auto_augment.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
  try:
    with _pinned_sign(negate):
      return np.asarray(op(randaugment._to_pil(image)))
  except ValueError as error:
    if not name.startswith("Posterize") or "bits must be" not in str(error):
      raise
  # Pillow 13 refuses posterize to 0 bits or fewer, so timm raises; older Pillow masked.
  bits, = auto_augment.LEVEL_TO_ARG[name](min(magnitude, mmax or 10), hparams)
  assert bits <= 0
  return _old_pillow_posterize(image, bits).reshape(np.asarray(randaugment._to_pil(image)).shape)


def _old_pillow_posterize(image, bits):
  """Pillow's posterize before it checked `bits`: keep the top `bits` bits (none if <= 0)."""
  return image & (~(2 ** (8 - bits) - 1) & 0xFF)


def _our_op(image, name, magnitude, negate, resample, spec):
  step = randaugment._Step(name, randaugment._clip_magnitude(magnitude, spec), negate, resample)
  return np.asarray(randaugment._apply_op(randaugment._to_pil(image), step, spec))


# ----------------------------------------------------------------------------- each op


def test_op_sets_are_timms():
  assert randaugment._STANDARD_OPS == tuple(auto_augment._RAND_TRANSFORMS)
  assert randaugment._INCREASING_OPS == tuple(auto_augment._RAND_INCREASING_TRANSFORMS)
  assert randaugment._NAMED_OP_SETS["weights"] == auto_augment._RAND_WEIGHTED_0
  assert randaugment._NAMED_OP_SETS["3aw"] == auto_augment._RAND_WEIGHTED_3A
  assert randaugment._NAMED_OP_SETS["3a"] == tuple(auto_augment._RAND_3A)
  assert set(randaugment._LEVELS) == set(_ALL_OPS)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name", _ALL_OPS)
def test_op_equals_timm_exactly(name, channels):
  # Same PIL calls on the same image with the same arguments, so bit-identical, including
  # the resampling of rotate/shear/translate; any difference is a wrong level or call.
  image = _test_image(channels)
  for magnitude, mmax in _MAGNITUDES:
    spec = _spec(mmax)
    for negate in (False, True):
      for resample in (_BILINEAR, _BICUBIC):
        ours = _our_op(image, name, magnitude, negate, resample, spec)
        theirs = _timm_op(image, name, magnitude, negate, resample, spec, mmax)
        assert ours.dtype == theirs.dtype == np.uint8
        np.testing.assert_array_equal(
            ours, theirs, err_msg=f"{name} m={magnitude} mmax={mmax} negate={negate} "
                                  f"resample={resample.name} channels={channels}")


def test_old_pillow_posterize_formula_is_pillows_where_pillow_still_takes_it():
  image = _test_image(3)
  for bits in range(1, 9):
    np.testing.assert_array_equal(
        _old_pillow_posterize(image, bits),
        np.asarray(ImageOps.posterize(randaugment._to_pil(image), bits)))


@pytest.mark.parametrize("name", _ALL_OPS)
def test_every_op_changes_an_rgb_image_at_m9(name):
  # Guards the comparison above against both sides doing nothing.
  image = _test_image(3)
  out = _our_op(image, name, 9, False, _BICUBIC, _spec())
  assert out.shape == image.shape and not np.array_equal(out, image)


def test_pinning_timms_sign_flips_the_level():
  op = auto_augment.AugmentOp("Rotate", prob=1.0, magnitude=9, hparams=dict(img_mean=(0,) * 3))
  op.aug_fn = lambda img, *args, **kwargs: args
  with _pinned_sign(False):
    assert op(None) == (27.0,)
  with _pinned_sign(True):
    assert op(None) == (-27.0,)


def _timm_level_args(name, magnitude, negate, mmax):
  hparams = dict(translate_const=250, img_mean=(128,) * 3, magnitude_max=mmax)
  op = auto_augment.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
  op.aug_fn = lambda img, *args, **kwargs: args
  with _pinned_sign(negate):
    return op(None)


@pytest.mark.parametrize("name", _ALL_OPS)
def test_level_arithmetic_equals_timm_on_a_dense_grid(name):
  # Dense magnitudes (steps of 0.05 up to mmax 20, plus the exact quarter steps where the
  # int() of posterize and solarize jumps) catch a changed order of operations there.
  spec = _spec(20)
  magnitudes = np.concatenate([np.linspace(0, 20, 401), np.arange(0, 20.01, 0.25)]).tolist()
  for magnitude in magnitudes:
    for negate in (False, True):
      step = randaugment._Step(name, randaugment._clip_magnitude(magnitude, spec), negate,
                               _BILINEAR)
      assert randaugment._level_args(step, spec) == _timm_level_args(name, magnitude, negate, 20), (
          name, magnitude, negate)


# ----------------------------------------------------------------------------- magnitudes


def _timm_magnitudes(config, draws, seed=0):
  """The magnitudes timm's first RandAugment op hands its level function."""
  rand_augment = auto_augment.rand_augment_transform(config, dict(img_mean=(128,) * 3))
  op = rand_augment.ops[0]
  op.prob = 1.0
  recorded = []
  op.level_fn = lambda magnitude, hparams: recorded.append(magnitude) or ()
  op.aug_fn = lambda img, *args, **kwargs: img
  random.seed(seed)
  for _ in range(draws):
    op(None)
  return np.array(recorded)


def _our_magnitudes(config, draws, seed=0):
  spec = dataclasses.replace(randaugment.parse(config), prob=1.0)
  rng = np.random.default_rng(seed)
  return np.array([randaugment._draw_step("Rotate", spec, rng).magnitude for _ in range(draws)])


@pytest.mark.parametrize("config", ["rand-m9", "rand-m9-mstd0.5", "rand-m9-mstd0.5-inc1",
                                    "rand-m10-mstd1", "rand-m5-mstd3", "rand-m9-mstd101",
                                    "rand-m15-mstd2", "rand-m15-mstd2-mmax20", "rand-m3-mstd4"])
def test_magnitude_distribution_matches_timm(config):
  draws = 10_000
  ours, theirs = _our_magnitudes(config, draws), _timm_magnitudes(config, draws)
  top = randaugment.parse(config).magnitude_max
  assert 0 <= ours.min() and ours.max() <= top and 0 <= theirs.min() and theirs.max() <= top
  # Five standard errors of the difference (plus a hair for the noise-free configs): a wrong
  # std, clip or uniform range is off by far more.
  se_mean = np.sqrt((ours.var() + theirs.var()) / draws) + 1e-12
  assert abs(ours.mean() - theirs.mean()) < 5 * se_mean, (ours.mean(), theirs.mean())
  se_std = np.hypot(_std_error(ours), _std_error(theirs)) + 1e-12
  assert abs(ours.std() - theirs.std()) < 5 * se_std, (ours.std(), theirs.std())
  for edge in (0.0, top):  # the mass the clipping piles up at either end
    p_ours, p_theirs = np.mean(ours == edge), np.mean(theirs == edge)
    se_p = np.sqrt((p_ours * (1 - p_ours) + p_theirs * (1 - p_theirs)) / draws) + 1e-12
    assert abs(p_ours - p_theirs) < 5 * se_p, (edge, p_ours, p_theirs)
  if ours.std() > 0:
    assert scipy.stats.ks_2samp(ours, theirs, method="asymp").pvalue > 1e-3


def _std_error(sample):
  """Standard error of a sample's std for any distribution (the clipped ones are far from
  normal): from the fourth central moment, by the delta method."""
  centred = sample - sample.mean()
  var, fourth = np.mean(centred ** 2), np.mean(centred ** 4)
  return np.sqrt(max(fourth - var ** 2, 0) / len(sample)) / (2 * np.sqrt(var) + 1e-12)


@pytest.mark.parametrize("mmax", [None, 0, 15])
def test_clipping_a_pinned_gaussian_draw_equals_timm(mmax):
  config = "rand-m9-mstd0.5" + (f"-mmax{mmax}" if mmax is not None else "")
  spec = randaugment.parse(config)
  op = auto_augment.rand_augment_transform(config, dict(img_mean=(128,) * 3)).ops[0]
  op.prob = 1.0
  op.aug_fn = lambda img, *args, **kwargs: img
  for drawn in (-3.0, -0.0, 0.0, 4.2, 9.99, 10.0, 10.5, 14.9, 15.0, 25.0):
    recorded = []
    op.level_fn = lambda magnitude, hparams, recorded=recorded: recorded.append(magnitude) or ()
    with mock.patch.object(auto_augment.random, "gauss", return_value=drawn):
      op(None)
    assert randaugment._clip_magnitude(drawn, spec) == recorded[0], (drawn, mmax)


# ----------------------------------------------------------------------------- apply


def test_ops_are_chosen_uniformly_with_replacement():
  spec = randaugment.parse("rand-n3")
  rng = np.random.default_rng(0)
  choices = [randaugment._choose_ops(spec, rng) for _ in range(20_000)]
  assert all(len(c) == 3 for c in choices)
  counts = np.array([sum(c.count(name) for c in choices) for name in spec.ops])
  assert scipy.stats.chisquare(counts).pvalue > 1e-3
  # With replacement, as timm: the same op twice in 1 - (14/15)(13/15) of images.
  repeats = np.mean([len(set(c)) < 3 for c in choices])
  assert abs(repeats - (1 - 14 / 15 * 13 / 15)) < 0.01


def test_weighted_set_is_chosen_by_weight_without_replacement():
  spec = randaugment.parse("rand-n2-tweights")
  rng = np.random.default_rng(0)
  choices = [randaugment._choose_ops(spec, rng) for _ in range(20_000)]
  assert all(len(set(c)) == 2 for c in choices)
  firsts = np.array([sum(c[0] == name for c in choices) for name in spec.ops])
  expected = np.array(spec.weights) * len(choices)
  assert scipy.stats.chisquare(firsts, expected).pvalue > 1e-3


@pytest.mark.parametrize("prob", [0.0, 0.3, 0.5, 1.0])
def test_each_op_is_applied_with_probability_p(prob):
  spec = randaugment.parse(f"rand-p{prob}")
  rng = np.random.default_rng(1)
  applied = np.mean([randaugment._draw_step("Invert", spec, rng) is not None
                     for _ in range(10_000)])
  assert abs(applied - prob) < 5 * np.sqrt(prob * (1 - prob) / 10_000) + 1e-12


def test_random_interpolation_picks_bilinear_or_bicubic_evenly():
  spec = randaugment.parse("rand-p1", image_mean=_MEAN)
  rng = np.random.default_rng(2)
  picks = [randaugment._draw_step("Rotate", spec, rng).resample for _ in range(4_000)]
  assert set(picks) == set(auto_augment._RANDOM_INTERPOLATION)
  assert abs(np.mean([p == _BICUBIC for p in picks]) - 0.5) < 0.04
  negations = [randaugment._draw_step("Rotate", spec, rng).negate for _ in range(4_000)]
  assert abs(np.mean(negations) - 0.5) < 0.04
  fixed = randaugment.parse("rand-p1", interpolation="bicubic")
  assert {randaugment._draw_step("Rotate", fixed, rng).resample for _ in range(50)} == {_BICUBIC}


@pytest.mark.parametrize("config", ["rand-m9-mstd0.5-inc1", "rand-m9-n3-p0.8", "rand-t3a",
                                    "rand-tweights-n4-mstd101", "rand-m15-mmax20-n2-p1"])
@pytest.mark.parametrize("channels", [3, 1])
def test_apply_end_to_end(config, channels):
  spec = randaugment.parse(config, image_mean=_MEAN)
  image = _test_image(channels)
  outputs = [randaugment.apply(image, spec, np.random.default_rng(seed)) for seed in range(8)]
  for out in outputs:
    assert out.dtype == np.uint8 and out.shape == image.shape
  again = randaugment.apply(image, spec, np.random.default_rng(3))
  np.testing.assert_array_equal(again, outputs[3])
  assert len({out.tobytes() for out in outputs}) > 1
  # apply is: choose n ops, draw each one's decisions (or skip it), run them in order.
  rng = np.random.default_rng(3)
  steps = [randaugment._draw_step(n, spec, rng) for n in randaugment._choose_ops(spec, rng)]
  replayed = randaugment._to_pil(image)
  for step in steps:
    if step is not None:
      replayed = randaugment._apply_op(replayed, step, spec)
  np.testing.assert_array_equal(np.asarray(replayed).reshape(image.shape), outputs[3])


@pytest.mark.parametrize("num_layers", [0, 1, 2, 3])
def test_n_ops_are_applied_per_image(num_layers):
  # Invert, always applied: an odd number of layers inverts, an even number restores.
  spec = dataclasses.replace(randaugment.parse(f"rand-n{num_layers}-p1"), ops=("Invert",))
  image = _test_image(3)
  out = randaugment.apply(image, spec, np.random.default_rng(0))
  np.testing.assert_array_equal(out, 255 - image if num_layers % 2 else image)


def test_probability_zero_returns_the_image():
  image = _test_image(3)
  spec = randaugment.parse("rand-n5-p0")
  assert randaugment.apply(image, spec, np.random.default_rng(0)) is image


def test_apply_rejects_other_images():
  spec = randaugment.parse("rand")
  with pytest.raises(ValueError, match="uint8"):
    randaugment.apply(np.zeros((4, 4, 3), np.float32), spec, np.random.default_rng(0))
  with pytest.raises(ValueError, match=r"\(4, 4\)"):
    randaugment.apply(np.zeros((4, 4), np.uint8), spec, np.random.default_rng(0))


def test_grayscale_fill_is_the_luma_of_the_mean_colour():
  spec = randaugment.parse("rand", image_mean=_MEAN)
  mean_pixel = np.array([[spec.fill_rgb]], np.uint8)
  assert spec.fill_gray == ops.decode(mean_pixel, channels=1)[0, 0, 0]
  black = np.zeros((9, 9, 1), np.uint8)
  corner = _our_op(black, "Rotate", 10, False, _BILINEAR, spec)[0, 0]
  assert corner == spec.fill_gray
  one_value = randaugment.parse("rand", image_mean=(0.5,))
  assert one_value.fill_rgb == (128,) * 3 and one_value.fill_gray == 128


# ----------------------------------------------------------------------------- parse


@pytest.mark.parametrize("config", [
    "rand", "rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "rand-m7-n3-p0.8", "rand-mstd101",
    "rand-m15-mmax20", "rand-m9-mmax0", "rand-tweights", "rand-n3-t3a", "rand-t3aw-inc1",
    "rand-inc0-n1-p1-m4", "rand-m0-n0"])
def test_parse_matches_timm(config):
  spec = randaugment.parse(config)
  theirs = auto_augment.rand_augment_transform(config, dict(img_mean=(128,) * 3))
  assert spec.ops == tuple(op.name for op in theirs.ops)
  assert spec.num_layers == theirs.num_layers
  for op in theirs.ops:
    assert (spec.prob, spec.magnitude) == (op.prob, op.magnitude)
    assert spec.magnitude_std == op.magnitude_std
    assert spec.magnitude_max == (op.magnitude_max or 10)
  if theirs.choice_weights is None:
    assert spec.weights is None
  else:
    np.testing.assert_allclose(spec.weights, theirs.choice_weights, rtol=1e-12)


@pytest.mark.parametrize("interpolation", ["random", "bicubic"])
def test_fill_and_interpolation_match_timms_create_transform(interpolation):
  timm = importlib.import_module("timm.data")
  pipeline = timm.create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                   mean=_MEAN, interpolation=interpolation)
  theirs, = [t for t in pipeline.transforms if isinstance(t, auto_augment.RandAugment)]
  spec = randaugment.parse("rand-m9-mstd0.5-inc1", image_mean=_MEAN, interpolation=interpolation)
  assert theirs.ops[0].kwargs["fillcolor"] == spec.fill_rgb == (124, 116, 104)
  if interpolation == "random":
    assert tuple(theirs.ops[0].kwargs["resample"]) == randaugment._RANDOM_INTERPOLATION
  else:
    assert theirs.ops[0].kwargs["resample"] == randaugment._INTERPOLATIONS[interpolation]


def test_spec_pickles_and_is_frozen():
  spec = randaugment.parse("rand-m9-mstd0.5-inc1", image_mean=_MEAN)
  assert pickle.loads(pickle.dumps(spec)) == spec
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.magnitude = 3


@pytest.mark.parametrize("config, match", [
    ("rand-m9-foo", r"unknown section 'foo'.*\['m', 'n', 'p', 'mstd', 'mmax', 'inc', 't'\]"),
    ("rand-x3", "unknown section 'x3'"),
    ("rand-m9-", "unknown section ''"),
    ("randaug-m9", "must start with 'rand'"),
    ("m9-rand", "must start with 'rand'"),
    ("rand-m9-m8", "'m' twice"),
    ("rand-m9.5", r"'m9.5'.*'m' takes an integer"),
    ("rand-n2x", r"'n2x'.*'n' takes an integer"),
    ("rand-p1.5", r"'p' takes a probability in \[0, 1\]"),
    ("rand-p0.5.1", r"'p' takes a probability"),
    ("rand-mstd", "'mstd' has no value"),
    ("rand-mstd1e999", "'mstd' takes a finite std"),
    ("rand-inc2", "'inc' takes 0 or 1"),
    ("rand-tfoo", r"'t' takes one of \['3a', '3aw', 'weights'\]"),
    ("rand-tweights-n16", "n16 exceeds the 15 ops"),
])
def test_parse_errors_name_the_bad_part(config, match):
  with pytest.raises(ConfigError, match=match):
    randaugment.parse(config)


@pytest.mark.parametrize("kwargs, match", [
    (dict(config=None), "must be a string"),
    (dict(image_mean=(0.5, 0.5)), "image_mean must be 1 or 3 values"),
    (dict(image_mean=(0.5, 1.5, 0.5)), "image_mean must be 1 or 3 values"),
    (dict(image_mean="grey"), "image_mean must be 1 or 3 values"),
    (dict(interpolation="lanczos"), "interpolation must be 'random' or one of"),
    (dict(translate_pct=-0.1), "translate_pct must be >= 0"),
])
def test_parse_rejects_bad_arguments(kwargs, match):
  kwargs = dict(dict(config="rand-m9"), **kwargs)
  with pytest.raises(ConfigError, match=match):
    randaugment.parse(**kwargs)


def test_module_imports_neither_torch_nor_timm():
  tree = ast.parse(open(randaugment.__file__).read())
  imported = {alias.name.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.Import) for alias in node.names}
  imported |= {node.module.split(".")[0] for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and node.module}
  assert imported <= {"__future__", "dataclasses", "math", "re", "typing", "numpy", "PIL",
                      "vitoken"}, imported


def test_the_pipeline_applies_the_configured_randaugment_after_crop_and_flip():
  from vitoken.data import config as config_lib, transforms
  settings = config_lib.Settings.parse({"randaugment": "rand-m9-mstd0.5-inc1-p1.0", "image_size": 16,
                                        "mean": (0.5, 0.4, 0.3)})
  image = np.random.RandomState(0).randint(0, 256, (16, 16, 3), np.uint8)
  out = transforms.TrainExample(settings, 3).random_map({"image": image, "label": 1},
                                                         np.random.default_rng(5))["image"]
  spec = randaugment.parse("rand-m9-mstd0.5-inc1-p1.0", image_mean=(0.5, 0.4, 0.3),
                           interpolation="bilinear")
  # The same generator, after the resize (no draw) and no flip: the same augmentation.
  np.testing.assert_array_equal(out, randaugment.apply(image, spec, np.random.default_rng(5)))
  assert not np.array_equal(out, image)
  with pytest.raises(ValueError, match="rand-m9-bogus7"):
    config_lib.Settings.parse({"randaugment": "rand-m9-bogus7"})
