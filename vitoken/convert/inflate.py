"""An image ViT inflated into a video ViT (ViViT's model 1), as scenic's ViViT initialises one
from an image checkpoint (`projects/vivit/model_utils.py`: `init_embedding`, `init_posemb`).

    video, video_params = inflate(image_model, image_params, num_frames=8, tubelet=2)
    logits, aux = video.apply({"params": video_params}, clips)   # clips [B, 8, H, W, C]

- The patch embedding becomes a 3-D convolution over tubelets of `tubelet` frames. "central"
  (ViViT's default, 79.9 top-1 for ViViT-B/16x2 on Kinetics-400) puts the image kernel at
  temporal index tubelet // 2 and zeros elsewhere; "average" (I3D's filter inflation) tiles it
  over the tubelet and divides by `tubelet`. The bias is kept.
- A learned table over the image's patches is tiled over the time slices (time-major, as the
  tokens), after resizing its grid with big_vision's zoom when `image_size` changes it; class
  and register positions keep theirs. With `posemb="learn_factorised"` the spatial table is
  kept as it is and a temporal table starts at zero. A fixed 2-D sin-cos table becomes a
  learned one holding its values, tiled likewise (a video model has no 2-D fixed table).
- Everything else (blocks, norms, head, reducers' parameters) is copied.

A clip of one image repeated then gives the image model's logits: every time slice holds the
image's tokens, and attention over T' copies of each patch key weights them as the image's one.
A class token is one key among T' copies of every patch, so its share of attention would
shrink T'-fold; the inflated model counts it as one copy per slice (`prefix_per_slice`: + log T'
on its key logits, as ToMe's proportional attention counts a merged token), which keeps the
image model's function exactly. `prefix_per_slice=False` is ViViT's plain class token (scenic
inflates so), whose static-clip logits differ from the image model's.
"""
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from vitoken.errors import ConfigError, InputError
from vitoken.models import posemb as posemb_lib
from vitoken.models.patches import PatchGrid
from vitoken.models.vit import VisionTransformer

KERNELS = ("central", "average")


