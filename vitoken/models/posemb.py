"""Position embeddings: fixed 2-D sin-cos tables, VideoMAE's 1-D one over a token sequence,
and resizing learned ones to a new patch grid.

Grids are (rows, cols) pairs or `PatchGrid`s (of one frame: the 2-D tables are 2-D).
"""
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from vitoken.errors import ConfigError, InputError
from vitoken.models.patches import PatchGrid, spatial_grid

Grid = Union[PatchGrid, Sequence[int]]


def sincos_2d(grid: Grid, width: int, temperature: float = 10_000.0, dtype=jnp.float32):
  """MoCo-v3 / big_vision fixed embedding: [1, h*w, width] of (sin x, cos x, sin y, cos y)."""
  h, w = spatial_grid(grid)
  if width % 4:
    raise ConfigError(f"sincos2d position embeddings need a width divisible by 4, got {width}")
  y, x = np.mgrid[:h, :w]
  omega = np.arange(width // 4) / (width // 4 - 1)
  omega = 1.0 / (temperature ** omega)
  y = np.einsum("m,d->md", y.flatten(), omega)
  x = np.einsum("m,d->md", x.flatten(), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(pe, dtype)[None]


def sincos_1d(length: int, width: int, dtype=jnp.float32):
  """VideoMAE's fixed table over a token sequence (`get_sinusoid_encoding_table`): [1, length,
  width], entry (pos, j) = sin(pos / 10000^(2*(j//2)/width)) for even j, cos for odd j,
  computed in float64 as the reference's numpy code does, then cast."""
  if length < 1 or width < 1:
    raise ConfigError(f"sincos_1d needs a positive length and width, got {length} and {width}")
  j = np.arange(width)
  angle = np.arange(length, dtype=np.float64)[:, None] / np.power(10000.0, 2 * (j // 2) / width)
  table = np.where(j % 2 == 0, np.sin(angle), np.cos(angle))
  return jnp.asarray(table, dtype)[None]


def resize_posemb(posemb, old_grid: Grid, new_grid: Grid, *,
                  num_prefix: int = 0, method: str = "bilinear"):
  """Resamples a learned [1, num_prefix + gh*gw, C] embedding to a new patch grid.

  Prefix entries (class/register positions) are kept as they are. `method` is a
  `jax.image.resize` method with antialiasing (timm's `resample_abs_pos_embed`), or
  "big_vision": `scipy.ndimage.zoom(order=1)`, as big_vision's `resample_posemb`.
  """
  posemb = jnp.asarray(posemb)
  old_grid, new_grid = spatial_grid(old_grid), spatial_grid(new_grid)
  expected = num_prefix + old_grid[0] * old_grid[1]
  if posemb.ndim != 3 or posemb.shape[0] != 1 or posemb.shape[1] != expected:
    raise InputError(f"position embedding of shape {tuple(posemb.shape)} does not match a "
                     f"{old_grid[0]}x{old_grid[1]} grid with {num_prefix} prefix positions "
                     f"(expected [1, {expected}, C])")
  if old_grid == new_grid:
    return posemb
  prefix, grid = posemb[:, :num_prefix], posemb[:, num_prefix:]
  grid = grid.reshape(old_grid + (-1,))
  if method == "big_vision":
    import scipy.ndimage  # pylint: disable=import-outside-toplevel  (heavy; only this resize mode needs it)
    zoom = (new_grid[0] / old_grid[0], new_grid[1] / old_grid[1], 1)
    grid = jnp.asarray(scipy.ndimage.zoom(np.asarray(grid, np.float32), zoom, order=1))
  else:
    grid = jax.image.resize(grid.astype(jnp.float32), new_grid + grid.shape[-1:], method=method,
                            antialias=True)
  grid = grid.reshape((1, new_grid[0] * new_grid[1], -1)).astype(posemb.dtype)
  return jnp.concatenate([prefix, grid], axis=1)


def sincos_2d_mae(grid: Grid, width: int, dtype=jnp.float32):
  """MAE's fixed embedding (facebookresearch/mae `get_2d_sincos_pos_embed`): [1, h*w, width].

  Same layout as `sincos_2d` (sin/cos of the column, then of the row) but the frequencies are
  10000^(-i / (width/4)) for i < width/4, where big_vision divides by width/4 - 1; computed in
  float64 as the reference's numpy code does, then cast.
  """
  h, w = spatial_grid(grid)
  if width % 4:
    raise ConfigError(f"MAE sin-cos position embeddings need a width divisible by 4, got {width}")
  quarter = width // 4
  omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.mgrid[:h, :w].astype(np.float64)
  col = np.einsum("m,d->md", cols.reshape(-1), omega)
  row = np.einsum("m,d->md", rows.reshape(-1), omega)
  pe = np.concatenate([np.sin(col), np.cos(col), np.sin(row), np.cos(row)], axis=1)
  return jnp.asarray(pe, dtype)[None]
