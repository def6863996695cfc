"""RandAugment in timm's string form (`rand-m9-mstd0.5-inc1`) on uint8 [H, W, C] images.

    spec = randaugment.parse("rand-m9-mstd0.5-inc1", image_mean=(0.485, 0.456, 0.406))
    image = randaugment.apply(image, spec, rng)   # rng: np.random.Generator

The ops, their level arithmetic and their PIL calls are those of timm's
`timm.data.auto_augment` (timm 1.0), so for the same decisions (which op, magnitude, sign,
interpolation) every op's output is bit-identical to timm's. The random stream is not: every
draw comes from the numpy Generator grain hands the pipeline, where timm uses Python's
`random` and numpy's global state, so the two agree in distribution, not sample by sample.

Grammar: "rand", then dash-separated sections in any order, each a key and its value:
  m<int>       magnitude, default 10; the noisy magnitude is clipped to [0, 10] (or mmax)
  n<int>       ops chosen per image, default 2
  p<float>     probability of applying each chosen op, default 0.5
  mstd<float>  std of the Gaussian noise on each op's magnitude, default 0; over 100 means
               uniform in [0, m] instead
  mmax<int>    clip to [0, mmax] instead of [0, 10] (Google's RandAugment lets m exceed 10);
               mmax0 keeps 10, as in timm
  inc<0|1>     use the ops whose severity grows with m (timm's "increasing" set), default 0
  t<name>      another op set: weights (timm's weighted set), 3a, 3aw (DeiT III's 3-Augment,
               uniform or weighted); a weighted set chooses its n ops without replacement
Stricter than timm, which skips a section without a digit, lets a repeated key override and
falls back to the default set for an unknown `t` name: all three are errors here.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from vitoken.errors import ConfigError

# Magnitude m scales each op's range by m / 10: m10 is the full range.
_LEVEL_DENOM = 10.0
_DEFAULT_FILL = 128  # timm's fill for the pixels geometric ops uncover when no mean is given
_DEFAULT_TRANSLATE_PCT = 0.45  # timm's translation range, as a fraction of the image side

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
# timm's default: each geometric op picks one of these at random.
_RANDOM_INTERPOLATION = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)

_STANDARD_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)
_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
# The `t` op sets, as timm lists them (dicts are weights; order matters for the weights).
_NAMED_OP_SETS = {
    "weights": {
        "Rotate": 3, "ShearX": 2, "ShearY": 2, "TranslateXRel": 1, "TranslateYRel": 1,
        "ColorIncreasing": .25, "SharpnessIncreasing": 0.25, "AutoContrast": 0.25,
        "SolarizeIncreasing": .05, "SolarizeAdd": .05, "ContrastIncreasing": .05,
        "BrightnessIncreasing": .05, "Equalize": .05, "PosterizeIncreasing": 0.05,
        "Invert": 0.05,
    },
    "3a": ("SolarizeIncreasing", "Desaturate", "GaussianBlur"),
    "3aw": {
        "SolarizeIncreasing": 6, "Desaturate": 6, "GaussianBlur": 6, "Rotate": 3, "ShearX": 2,
        "ShearY": 2, "PosterizeIncreasing": 1, "AutoContrast": 1, "ColorIncreasing": 1,
        "SharpnessIncreasing": 1, "ContrastIncreasing": 1, "BrightnessIncreasing": 1,
        "Equalize": 1, "Invert": 1,
    },
}


@dataclasses.dataclass(frozen=True)
class Spec:
  """A parsed RandAugment string: frozen and plain, so it pickles into grain workers."""
  config: str
  ops: Tuple[str, ...]
  weights: Optional[Tuple[float, ...]]  # None: uniform choice with replacement, as timm
  num_layers: int
  prob: float
  magnitude: int
  magnitude_std: float  # inf: uniform in [0, magnitude]
  magnitude_max: int
  fill_rgb: Tuple[int, int, int]
  fill_gray: int
  interpolation: str  # "random" or a key of _INTERPOLATIONS
  translate_pct: float


@dataclasses.dataclass(frozen=True)
class _Step:
  """One op about to be applied, with every random decision already taken."""
  name: str
  magnitude: float  # already noisy and clipped
  negate: bool  # flips the sign of the signed ops' level (rotate, shear, translate, ...)
  resample: int  # PIL interpolation of the geometric ops


# ----------------------------------------------------------------------------- parse


def parse(config: str, image_mean: Optional[Sequence[float]] = None,
          interpolation: str = "random", translate_pct: float = _DEFAULT_TRANSLATE_PCT) -> Spec:
  """A timm RandAugment string -> `Spec`; ConfigError naming the bad part otherwise.

  `image_mean` (1 or 3 values in [0, 1]) fills what rotate, shear and translate uncover, as
  timm's `create_transform` does with its mean; None fills with grey 128, timm's default.
  `interpolation` is "random" (bilinear or bicubic per op, timm's default) or one of
  "nearest", "bilinear", "bicubic".
  """
  if not isinstance(config, str):
    raise ConfigError(f"a RandAugment config must be a string like 'rand-m9-mstd0.5', "
                      f"got {config!r}")
  name, *sections = config.split("-")
  if name != "rand":
    raise ConfigError(f"RandAugment config {config!r} must start with 'rand', got {name!r}")
  values = _parse_sections(config, sections)
  ops, weights = _op_set(values.get("t"), bool(values.get("inc", 0)))
  num_layers = values.get("n", 2)
  if weights is not None and num_layers > len(ops):
    raise ConfigError(f"RandAugment config {config!r}: n{num_layers} exceeds the "
                      f"{len(ops)} ops of t{values['t']}, which are chosen without replacement")
  fill_rgb, fill_gray = _fill(image_mean)
  if interpolation != "random" and interpolation not in _INTERPOLATIONS:
    raise ConfigError(f"RandAugment interpolation must be 'random' or one of "
                      f"{sorted(_INTERPOLATIONS)}, got {interpolation!r}")
  if not isinstance(translate_pct, (int, float)) or not translate_pct >= 0:
    raise ConfigError(f"RandAugment translate_pct must be >= 0, got {translate_pct!r}")
  return Spec(config=config, ops=ops, weights=weights, num_layers=num_layers,
              prob=values.get("p", 0.5), magnitude=values.get("m", int(_LEVEL_DENOM)),
              magnitude_std=values.get("mstd", 0.0),
              magnitude_max=values.get("mmax", 0) or int(_LEVEL_DENOM),
              fill_rgb=fill_rgb, fill_gray=fill_gray, interpolation=interpolation,
              translate_pct=float(translate_pct))


def _nonnegative_int(text: str) -> int:
  if not text.isdigit():
    raise ValueError("an integer >= 0")
  return int(text)


def _number(text: str, what: str) -> float:
  try:
    return float(text)
  except ValueError:
    raise ValueError(what) from None


def _probability(text: str) -> float:
  value = _number(text, "a probability in [0, 1]")
  if not 0.0 <= value <= 1.0:
    raise ValueError("a probability in [0, 1]")
  return value


def _magnitude_std(text: str) -> float:
  value = _number(text, "a finite std >= 0")
  if not 0.0 <= value < math.inf:
    raise ValueError("a finite std >= 0")
  return math.inf if value > 100 else value  # timm's switch to uniform sampling


def _flag(text: str) -> int:
  if text not in ("0", "1"):
    raise ValueError("0 or 1")
  return int(text)


def _op_set_name(text: str) -> str:
  if text not in _NAMED_OP_SETS:
    raise ValueError(f"one of {sorted(_NAMED_OP_SETS)}")
  return text


# Each key's value parser; its ValueError says what the value must be.
_KEYS: Dict[str, Callable[[str], object]] = {
    "m": _nonnegative_int, "n": _nonnegative_int, "p": _probability, "mstd": _magnitude_std,
    "mmax": _nonnegative_int, "inc": _flag, "t": _op_set_name,
}


def _parse_sections(config: str, sections: List[str]) -> Dict[str, object]:
  values = {}
  for section in sections:
    key, text = _split_section(config, section)
    if key in values:
      raise ConfigError(f"RandAugment config {config!r} gives {key!r} twice")
    try:
      values[key] = _KEYS[key](text)
    except ValueError as error:
      raise ConfigError(f"RandAugment config {config!r}: section {section!r} has value "
                        f"{text!r}, but {key!r} takes {error}") from None
  return values


def _split_section(config: str, section: str) -> Tuple[str, str]:
  """'mstd0.5' -> ('mstd', '0.5'): the key is all before the first digit, as in timm."""
  if section.startswith("t"):  # the one key whose value is a name, not a number
    return "t", section[1:]
  match = re.fullmatch(r"(\D*)(\d.*)", section)
  key = match.group(1) if match else section
  if key not in _KEYS:
    raise ConfigError(f"RandAugment config {config!r}: unknown section {section!r}; "
                      f"sections are a key and its value, keys {list(_KEYS)} "
                      f"(e.g. 'rand-m9-n2-mstd0.5-inc1')")
  if not match:
    raise ConfigError(f"RandAugment config {config!r}: section {section!r} has no value")
  return key, match.group(2)


def _op_set(set_name: Optional[str], increasing: bool
            ) -> Tuple[Tuple[str, ...], Optional[Tuple[float, ...]]]:
  if set_name is None:
    return (_INCREASING_OPS if increasing else _STANDARD_OPS), None
  ops = _NAMED_OP_SETS[set_name]
  if not isinstance(ops, dict):
    return tuple(ops), None
  total = sum(ops.values())
  return tuple(ops), tuple(weight / total for weight in ops.values())


def _fill(image_mean: Optional[Sequence[float]]) -> Tuple[Tuple[int, int, int], int]:
  """The uncovered pixels' colour for RGB and for grayscale images."""
  if image_mean is None:
    return (_DEFAULT_FILL,) * 3, _DEFAULT_FILL
  if isinstance(image_mean, (int, float)):
    image_mean = (image_mean,)
  try:
    mean = tuple(float(v) for v in image_mean)
  except (TypeError, ValueError):
    mean = ()
  if len(mean) not in (1, 3) or not all(0.0 <= v <= 1.0 for v in mean):
    raise ConfigError(f"RandAugment image_mean must be 1 or 3 values in [0, 1], "
                      f"got {image_mean!r}")
  levels = tuple(min(255, round(255 * v)) for v in mean)  # timm's create_transform rounding
  if len(levels) == 1:
    return levels * 3, levels[0]
  # A grayscale image of an RGB dataset: ops.decode made it with PIL's luma, so the mean grey
  # is the same luma of the mean colour.
  gray = Image.new("RGB", (1, 1), levels).convert("L").getpixel((0, 0))
  return levels, gray


# ----------------------------------------------------------------------------- apply


def apply(image: np.ndarray, spec: Spec, rng: np.random.Generator) -> np.ndarray:
  """RandAugment one uint8 [H, W, C] image (C = 1 or 3): n ops, each applied with prob p.

  Returns a new array, or `image` itself when every chosen op was skipped.
  """
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"RandAugment takes uint8 [H, W, 1 or 3] images, got {image.dtype} "
                     f"{image.shape}")
  steps = [step for step in (_draw_step(name, spec, rng) for name in _choose_ops(spec, rng))
           if step is not None]
  if not steps:
    return image
  pil = _to_pil(image)
  for step in steps:
    pil = _apply_op(pil, step, spec)
  return np.asarray(pil, dtype=np.uint8).reshape(image.shape)