def inflate_kernel(kernel: np.ndarray, tubelet: int, method: str = "central") -> np.ndarray:
  """[ph, pw, C, D] image patch kernel -> [tubelet, ph, pw, C, D] tubelet kernel."""
  kernel = np.asarray(kernel)
  if kernel.ndim != 4:
    raise InputError(f"an image patch-embedding kernel is [ph, pw, C, D], got {kernel.shape}")
  if method == "central":
    out = np.zeros((tubelet,) + kernel.shape, kernel.dtype)
    out[tubelet // 2] = kernel
    return out
  if method == "average":
    return np.repeat(kernel[None], tubelet, axis=0) / tubelet
  raise ConfigError(f"kernel must be one of {KERNELS} (scenic's central_frame_initializer, "
                    f"average_frame_initializer), got {method!r}")


def inflate(module: VisionTransformer, params: Dict[str, Any], *, num_frames: int,
            tubelet: int = 2, kernel: str = "central", image_size: Optional[Sequence[int]] = None,
            posemb: Optional[str] = None,
            prefix_per_slice: bool = True) -> Tuple[VisionTransformer, Dict[str, Any]]:
  """(video module, video params) from an image ViT and its params (see the module docstring).

  `num_frames`: the clips' frames (a multiple of `tubelet`); `image_size`: the clips' (H, W),
  by default the grid of the image model's learned table (or none needed); `posemb`: the video
  model's table, "learn" (default for learned and fixed 2-D tables) or "learn_factorised";
  `prefix_per_slice`: the class/register tokens attend as one copy per time slice (see the
  module docstring); False gives ViViT's plain class token.
  """
  if not isinstance(module, VisionTransformer):
    raise ConfigError(f"inflate takes a vitoken VisionTransformer, got {type(module).__name__}")
  patch = tuple(module.patch_size)
  if len(patch) != 2:
    raise ConfigError(f"the model is already a video model (patch_size {patch}); inflate takes "
                      "an image model")
  if kernel not in KERNELS:
    raise ConfigError(f"kernel must be one of {KERNELS}, got {kernel!r}")
  if int(tubelet) < 1 or int(num_frames) < 1 or num_frames % tubelet:
    raise ConfigError(f"num_frames={num_frames} must be a positive multiple of tubelet={tubelet} "
                      "(the frames a tubelet spans)")
  params = dict(params)
  if "embedding" not in params:
    raise InputError("params have no 'embedding' (the patch embedding): not a vitoken ViT's "
                     f"params? Top-level keys: {sorted(params)}")
  image_kernel = np.asarray(params["embedding"]["kernel"])
  if image_kernel.shape[:2] != patch or image_kernel.shape[2] != module.channels:
    raise InputError(
        f"the params' patch embedding {image_kernel.shape} is not the module's "
        f"{patch[0]}x{patch[1]} patches of {module.channels} channels: inflating keeps the "
        "patch size (convert or resize the image model to the patch size you want first)")

  source = module.posemb
  if posemb is None:
    posemb = "learn" if source != "none" else "none"
  allowed = ("learn", "learn_factorised") if source != "none" else ("none",)
  if posemb not in allowed:
    raise ConfigError(f"a model with posemb={source!r} inflates to posemb in {allowed}, "
                      f"got {posemb!r}")
  n_prefix = module.num_prefix if module.posemb_prefix else 0
  grid = _image_grid(module, params, image_size, n_prefix)
  video = module.clone(patch_size=(int(tubelet),) + patch, posemb=posemb,
                       prefix_per_slice=bool(prefix_per_slice))
  out = dict(params)
  out["embedding"] = {**params["embedding"],
                      "kernel": inflate_kernel(image_kernel, int(tubelet), kernel)}
  if source != "none":
    table = _image_table(module, params, grid, n_prefix)
    if posemb == "learn":
      slices = num_frames // tubelet
      prefix, patches = table[:, :n_prefix], table[:, n_prefix:]
      out["pos_embedding"] = np.concatenate([prefix, np.tile(patches, (1, slices, 1))], axis=1)
    else:
      out["pos_embedding"] = table
      out["pos_embedding_time"] = np.zeros((1, num_frames // tubelet, table.shape[-1]),
                                           table.dtype)
  return video, out


def _image_grid(module, params, image_size, n_prefix) -> Tuple[int, int]:
  """The clips' spatial patch grid: from `image_size`, else the learned table's square grid."""
  if image_size is not None:
    return PatchGrid.of(tuple(image_size), tuple(module.patch_size)).hw
  if module.posemb == "learn":
    n = np.asarray(params["pos_embedding"]).shape[1] - n_prefix
    side = int(round(np.sqrt(n)))
    if side * side != n:
      raise InputError(f"pos_embedding of {n} patches is not a square grid: pass image_size")
    return side, side
  if module.posemb in ("sincos2d", "sincos2d_mae"):
    raise ConfigError(f"posemb={module.posemb!r} has no stored grid: pass image_size=(H, W)")
  return (1, 1)  # no table: the grid is not needed


def _image_table(module, params, grid, n_prefix) -> np.ndarray:
  """The image model's [1, n_prefix + gh*gw, C] position table on the clips' grid."""
  if module.posemb == "learn":
    table = np.asarray(params["pos_embedding"])
    n = table.shape[1] - n_prefix
    if n == grid[0] * grid[1]:
      return table
    side = int(round(np.sqrt(n)))
    if side * side != n:
      raise InputError(f"pos_embedding of {n} patches is neither the {grid[0]}x{grid[1]} grid of "
                       "image_size nor a square one to resize from")
    return np.asarray(posemb_lib.resize_posemb(table, (side, side), grid, num_prefix=n_prefix,
                                               method="big_vision"))
  fixed = posemb_lib.sincos_2d if module.posemb == "sincos2d" else posemb_lib.sincos_2d_mae
  table = np.asarray(fixed(grid, module.width), np.float32)
  if n_prefix:
    table = np.concatenate([np.zeros((1, n_prefix, module.width), table.dtype), table], axis=1)
  return table
