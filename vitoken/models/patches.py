"""The patch grid of an image or a video: one small immutable object for the sizes every model,
mask and picture derives from it.

    grid = PatchGrid.of((224, 224), 16)          # patch (16, 16), grid (14, 14)
    grid = PatchGrid.of((8, 224, 224), (2, 16, 16))   # with time: grid (4, 14, 14)
    tokens = grid.patchify(images)               # [B, L, prod(patch) * C]

Tokens are numbered time-major, then row-major (frame, row, column), and each patch is
flattened (time, row, column, channel); in 2-D that is MAE's `patchify` order, which matches a
patch-embedding convolution's (row, column, channel) kernel. A grid is hashable, so it can be
a static field of a pytree (`TokenState.grid`).
"""
import dataclasses
import math
from typing import Sequence, Tuple, Union

import numpy as np

from vitoken.errors import ConfigError, InputError

Size = Union[int, Sequence[int]]


def _ints(values, what: str, minimum: int) -> Tuple[int, ...]:
  try:
    out = tuple(values)
  except TypeError:
    raise ConfigError(f"{what} must be a sequence of ints, got {values!r}") from None
  if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum for v in out):
    raise ConfigError(f"{what} must be ints >= {minimum}, got {values!r}")
  return tuple(int(v) for v in out)


def _times(values: Sequence[int]) -> str:
  return "x".join(str(v) for v in values)


