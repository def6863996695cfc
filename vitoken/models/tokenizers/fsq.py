"""A finite-scalar-quantised (FSQ) autoencoder tokenizer (Mentzer et al., ICLR 2024).

FSQ needs no codebook to learn: each of d latent channels is bounded and rounded to one of
L_i levels, and the code is the mixed-radix number of the rounded channels, so the codebook
has prod(L_i) entries and cannot collapse by construction (usage still shows whether the
encoder spreads over it). As the paper's reference code:
    bound(z)  = tanh(z + tan(offset / half_l)) * half_l - offset,
                half_l = (L - 1)(1 - 1e-3) / 2, offset = 0.5 for even L, else 0
    zhat      = round_ste(bound(z)) / (L // 2)          (straight-through rounding)
    code      = sum_i (zhat_i * (L_i // 2) + L_i // 2) * prod_{j<i} L_j

The autoencoder: vitoken's ViT over the patches (no class token), a linear map to d channels,
FSQ, a linear map back, fixed sin-cos positions, `decoder_depth` transformer blocks and a
linear head to each patch's pixels; trained by the `fsq_tokenizer` task with the mean squared
error of the reconstruction (FSQ has no commitment or codebook loss).
"""
from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitoken import settings as settings_lib
from vitoken.errors import ConfigError
from vitoken.models import posemb as posemb_lib, variants, vit
from vitoken.models.masking import patchify
from vitoken.models.patches import PatchGrid
from vitoken.models.reducers import base as rbase
from vitoken.models.tokenizers import common

BOUND_EPS = 1e-3


def check_levels(levels) -> tuple:
  levels = tuple(settings_lib.plain(levels)) if isinstance(levels, (list, tuple)) else levels
  if (not isinstance(levels, tuple) or not levels
      or any(isinstance(l, bool) or not isinstance(l, (int, np.integer)) or l < 2 for l in levels)):
    raise ConfigError(f"FSQ levels must be a non-empty list of ints >= 2, got {levels!r}")
  size = common.check_codebook_size(int(np.prod(levels)), f"the FSQ codebook (product of levels {levels})")
  if size >= 2 ** 31:
    raise ConfigError(f"FSQ levels {levels} make {size} codes, more than int32 codes can hold")
  return tuple(int(l) for l in levels)


def bound(z, levels: Sequence[int]):
  levels = jnp.asarray(levels, jnp.float32)
  half_l = (levels - 1) * (1 - BOUND_EPS) / 2
  offset = jnp.where(levels % 2 == 0, 0.5, 0.0)
  shift = jnp.tan(offset / half_l)
  return jnp.tanh(z + shift) * half_l - offset


