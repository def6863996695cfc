"""Masks for masked token modeling, drawn from a noise array so their shapes are static.

Both methods draw their randomness the same way, as uniform noise per example (from the input
pipeline, or from an rng stream inside the model), and turn it into a mask on the device:
- MAE keeps the `int(L * (1 - ratio))` patches of lowest noise (`argsort`, as the reference's
  `random_masking`), so the kept count is fixed and the encoder runs on fewer tokens;
- SimMIM masks the `ceil(count * ratio)` coarse cells of lowest noise, a uniformly random
  subset as the reference's `np.random.permutation(count)[:mask_count]`, then repeats each cell
  over the model patches it covers.
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
  """[B, H, W, C] -> [B, L, ph*pw*C], each patch flattened (row, column, channel) as MAE's."""
  if images.ndim != 4:
    raise InputError("images must be [batch, height, width, channels], got shape "
                     f"{tuple(images.shape)}")
  return PatchGrid.of(images.shape[1:3], pair(patch)).patchify(images)


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