@dataclasses.dataclass(frozen=True)
class PatchGrid:
  """`patch` (ph, pw) or (pt, ph, pw) pixels per patch, `grid` (gh, gw) or (gt, gh, gw)
  patches per axis. Build one from an image size with `PatchGrid.of`."""
  patch: Tuple[int, ...]
  grid: Tuple[int, ...]

  def __post_init__(self):
    patch = _ints(self.patch, "patch size", 1)
    grid = _ints(self.grid, "patch grid", 0)
    if len(patch) not in (2, 3) or len(grid) != len(patch):
      raise ConfigError(f"a patch grid is 2-D (height, width) or 3-D (time, height, width) with "
                        f"one patch size per axis, got patch {patch} and grid {grid}")
    object.__setattr__(self, "patch", patch)
    object.__setattr__(self, "grid", grid)

  @classmethod
  def of(cls, image_size: Sequence[int], patch: Size) -> "PatchGrid":
    """The grid of `patch` over `image_size` (H, W) or (T, H, W). `patch` is one int (square
    spatial patches, one frame deep) or one size per axis; a spatial (ph, pw) patch over a
    (T, H, W) size is one frame deep. A patch that does not divide the size is an error."""
    size = _ints(image_size, "image size", 1)
    if len(size) not in (2, 3):
      raise InputError(f"image size must be (height, width) or (time, height, width), got {size}")
    patch = (patch, patch) if isinstance(patch, (int, np.integer)) else tuple(patch)
    if len(size) == 3 and len(patch) == 2:
      patch = (1,) + patch
    patch = _ints(patch, "patch size", 1)
    if len(patch) != len(size):
      raise InputError(f"patch size {_times(patch)} does not match the {len(size)}-D image size "
                       f"{_times(size)}")
    if len(size) == 3 and size[0] % patch[0]:
      raise InputError(f"clips of {size[0]} frames do not split into tubelets of {patch[0]} "
                       f"frames (patch size {_times(patch)}, clip size {_times(size)})")
    if any(s % p for s, p in zip(size, patch)):
      raise InputError(f"patch size {_times(patch)} does not divide the image size {_times(size)}")
    return cls(patch, tuple(s // p for s, p in zip(size, patch)))

  @classmethod
  def coerce(cls, grid: Union["PatchGrid", Sequence[int]]) -> "PatchGrid":
    """A PatchGrid as is; a bare (gh, gw) or (gt, gh, gw) token grid as one of 1-pixel patches
    (for token states built without an image, whose patch size nothing reads)."""
    if isinstance(grid, PatchGrid):
      return grid
    grid = tuple(grid)
    return cls((1,) * len(grid), grid)

  # ---- sizes ------------------------------------------------------------------------------
  @property
  def ndim(self) -> int:
    """2 for images, 3 with time."""
    return len(self.grid)

  @property
  def num_patches(self) -> int:
    """The token count: prod(grid)."""
    return math.prod(self.grid)

  @property
  def hw(self) -> Tuple[int, int]:
    """The spatial grid (gh, gw)."""
    return self.grid[-2:]

  @property
  def frames(self) -> int:
    """Patches along time (gt); 1 for a 2-D grid."""
    return self.grid[0] if self.ndim == 3 else 1

  def slice_grid(self) -> "PatchGrid":
    """The 2-D grid of one time slice (patch and grid without the time axis); itself in 2-D."""
    return self if self.ndim == 2 else PatchGrid(self.patch[1:], self.grid[1:])

  @property
  def size(self) -> Tuple[int, ...]:
    """The pixel size (H, W) or (T, H, W) the grid covers."""
    return tuple(g * p for g, p in zip(self.grid, self.patch))

  @property
  def image_size(self) -> Tuple[int, ...]:
    return self.size

  def patch_dim(self, channels: int) -> int:
    """Values in one flattened patch: prod(patch) * channels."""
    return math.prod(self.patch) * channels

  # ---- tokens <-> pixels ------------------------------------------------------------------
  def _layout(self) -> str:
    return ("[batch, height, width, channels]" if self.ndim == 2
            else "[batch, time, height, width, channels]")

  def patchify(self, x):
    """[B, H, W, C] or [B, T, H, W, C] -> [B, L, prod(patch) * C] (numpy or jax arrays)."""
    if x.ndim != self.ndim + 2:
      raise InputError(f"images must be {self._layout()}, got shape {tuple(x.shape)}")
    if tuple(x.shape[1:-1]) != self.size:
      raise InputError(f"images of shape {tuple(x.shape)} are not the {_times(self.size)} "
                       f"pixels of a {_times(self.grid)} grid of {_times(self.patch)} patches")
    b, c = x.shape[0], x.shape[-1]
    if self.ndim == 2:
      (gh, gw), (ph, pw) = self.grid, self.patch
      x = x.reshape(b, gh, ph, gw, pw, c).transpose(0, 1, 3, 2, 4, 5)
    else:
      (gt, gh, gw), (pt, ph, pw) = self.grid, self.patch
      x = x.reshape(b, gt, pt, gh, ph, gw, pw, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, self.num_patches, self.patch_dim(c))

  def unpatchify(self, patches, channels: int):
    """The inverse of `patchify`: [B, L, prod(patch) * C] -> [B, H, W, C] or [B, T, H, W, C]."""
    b = patches.shape[0]
    if tuple(patches.shape[1:]) != (self.num_patches, self.patch_dim(channels)):
      raise InputError(f"patches of shape {tuple(patches.shape)} are not {_times(self.grid)} "
                       f"patches of {_times(self.patch)}x{channels}")
    if self.ndim == 2:
      (gh, gw), (ph, pw) = self.grid, self.patch
      x = patches.reshape(b, gh, gw, ph, pw, channels).transpose(0, 1, 3, 2, 4, 5)
    else:
      (gt, gh, gw), (pt, ph, pw) = self.grid, self.patch
      x = patches.reshape(b, gt, gh, gw, pt, ph, pw, channels).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape((b,) + self.size + (channels,))


def spatial_grid(grid: Union[PatchGrid, Sequence[int]]) -> Tuple[int, int]:
  """(gh, gw) of a 2-D PatchGrid (or of a 3-D one of a single frame), or of a (gh, gw) pair:
  the grid a 2-D position embedding is laid over."""
  if isinstance(grid, PatchGrid):
    if grid.frames != 1:
      raise ConfigError(f"a 2-D position embedding cannot cover a grid of {grid.frames} frames "
                        f"({_times(grid.grid)})")
    return grid.hw
  return tuple(grid)