def round_ste(x):
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def quantize(z, levels: Sequence[int]):
  """Bounded, rounded channels, renormalised to about [-1, 1] (gradients pass straight)."""
  half_width = jnp.asarray([l // 2 for l in levels], jnp.float32)
  return round_ste(bound(z.astype(jnp.float32), levels)) / half_width


def codes_from_quantized(zhat, levels: Sequence[int]):
  half_width = jnp.asarray([l // 2 for l in levels], jnp.float32)
  basis = jnp.asarray(np.concatenate([[1], np.cumprod(levels[:-1])]), jnp.int32)
  digits = jnp.round(zhat * half_width + half_width).astype(jnp.int32)
  return jnp.sum(digits * basis, axis=-1)


def quantized_from_codes(codes, levels: Sequence[int]):
  half_width = jnp.asarray([l // 2 for l in levels], jnp.float32)
  basis = jnp.asarray(np.concatenate([[1], np.cumprod(levels[:-1])]), jnp.int32)
  digits = (codes[..., None] // basis) % jnp.asarray(levels, jnp.int32)
  return (digits.astype(jnp.float32) - half_width) / half_width


def encoder_fields(fields: Any) -> Dict[str, Any]:
  """The tokenizer encoder's ViT fields: every patch token out, no class token or head."""
  fields = settings_lib.as_dict(fields, "FSQ tokenizer encoder")
  fields = {"posemb": "sincos2d_mae", **fields, "num_classes": 0, "pool_type": "none",
            "class_token": False, "fc_norm": False}
  settings_lib.check_keys(fields, vit.option_names() + ("variant",), "FSQ tokenizer encoder")
  for key in ("dtype", "param_dtype"):
    if isinstance(fields.get(key), str):
      fields[key] = jnp.dtype(fields[key])
  return {**variants.decode_variant(fields.pop("variant", None)), **fields}


class FSQAutoencoder(nn.Module):
  """`apply(variables, images)` -> (reconstructed patches [B, L, p*p*C], codes int32 [B, L])."""
  encoder: Any = None  # ViT fields of the encoder, e.g. {"variant": "Ti/8", "depth": 2}
  levels: Sequence[int] = (8, 8, 8)
  decoder_depth: int = 2
  decoder_heads: Optional[int] = None  # default: the encoder's

  def encoder_model(self, name: Optional[str] = None) -> vit.VisionTransformer:
    where = {"name": name} if name else {"parent": None}
    return vit.VisionTransformer(**encoder_fields(self.encoder), **where)

  @property
  def codebook_size(self) -> int:
    return int(np.prod(check_levels(self.levels)))

  def setup(self):
    levels = check_levels(self.levels)
    if not settings_lib.is_count(self.decoder_depth):
      raise ConfigError(f"decoder_depth must be a positive int, got {self.decoder_depth!r}")
    enc = self.encoder_model()
    self.vit = self.encoder_model(name="encoder")
    dense = lambda n, name: nn.Dense(n, dtype=enc.dtype, param_dtype=enc.param_dtype, name=name)
    self.project_in = dense(len(levels), "project_in")
    self.project_out = dense(enc.width, "project_out")
    self.blocks = [vit.EncoderBlock(self.decoder_heads or enc.num_heads, enc.mlp_dim or 4 * enc.width,
                                    layer=i, layer_norm_eps=enc.layer_norm_eps, dtype=enc.dtype,
                                    param_dtype=enc.param_dtype, name=f"decoder_block_{i:02d}")
                   for i in range(self.decoder_depth)]
    self.decoder_norm = nn.LayerNorm(enc.layer_norm_eps, dtype=enc.dtype, param_dtype=enc.param_dtype)
    ph, pw = enc.patch_size
    self.pred = dense(ph * pw * enc.channels, "pred")

  def quantized(self, images, train: bool = False):
    """(zhat [B, L, d] in about [-1, 1], codes int32 [B, L])."""
    _, aux = self.vit(images, train=train)
    zhat = quantize(self.project_in(aux["encoded"]), self.levels)
    return zhat, codes_from_quantized(zhat, self.levels)

  def encode(self, images):
    return self.quantized(images)[1]

  def decode_quantized(self, zhat, grid):
    """zhat [B, L, d] over `grid` (a PatchGrid, or its (gh, gw)) -> patches [B, L, p*p*C]."""
    x = self.project_out(zhat)
    x = x + posemb_lib.sincos_2d_mae(grid, x.shape[-1], dtype=x.dtype)
    state = rbase.TokenState.create(x, num_prefix=0, grid=grid)
    for block in self.blocks:
      state, _ = block(state)
    return self.pred(self.decoder_norm(state.x)).astype(jnp.float32)

  def decode(self, codes, grid):
    return self.decode_quantized(quantized_from_codes(codes, check_levels(self.levels)), grid)

  def __call__(self, images, train: bool = False):
    zhat, codes = self.quantized(images, train)
    return self.decode_quantized(zhat, self.vit.patch_grid(images.shape[1:3])), codes


class FSQTokenizer:
  """A trained FSQ autoencoder as a tokenizer: `encode(params, images)` -> codes [B, L]."""
  kind = "fsq"

  def __init__(self, model: FSQAutoencoder):
    self.model = model
    self.patch_size = tuple(model.encoder_model().patch_size)
    self.codebook_size = model.codebook_size

  def encode(self, params, images):
    return self.model.apply({"params": params}, images, method=FSQAutoencoder.encode)

  def decode(self, params, codes, images):
    grid = PatchGrid.of(images.shape[1:3], self.patch_size)
    patches = self.model.apply({"params": params}, codes, grid, method=FSQAutoencoder.decode)
    return grid.unpatchify(patches, images.shape[-1])

  def reconstruction_error(self, params, images, rng=None):
    """Per-example mean squared error of the reconstruction [B], and the codes [B, L];
    in training mode (dropout, drop path) when given an rng."""
    train = rng is not None
    pred, codes = self.model.apply({"params": params}, images, train=train,
                                   rngs={"dropout": rng} if train else {})
    target = patchify(jnp.asarray(images, jnp.float32), self.patch_size)
    return jnp.mean(jnp.square(pred - target), axis=(1, 2)), codes