def _choose_ops(spec: Spec, rng: np.random.Generator) -> List[str]:
  """The n op names for one image: uniform with replacement, or weighted without (as timm)."""
  if spec.weights is None:
    indices = rng.integers(0, len(spec.ops), size=spec.num_layers)
  else:
    indices = rng.choice(len(spec.ops), size=spec.num_layers, replace=False, p=spec.weights)
  return [spec.ops[i] for i in indices]


def _draw_step(name: str, spec: Spec, rng: np.random.Generator) -> Optional[_Step]:
  """The random decisions of one chosen op; None when it is skipped (probability 1 - p)."""
  if rng.random() >= spec.prob:
    return None
  magnitude = _clip_magnitude(_noisy_magnitude(spec, rng), spec)
  negate = bool(rng.random() < 0.5)
  if spec.interpolation == "random":
    resample = _RANDOM_INTERPOLATION[rng.integers(len(_RANDOM_INTERPOLATION))]
  else:
    resample = _INTERPOLATIONS[spec.interpolation]
  return _Step(name, magnitude, negate, resample)


def _noisy_magnitude(spec: Spec, rng: np.random.Generator) -> float:
  if spec.magnitude_std == 0:
    return spec.magnitude
  if spec.magnitude_std == math.inf:
    return float(rng.uniform(0, spec.magnitude))
  return float(rng.normal(spec.magnitude, spec.magnitude_std))


