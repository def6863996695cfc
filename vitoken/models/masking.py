"""Masks for masked token modeling, drawn from a noise array so their shapes are static.

Both methods draw their randomness the same way, as uniform noise per example (from the input
pipeline, or from an rng stream inside the model), and turn it into a mask on the device:
- MAE keeps the `int(L * (1 - ratio))` patches of lowest noise (`argsort`, as the reference's
  `random_masking`), so the kept count is fixed and the encoder runs on fewer tokens;
- SimMIM masks the `ceil(count * ratio)` coarse cells of lowest noise, a uniformly random
  subset as the reference's `np.random.permutation(count)[:mask_count]`, then repeats each cell
  over the model patches it covers;
- VideoMAE's tube masking masks the `int(ratio * h * w)` spatial positions of highest noise at
  every time slice (its `TubeMaskingGenerator`: note the masked count is rounded down, where
  MAE rounds the kept count down: 176 of 14x14 masked at 0.9, not 177).
"""
import math
from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from vitoken.errors import ConfigError, InputError
from vitoken.models import gathers
from vitoken.models.patches import PatchGrid
from vitoken.settings import pair

Pair = Union[int, Sequence[int]]


def check_mask_ratio(ratio, what: str = "mask_ratio") -> float:
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
    raise ConfigError(f"{what} must be a number in (0, 1), got {ratio!r}")
  return float(ratio)


def patch_grid(image_hw: Sequence[int], patch: Pair) -> Tuple[int, int]:
  """(gh, gw): `PatchGrid.of(image_hw, patch).grid` for an image."""
  return PatchGrid.of(tuple(image_hw), pair(patch)).grid


def patchify(images, patch: Pair):
  """[B, H, W, C] -> [B, L, ph*pw*C], each patch flattened (row, column, channel) as MAE's; or
  clips [B, T, H, W, C] with a (t, p, p) patch -> [B, T/t*h*w, t*p*p*C], flattened (time, row,
  column, channel) as VideoMAE's `(p0 p1 p2 c)`."""
  video = not isinstance(patch, int) and len(tuple(patch)) == 3
  if images.ndim != (5 if video else 4):
    raise InputError(("clips must be [batch, time, height, width, channels] for a (t, p, p) "
                      "patch" if video else "images must be [batch, height, width, channels]")
                     + f", got shape {tuple(images.shape)}")
  return PatchGrid.of(images.shape[1:-1], tuple(patch) if video else pair(patch)).patchify(images)


def unpatchify(patches, patch: Pair, grid: Sequence[int], channels: int):
  """The inverse of `patchify`: [B, L, ph*pw*C] -> [B, H, W, C]."""
  return PatchGrid(pair(patch), tuple(grid)).unpatchify(patches, channels)


def keep_count(length: int, mask_ratio: float) -> int:
  """How many of `length` patches MAE keeps: `int(L * (1 - ratio))`, the reference's rule."""
  keep = int(length * (1 - check_mask_ratio(mask_ratio)))
  if not 0 < keep < length:
    raise ConfigError(f"mask_ratio {mask_ratio} keeps {keep} of {length} patches; it must keep "
                      "at least one and mask at least one")
  return keep


def check_noise(noise, batch: int, length: int, what: str = "noise"):
  if tuple(noise.shape) != (batch, length):
    raise InputError(f"{what} must be [batch, {length}] (one value per patch), got shape "
                     f"{tuple(noise.shape)} for a batch of {batch}")


def shuffle_indices(noise) -> Tuple[jax.Array, jax.Array]:
  """(ids_shuffle, ids_restore): patches in ascending noise, and each patch's rank in it."""
  ids_shuffle = jnp.argsort(noise, axis=1)
  return ids_shuffle, jnp.argsort(ids_shuffle, axis=1)


