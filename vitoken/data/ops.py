"""Image ops of the input pipeline: pure numpy (and PIL), one example or one batch at a time.

Per-example ops take and return uint8 HWC arrays, so the expensive float conversion
happens once per batch (`normalize`). Random ops take a `np.random.Generator`, which the
pipeline gets from grain per record (or per batch), so every draw is reproducible.

Semantics follow the references the research code is compared against:
`random_resized_crop` is torchvision's `RandomResizedCrop`, `resize_center_crop` is timm's eval
transform (`crop_pct`, crop_mode "center"), `random_erasing` is timm's `RandomErasing`,
`mixup`/`cutmix`/`mix_batch` are timm's `Mixup` in batch mode (partner = the batch reversed,
cutmix lambda corrected to the pasted area).
"""
from __future__ import annotations

import io
import math
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

# The `interpolation` names of the data config (timm's names) -> PIL resampling filters.
INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

# timm's RandomErasing fills: "const" zeros (the mean colour, after normalisation), "rand" one
# standard normal value per channel and box, "pixel" one per pixel and channel.
ERASING_MODES = ("const", "rand", "pixel")

# PIL modes that hold one intensity channel (alpha, if any, is dropped on decode).
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def channels_of_mode(mode: str) -> int:
  """1 for grayscale PIL modes, 3 for everything else (RGB, RGBA, P, CMYK, ...)."""
  return 1 if mode in _GRAY_MODES else 3


def decode(value: Union[bytes, Image.Image, np.ndarray], channels: Optional[int] = None
           ) -> np.ndarray:
  """Encoded bytes (PNG, JPEG, ...), a PIL image or an array -> uint8 [H, W, C].

  `channels` (1 or 3) converts grayscale <-> RGB; None keeps what the image has
  (grayscale -> 1, anything else -> 3).
  """
  if channels not in (None, 1, 3):
    raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
  if isinstance(value, (bytes, bytearray, memoryview)):
    with Image.open(io.BytesIO(value)) as image:
      return _from_pil(image, channels)
  if isinstance(value, Image.Image):
    return _from_pil(value, channels)
  if isinstance(value, np.ndarray):
    return _from_array(value, channels)
  raise TypeError(f"cannot decode an image from {type(value).__name__}; "
                  "expected bytes, a PIL image or a numpy array")


def decode_clip(value: np.ndarray, channels: Optional[int] = None) -> np.ndarray:
  """A clip's uint8 array [T, H, W, C] (a TFDS Tensor feature) -> uint8 [T, H, W, channels],
  each frame as `decode` converts it."""
  clip = np.asarray(value)
  if clip.dtype != np.uint8 or clip.ndim != 4:
    raise ValueError(f"clips must be uint8 arrays [T, H, W, C], got {clip.dtype} {clip.shape}")
  if channels is None or channels == clip.shape[-1]:
    return clip
  return np.stack([_from_array(frame, channels) for frame in clip])


def _from_pil(image: Image.Image, channels: Optional[int]) -> np.ndarray:
  channels = channels or channels_of_mode(image.mode)
  image = image.convert("L" if channels == 1 else "RGB")
  array = np.asarray(image, dtype=np.uint8)
  return array[..., None] if array.ndim == 2 else array


def _from_array(array: np.ndarray, channels: Optional[int]) -> np.ndarray:
  if array.dtype != np.uint8:
    raise ValueError(f"image arrays must be uint8, got {array.dtype} "
                     f"(scale them to 0..255 before the pipeline)")
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise ValueError(f"image arrays must be [H, W] or [H, W, 1|3|4], got shape {array.shape}")
  if array.shape[-1] == 4:
    array = array[..., :3]  # drop alpha, as PIL's RGBA -> RGB does
  if channels is None or channels == array.shape[-1]:
    return array
  if channels == 3:
    return np.repeat(array, 3, axis=-1)
  return _from_pil(Image.fromarray(array), 1)  # PIL's ITU-R 601-2 luma, same as decode