def _clip_magnitude(magnitude: float, spec: Spec) -> float:
  return max(0.0, min(magnitude, spec.magnitude_max))


def _to_pil(image: np.ndarray) -> Image.Image:
  if image.shape[-1] == 1:
    return Image.fromarray(np.ascontiguousarray(image[..., 0]))  # mode "L"
  return Image.fromarray(np.ascontiguousarray(image))  # mode "RGB"


def _apply_op(image: Image.Image, step: _Step, spec: Spec) -> Image.Image:
  """One op with its decisions taken: the same PIL calls as timm's op of that name."""
  args = _level_args(step, spec)
  if step.name in _GEOMETRIC_OPS:
    fill = spec.fill_gray if image.mode == "L" else spec.fill_rgb
    return _GEOMETRIC_OPS[step.name](image, *args, fill=fill, resample=step.resample)
  return _PIXEL_OPS[step.name](image, *args)


def _level_args(step: _Step, spec: Spec) -> Tuple[float, ...]:
  """The op's argument from the magnitude (timm's `LEVEL_TO_ARG`); () for argless ops."""
  level_fn = _LEVELS[step.name]
  if level_fn is None:
    return ()
  # Divide first, as timm does, so the int() of posterize and solarize truncates alike.
  return (level_fn(step.magnitude / _LEVEL_DENOM, step.negate, spec),)