def mae_mask(noise, mask_ratio: float):
  """MAE's masking of noise [B, L]: (ids_keep [B, K] in ascending noise, mask [B, L] float
  with 1 for removed patches in the original order, ids_restore [B, L])."""
  keep = keep_count(noise.shape[1], mask_ratio)
  ids_shuffle, ids_restore = shuffle_indices(noise)
  return ids_shuffle[:, :keep], (ids_restore >= keep).astype(jnp.float32), ids_restore


def random_masking(x, mask_ratio: float, noise):
  """MAE's per-example random masking (a batched gather, no vmap).

  x [B, L, D], noise [B, L] -> (kept [B, K, D] in ascending noise, mask [B, L] float with 1 for
  removed patches in the original order, ids_restore [B, L]).
  """
  check_noise(noise, *x.shape[:2])
  ids_keep, mask, ids_restore = mae_mask(noise, mask_ratio)
  return gathers.take_tokens(x, ids_keep), mask, ids_restore


def simmim_mask_count(cells: int, mask_ratio: float) -> int:
  return int(math.ceil(cells * check_mask_ratio(mask_ratio)))


def simmim_grids(image_hw: Sequence[int], patch: Pair, mask_patch: int):
  """(coarse mask grid, model patches per mask cell side) with SimMIM's divisibility rules."""
  (h, w), (ph, pw) = tuple(image_hw), pair(patch)
  if not isinstance(mask_patch, int) or isinstance(mask_patch, bool) or mask_patch <= 0:
    raise ConfigError(f"mask_patch_size must be a positive int, got {mask_patch!r}")
  if ph != pw:
    raise ConfigError(f"SimMIM masks need square model patches, got {ph}x{pw}")
  if mask_patch % ph:
    raise ConfigError(f"mask_patch_size {mask_patch} is not a multiple of the patch size {ph}")
  if h % mask_patch or w % mask_patch:
    raise ConfigError(f"mask_patch_size {mask_patch} does not divide the image size {h}x{w}")
  return PatchGrid.of((h, w), mask_patch).grid, mask_patch // ph


def simmim_mask(noise, mask_ratio: float, coarse_grid: Sequence[int], scale: int):
  """noise [B, gh*gw] -> mask [B, (gh*scale)*(gw*scale)] float, 1 where a patch is masked."""
  gh, gw = tuple(coarse_grid)
  check_noise(noise, noise.shape[0], gh * gw)
  count = simmim_mask_count(gh * gw, mask_ratio)
  _, ranks = shuffle_indices(noise)
  coarse = (ranks < count).reshape(-1, gh, gw)
  fine = jnp.repeat(jnp.repeat(coarse, scale, axis=1), scale, axis=2)
  return fine.reshape(noise.shape[0], -1).astype(jnp.float32)


def tube_mask_count(positions: int, mask_ratio: float) -> int:
  """VideoMAE's masked positions per time slice: `int(ratio * positions)`."""
  count = int(check_mask_ratio(mask_ratio) * positions)
  if count < 1:
    raise ConfigError(f"tube mask_ratio {mask_ratio} masks int({mask_ratio} * {positions}) = "
                      f"{count} of the {positions} positions of a time slice: it masks nothing")
  return count


def tube_mask(noise, mask_ratio: float, frames: int):
  """VideoMAE's tube masking: noise [B, h*w] -> mask [B, frames*h*w] float, 1 at the
  `int(ratio * h * w)` positions of highest noise, the same positions in every time slice
  (tokens time-major)."""
  if noise.ndim != 2:
    raise InputError(f"tube-mask noise must be [batch, positions per slice], got shape "
                     f"{tuple(noise.shape)}")
  if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
    raise ConfigError(f"frames (time slices) must be a positive int, got {frames!r}")
  positions = noise.shape[1]
  count = tube_mask_count(positions, mask_ratio)
  _, ranks = shuffle_indices(noise)
  spatial = (ranks >= positions - count).astype(jnp.float32)
  return jnp.tile(spatial, (1, frames))