def resize(image: np.ndarray, size: Union[int, Tuple[int, int]],
           interpolation: str = "bilinear") -> np.ndarray:
  """Antialiased resize (PIL) of uint8 [H, W, C] to [size, size, C] or [h, w, C] (a clip
  [T, H, W, C] frame by frame).

  `interpolation` is a key of `INTERPOLATIONS`; PIL widens the kernel when shrinking.
  """
  height, width = (size, size) if isinstance(size, int) else size
  if image.shape[-3:-1] == (height, width):
    return image
  if image.ndim == 4:  # a clip [T, H, W, C]: every frame alike
    return np.stack([resize(frame, (height, width), interpolation) for frame in image])
  if image.dtype != np.uint8 or image.ndim != 3:
    raise ValueError(f"resize takes uint8 [H, W, C] or [T, H, W, C], got {image.dtype} "
                     f"{image.shape}")
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, "
                     f"got {interpolation!r}")
  resample = INTERPOLATIONS[interpolation]
  if image.shape[-1] == 3:
    return _resize_pil(image, width, height, resample)
  # PIL has no 2- or 4+-plane uint8 mode; 1 channel goes through "L" plane by plane too.
  return np.stack([_resize_pil(image[..., c], width, height, resample)
                   for c in range(image.shape[-1])], axis=-1)


def _resize_pil(array: np.ndarray, width: int, height: int, resample) -> np.ndarray:
  resized = Image.fromarray(np.ascontiguousarray(array)).resize((width, height), resample)
  return np.asarray(resized, dtype=np.uint8)