# ----------------------------------------------------------------------------- levels
# Each maps the magnitude's fraction of the full range (m / 10) to an op argument.


def _signed(value: float, negate: bool) -> float:
  return -value if negate else value


def _rotate_degrees(fraction, negate, _spec):
  return _signed(fraction * 30.0, negate)


def _enhance_factor(fraction, _negate, _spec):
  return fraction * 1.8 + 0.1  # 1 is the identity; 0.1 .. 1.9 regardless of sign


def _enhance_increasing_factor(fraction, negate, _spec):
  return max(0.1, 1.0 + _signed(fraction * 0.9, negate))  # farther from 1 as m grows


def _shear_factor(fraction, negate, _spec):
  return _signed(fraction * 0.3, negate)


def _translate_fraction(fraction, negate, spec):
  return _signed(fraction * spec.translate_pct, negate)


def _posterize_bits(fraction, _negate, _spec):
  return int(fraction * 4)  # bits kept: 0 .. 4, milder as m grows (TF EfficientNet)


def _posterize_increasing_bits(fraction, negate, spec):
  return 4 - _posterize_bits(fraction, negate, spec)


def _solarize_threshold(fraction, _negate, _spec):
  return min(256, int(fraction * 256))  # milder as m grows: fewer pixels above it


def _solarize_increasing_threshold(fraction, negate, spec):
  return 256 - _solarize_threshold(fraction, negate, spec)


def _solarize_addend(fraction, _negate, _spec):
  return min(128, int(fraction * 110))


