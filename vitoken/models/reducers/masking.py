"""Masked-modeling inputs as embedding-level reducers, so the encoder is the ordinary ViT.

- `random_masking` (MAE): keeps a random subset of the patch tokens, before the position
  embedding (each kept token then takes its own position through `ids`, which equals MAE's
  add-then-gather). It records `mask` and `ids_restore` for the decoder.
- `mask_token` (SimMIM): a learned token replaces the masked patches' embeddings; nothing is
  dropped, so the encoder sees every position;
- `tube_masking` (VideoMAE): keeps the tokens a tube mask leaves visible, in ascending position
  (the reference's `x[~mask]`), so each time slice keeps the same positions and the state
  stays ordered by slice.

Both read their randomness from the model's `inputs` (batch fields the input pipeline draws),
and `random_masking` draws from the "masking" rng stream when no noise is given.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from vitoken.errors import InputError
from vitoken.models import masking as masking_lib
from vitoken.models.reducers import base


@base.register("random_masking")
class RandomMasking(base.Reducer):
  mask_ratio: float = 0.75
  noise_key: str = "noise"  # the `inputs` entry with [B, L] noise

  stages = (base.PRE_POSEMB,)
  changes_shape = True
  rng_streams = frozenset({"masking"})

  @classmethod
  def layer_settings(cls, depth: int, mask_ratio: float = 0.75, noise_key: str = "noise"):
    return {base.EMBED_LAYER: {"mask_ratio": masking_lib.check_mask_ratio(mask_ratio),
                               "noise_key": noise_key}}

  def __call__(self, state, info, *, train=False):
    p = state.num_prefix
    b, length = state.x.shape[0], state.num_tokens - p
    noise = info.inputs.get(self.noise_key)
    if noise is None:
      noise = jax.random.uniform(self.make_rng("masking"), (b, length))
    masking_lib.check_noise(noise, b, length, f"inputs[{self.noise_key!r}]")
    ids_keep, mask, ids_restore = masking_lib.mae_mask(noise, self.mask_ratio)
    prefix = jnp.broadcast_to(jnp.arange(p, dtype=ids_keep.dtype), (b, p))
    state = state.gather(jnp.concatenate([prefix, p + ids_keep], axis=1))
    return state, {"mask": mask, "ids_restore": ids_restore}


@base.register("mask_token")
class MaskToken(base.Reducer):
  mask_key: str = "patch_mask"  # the `inputs` entry with the [B, L] mask (1 = masked)

  stages = (base.PRE_POSEMB,)
  changes_shape = False

  @classmethod
  def layer_settings(cls, depth: int, mask_key: str = "patch_mask"):
    return {base.EMBED_LAYER: {"mask_key": mask_key}}

  @nn.compact
  def __call__(self, state, info, *, train=False):
    p = state.num_prefix
    b, length, width = state.x.shape[0], state.num_tokens - p, state.x.shape[-1]
    if self.mask_key not in info.inputs:
      raise InputError(f"mask_token needs inputs[{self.mask_key!r}], a [batch, {length}] mask "
                       "of the patches to replace (1 = masked)")
    mask = info.inputs[self.mask_key]
    masking_lib.check_noise(mask, b, length, f"inputs[{self.mask_key!r}]")
    token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, width),
                       self.context.param_dtype).astype(state.x.dtype)
    w = mask.astype(state.x.dtype)[..., None]
    patches = state.x[:, p:] * (1 - w) + token * w
    return state.replace(x=jnp.concatenate([state.x[:, :p], patches], axis=1)), {}


@base.register("tube_masking")
class TubeMasking(base.Reducer):
  mask_ratio: float = 0.9
  mask_key: str = "tube_mask"  # the `inputs` entry with a [B, L] tube mask (1 = masked)
  noise_key: str = "noise"  # else the entry with [B, h*w] noise to draw one from

  stages = (base.PRE_POSEMB,)
  changes_shape = True
  keeps_slices = True  # the same positions stay visible in every time slice
  rng_streams = frozenset({"masking"})

  @classmethod
  def layer_settings(cls, depth: int, mask_ratio: float = 0.9, mask_key: str = "tube_mask",
                     noise_key: str = "noise"):
    return {base.EMBED_LAYER: {"mask_ratio": masking_lib.check_mask_ratio(mask_ratio),
                               "mask_key": mask_key, "noise_key": noise_key}}

  def __call__(self, state, info, *, train=False):
    p, frames = state.num_prefix, state.grid.frames
    b, length = state.x.shape[0], state.num_tokens - p
    positions = length // frames
    masked = masking_lib.tube_mask_count(positions, self.mask_ratio)
    mask = info.inputs.get(self.mask_key)
    if mask is None:
      noise = info.inputs.get(self.noise_key)
      if noise is None:
        noise = jax.random.uniform(self.make_rng("masking"), (b, positions))
      masking_lib.check_noise(noise, b, positions, f"inputs[{self.noise_key!r}]")
      mask = masking_lib.tube_mask(noise, self.mask_ratio, frames)
    masking_lib.check_noise(mask, b, length, f"inputs[{self.mask_key!r}]")
    keep = frames * (positions - masked)
    # Visible tokens first, each group in position order (a stable sort of the 0/1 mask).
    ids_keep = jnp.argsort(mask, axis=1, stable=True)[:, :keep]
    prefix = jnp.broadcast_to(jnp.arange(p, dtype=ids_keep.dtype), (b, p))
    state = state.gather(jnp.concatenate([prefix, p + ids_keep], axis=1))
    return state, {"mask": mask.astype(jnp.float32)}