def center_crop(image: np.ndarray, size: Union[int, Tuple[int, int]]) -> np.ndarray:
  """torchvision's CenterCrop of [H, W, C] (or a clip [T, H, W, C], every frame alike):
  zero-padded first where `size` exceeds the image."""
  crop_h, crop_w = (size, size) if isinstance(size, int) else size
  height, width = image.shape[-3:-1]
  if crop_h > height or crop_w > width:
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    image = np.pad(image, ((0, 0),) * (image.ndim - 3) + (
        (pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
    height, width = image.shape[-3:-1]
  # Python's round (half to even), as torchvision: an odd margin of 1 puts the extra row at
  # the bottom, one of 3 at the top.
  top = int(round((height - crop_h) / 2.0))
  left = int(round((width - crop_w) / 2.0))
  return image[..., top:top + crop_h, left:left + crop_w, :]


def resize_center_crop(image: np.ndarray, size: Union[int, Tuple[int, int]], crop_pct: float,
                       interpolation: str = "bilinear") -> np.ndarray:
  """timm's eval transform (crop_mode "center") of uint8 [H, W, C]: keep the aspect ratio and
  scale the image to cover floor(size / crop_pct), then take the central `size`.

  crop_pct=0.875, size=224: shorter side to 256, centre 224 x 224.
  """
  crop_h, crop_w = (size, size) if isinstance(size, int) else size
  scale_h, scale_w = math.floor(crop_h / crop_pct), math.floor(crop_w / crop_pct)
  height, width = image.shape[-3:-1]
  if scale_h == scale_w:
    # torchvision's Resize(int): the shorter side exactly, the longer one truncated.
    short, long = min(height, width), max(height, width)
    new_long = int(scale_h * long / short)
    new_size = (scale_h, new_long) if height <= width else (new_long, scale_h)
  else:
    # timm's ResizeKeepRatio (a non-square target): both sides rounded, half to even.
    ratio = min(height / scale_h, width / scale_w)
    new_size = (round(height / ratio), round(width / ratio))
  return center_crop(resize(image, new_size, interpolation), (crop_h, crop_w))


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: Sequence[float] = (0.08, 1.0),
                            ratio: Sequence[float] = (3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
  """(top, left, crop_height, crop_width) as torchvision's RandomResizedCrop.get_params.

  Area fraction uniform in `scale`, aspect ratio log-uniform in `ratio`; 10 tries, then
  the largest centred crop whose aspect ratio lies in `ratio`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    crop_w = int(round(math.sqrt(target_area * aspect)))
    crop_h = int(round(math.sqrt(target_area / aspect)))
    if 0 < crop_w <= width and 0 < crop_h <= height:
      top = int(rng.integers(0, height - crop_h + 1))
      left = int(rng.integers(0, width - crop_w + 1))
      return top, left, crop_h, crop_w
  return _central_crop_box(height, width, ratio)


def _central_crop_box(height, width, ratio):
  in_ratio = width / height
  if in_ratio < min(ratio):
    crop_w, crop_h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    crop_h, crop_w = height, int(round(height * max(ratio)))
  else:
    crop_h, crop_w = height, width
  return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def random_resized_crop(image: np.ndarray, size: Union[int, Tuple[int, int]],
                        rng: np.random.Generator, scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3),
                        interpolation: str = "bilinear") -> np.ndarray:
  """Random area/aspect crop of uint8 [H, W, C], resized to `size`; a clip [T, H, W, C] gets
  one box for all its frames."""
  top, left, crop_h, crop_w = random_resized_crop_box(*image.shape[-3:-1], rng, scale, ratio)
  return resize(image[..., top:top + crop_h, left:left + crop_w, :], size, interpolation)


def flip(image: np.ndarray) -> np.ndarray:
  """Horizontal flip of [H, W, C] (or of every frame of a clip [T, H, W, C])."""
  return image[..., ::-1, :]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Horizontal flip with probability 1/2."""
  return flip(image) if rng.random() < 0.5 else image


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 images [..., C] -> float32 (x / 255 - mean) / std; 1-element mean/std broadcast."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  # One fused scale and shift: x * (1 / (255 std)) - mean / std.
  scale = 1.0 / (255.0 * std)
  shift = -mean / std
  return images.astype(np.float32) * scale + shift


def random_erasing_boxes(height: int, width: int, rng: np.random.Generator,
                         probability: float, max_count: int = 1, min_area: float = 0.02,
                         max_area: float = 1 / 3, min_aspect: float = 0.3,
                         max_aspect: Optional[float] = None) -> List[Tuple[int, int, int, int]]:
  """The boxes timm's RandomErasing erases in one image: [(top, left, box_h, box_w), ...].

  With probability `probability`: a count uniform in 1..max_count, then per box an area
  fraction uniform in [min_area, max_area] / count and an aspect (h / w) log-uniform in
  [min_aspect, max_aspect or 1 / min_aspect]; 10 tries per box for one strictly inside the
  image, else that box is skipped. Empty list when nothing is erased.
  """
  if rng.random() > probability:
    return []
  count = 1 if max_count <= 1 else int(rng.integers(1, max_count + 1))
  log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
  area = height * width
  boxes = []
  for _ in range(count):
    for _ in range(10):
      target_area = rng.uniform(min_area, max_area) * area / count
      aspect = math.exp(rng.uniform(*log_aspect))
      box_h = int(round(math.sqrt(target_area * aspect)))
      box_w = int(round(math.sqrt(target_area / aspect)))
      if box_w < width and box_h < height:
        top = int(rng.integers(0, height - box_h + 1))
        left = int(rng.integers(0, width - box_w + 1))
        boxes.append((top, left, box_h, box_w))
        break
  return boxes


def erase(image: np.ndarray, box: Tuple[int, int, int, int], mode: str,
          rng: np.random.Generator) -> None:
  """Fills `box` (top, left, h, w) of a normalised float image [H, W, C] in place (see
  `ERASING_MODES`); the random fills are standard normal, i.e. in normalised units. A clip
  [T, H, W, C] has the box erased in every frame, with the same fill."""
  top, left, box_h, box_w = box
  channels = image.shape[-1]
  if mode == "pixel":
    fill = rng.standard_normal((box_h, box_w, channels), dtype=np.float32)
  elif mode == "rand":
    fill = rng.standard_normal(channels, dtype=np.float32)
  elif mode == "const":
    fill = 0.0
  else:
    raise ValueError(f"mode must be one of {ERASING_MODES}, got {mode!r}")
  image[..., top:top + box_h, left:left + box_w, :] = fill


def random_erasing(images: np.ndarray, rng: np.random.Generator, probability: float,
                   mode: str = "pixel", max_count: int = 1) -> np.ndarray:
  """timm's RandomErasing of normalised float images [B, H, W, C] (or clips [B, T, H, W, C],
  one box for all frames), image by image; writes into `images` (so a batch is not copied)
  and returns it."""
  height, width = images.shape[-3:-1]
  for image in images:
    for box in random_erasing_boxes(height, width, rng, probability, max_count):
      erase(image, box, mode, rng)
  return images


def one_hot_keys(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
  """int labels [B, K] (one column per label key) -> float32 [B, sum(classes)]: the one-hot
  vectors of the keys side by side (with one key, `one_hot` of it)."""
  labels = np.asarray(labels)
  if labels.ndim != 2 or labels.shape[1] != len(classes):
    raise ValueError(f"labels must be [B, {len(classes)}] (one column per label key), got "
                     f"{labels.shape}")
  return np.concatenate([one_hot(labels[:, k], n) for k, n in enumerate(classes)], axis=-1)


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """int labels [B] -> float32 [B, num_classes]."""
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), got range "
                     f"[{labels.min()}, {labels.max()}]")
  return np.eye(num_classes, dtype=np.float32)[labels]


def mixup(images: np.ndarray, targets: np.ndarray, lam: float
          ) -> Tuple[np.ndarray, np.ndarray]:
  """lam * x + (1 - lam) * x[::-1] for float images [B, ...] and targets [B, K]."""
  lam = np.float32(lam)
  mixed = images * lam + images[::-1] * (1 - lam)
  return mixed.astype(np.float32), (targets * lam + targets[::-1] * (1 - lam)).astype(np.float32)


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator
               ) -> Tuple[int, int, int, int]:
  """timm's rand_bbox: a box of area ~(1 - lam) H W centred uniformly, clipped to the image.

  Returns (y0, y1, x0, x1).
  """
  cut_ratio = math.sqrt(1.0 - lam)
  cut_h, cut_w = int(height * cut_ratio), int(width * cut_ratio)
  cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
  y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
  x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
  return int(y0), int(y1), int(x0), int(x1)


def cutmix(images: np.ndarray, targets: np.ndarray, lam: float, rng: np.random.Generator
           ) -> Tuple[np.ndarray, np.ndarray, float]:
  """Pastes a box of x[::-1] into x [B, H, W, C] (clips [B, T, H, W, C]: the same box in
  every frame); targets mix by the pasted area.

  Returns (images, targets, lam) with lam = 1 - box area / image area: the box is
  clipped at the border, so the sampled lambda is corrected to what was really pasted.
  """
  height, width = images.shape[-3:-1]
  y0, y1, x0, x1 = cutmix_box(height, width, lam, rng)
  images = np.array(images, dtype=np.float32, copy=True)
  images[..., y0:y1, x0:x1, :] = images[::-1, ..., y0:y1, x0:x1, :]
  lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
  lam32 = np.float32(lam)
  mixed_targets = (targets * lam32 + targets[::-1] * (1 - lam32)).astype(np.float32)
  return images, mixed_targets, lam


def mix_batch(images: np.ndarray, targets: np.ndarray, rng: np.random.Generator, *,
              mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, mix_prob: float = 1.0,
              switch_prob: float = 0.5) -> Tuple[np.ndarray, np.ndarray]:
  """timm's batch-mode Mixup: with probability `mix_prob` mix the batch, else leave it.

  With both alphas > 0, cutmix is picked with probability `switch_prob`, mixup otherwise;
  lambda ~ Beta(alpha, alpha) of the picked method.
  """
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  if rng.random() >= mix_prob:
    return images, targets
  use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
  alpha = cutmix_alpha if use_cutmix else mixup_alpha
  lam = float(rng.beta(alpha, alpha))
  if use_cutmix:
    images, targets, _ = cutmix(images, targets, lam, rng)
    return images, targets
  return mixup(images, targets, lam)