def _clamped_range(low: float, high: float):
  def level(fraction, _negate, _spec):
    return max(low, min(high, low + (high - low) * fraction))
  return level


_LEVELS = {
    "AutoContrast": None, "Equalize": None, "Invert": None,
    "Rotate": _rotate_degrees,
    "Posterize": _posterize_bits, "PosterizeIncreasing": _posterize_increasing_bits,
    "Solarize": _solarize_threshold, "SolarizeIncreasing": _solarize_increasing_threshold,
    "SolarizeAdd": _solarize_addend,
    "Color": _enhance_factor, "ColorIncreasing": _enhance_increasing_factor,
    "Contrast": _enhance_factor, "ContrastIncreasing": _enhance_increasing_factor,
    "Brightness": _enhance_factor, "BrightnessIncreasing": _enhance_increasing_factor,
    "Sharpness": _enhance_factor, "SharpnessIncreasing": _enhance_increasing_factor,
    "ShearX": _shear_factor, "ShearY": _shear_factor,
    "TranslateXRel": _translate_fraction, "TranslateYRel": _translate_fraction,
    "Desaturate": _clamped_range(0.5, 1.0),
    "GaussianBlur": _clamped_range(0.1, 2.0),
}


# ----------------------------------------------------------------------------- ops


def _affine(image, matrix, fill, resample):
  return image.transform(image.size, Image.Transform.AFFINE, matrix, resample=resample,
                         fillcolor=fill)


def _rotate(image, degrees, fill, resample):
  return image.rotate(degrees, resample=resample, fillcolor=fill)


def _shear_x(image, factor, fill, resample):
  return _affine(image, (1, factor, 0, 0, 1, 0), fill, resample)


def _shear_y(image, factor, fill, resample):
  return _affine(image, (1, 0, 0, factor, 1, 0), fill, resample)


def _translate_x(image, fraction, fill, resample):
  return _affine(image, (1, 0, fraction * image.size[0], 0, 1, 0), fill, resample)


def _translate_y(image, fraction, fill, resample):
  return _affine(image, (1, 0, 0, 0, 1, fraction * image.size[1]), fill, resample)


def _posterize(image, bits):
  if bits >= 8:
    return image
  if bits <= 0:
    # Pillow 13 refuses to keep no bits, so timm raises at m < 2.5 (Posterize) and m >= 10
    # (PosterizeIncreasing); older Pillow's mask kept none, i.e. black, as TF and torchvision.
    return image.point([0] * 256 * len(image.getbands()))
  return ImageOps.posterize(image, bits)


def _solarize_add(image, addend, threshold=128):
  lut = [min(255, i + addend) if i < threshold else i for i in range(256)]
  return image.point(lut * len(image.getbands()))


def _enhance(enhancer):
  def op(image, factor):
    return enhancer(image).enhance(factor)
  return op


def _desaturate(image, amount):
  return ImageEnhance.Color(image).enhance(min(1.0, max(0.0, 1.0 - amount)))


def _gaussian_blur(image, radius):
  return image.filter(ImageFilter.GaussianBlur(radius=radius))


_GEOMETRIC_OPS = {
    "Rotate": _rotate, "ShearX": _shear_x, "ShearY": _shear_y,
    "TranslateXRel": _translate_x, "TranslateYRel": _translate_y,
}
_PIXEL_OPS = {
    "AutoContrast": ImageOps.autocontrast, "Equalize": ImageOps.equalize,
    "Invert": ImageOps.invert,
    "Posterize": _posterize, "PosterizeIncreasing": _posterize,
    "Solarize": ImageOps.solarize, "SolarizeIncreasing": ImageOps.solarize,
    "SolarizeAdd": _solarize_add,
    "Color": _enhance(ImageEnhance.Color), "ColorIncreasing": _enhance(ImageEnhance.Color),
    "Contrast": _enhance(ImageEnhance.Contrast),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "Desaturate": _desaturate, "GaussianBlur": _gaussian_blur,
}
