"""Masked autoencoder (He et al., CVPR 2022), as facebookresearch/mae `models_mae.py` defines it.

The encoder is vitoken's ordinary ViT with the `random_masking` reducer at the embedding, so
its parameters load into a ViT for fine-tuning unchanged. The decoder embeds the visible
tokens to its own width, appends mask tokens, unshuffles them with `ids_restore`, adds fixed
sin-cos positions, runs its blocks and predicts every patch's pixels; the loss is the
per-patch MSE averaged over the masked patches only.

    model = mae.MaskedAutoencoder(encoder={"variant": "B/16"})
    loss, pred, mask = model.apply({"params": params}, images_nhwc, noise=noise)
"""
from typing import Any, Dict, Optional

import flax.linen as nn
import jax.numpy as jnp

from vitoken import settings as settings_lib
from vitoken.errors import ConfigError
from vitoken.models import posemb as posemb_lib, variants, vit
from vitoken.models.masking import (  # noqa: F401
  check_mask_ratio,
  keep_count,
  patch_grid,
  patchify,
  random_masking,
  unpatchify,
)
from vitoken.models.reducers import base as rbase

# Encoder settings of a pretraining encoder: it ends at its LayerNorm over every token.
_PRETRAIN_FIXED = {"num_classes": 0, "pool_type": "none", "fc_norm": False}
MASKING_ENTRY = "masking"


def encoder_fields(fields: Any, what: str) -> Dict[str, Any]:
  """ViT fields for a pretraining encoder: MAE's defaults (class token, MAE's fixed sin-cos
  positions, LayerNorm eps 1e-6), and no pooling or head."""
  fields = settings_lib.as_dict(fields, f"{what} encoder")
  for key, value in _PRETRAIN_FIXED.items():
    if key in fields and fields[key] != value:
      raise ConfigError(f"{what} encoder: {key}={fields[key]!r} belongs to fine-tuning; the "
                        "pretraining encoder ends at its LayerNorm over every token "
                        f"({key}={value!r})")
  fields = {"class_token": True, "posemb": "sincos2d_mae", "layer_norm_eps": 1e-6, **fields,
            **_PRETRAIN_FIXED}
  for key in ("dtype", "param_dtype"):
    if isinstance(fields.get(key), str):
      fields[key] = jnp.dtype(fields[key])
  settings_lib.check_keys(fields, vit.option_names() + ("variant",), f"{what} encoder")
  return fields


def pretraining_encoder(fields: Dict[str, Any], entry: Dict[str, Any],
                        name: Optional[str] = None) -> vit.VisionTransformer:
  """The encoder ViT with the masking reducer `entry` first among its token reductions: a
  submodule named `name` when built inside a module, else a free-standing one."""
  fields = dict(fields)
  extra = settings_lib.plain(fields.pop("token_reduction", None))
  extra = [] if extra in (None, {}, ()) else [extra] if isinstance(extra, dict) else list(extra)
  fields = {**variants.decode_variant(fields.pop("variant", None)), **fields}
  # A module built in a method of an unbound module would attach to it; parent=None keeps a
  # free-standing copy (for reading its settings) from doing so.
  where = {"name": name} if name else {"parent": None}
  return vit.VisionTransformer(token_reduction=[entry] + extra, **where, **fields)


def check_token_count(encoded, expected: int, what: str):
  """Pretraining needs every (kept) patch token where the masking left it."""
  if encoded.shape[1] != expected:
    raise ConfigError(f"{what}: the encoder returned {encoded.shape[1]} tokens where the masking "
                      f"leaves {expected}; token reducers that change the token count cannot run "
                      "during pretraining (switch them on at fine-tune time)")


def patch_stats(patches):
  """Each patch's mean and sqrt(unbiased variance + 1e-6), as `norm_pix_loss` normalises
  (torch's Tensor.var is unbiased): patches [B, L, P] -> two [B, L, 1]."""
  mean = patches.mean(axis=-1, keepdims=True)
  return mean, jnp.sqrt(patches.var(axis=-1, ddof=1, keepdims=True) + 1e-6)


def per_example_loss(images, pred, mask, patch, norm_pix_loss: bool):
  """([B] sums over the masked patches of the per-patch pixel MSE, [B] masked patch counts)."""
  target = patchify(jnp.asarray(images, jnp.float32), patch)
  if norm_pix_loss:
    mean, std = patch_stats(target)
    target = (target - mean) / std
  per_patch = ((pred.astype(jnp.float32) - target) ** 2).mean(axis=-1)
  mask = mask.astype(jnp.float32)
  return (per_patch * mask).sum(axis=1), mask.sum(axis=1)


def loss(images, pred, mask, patch, norm_pix_loss: bool = False):
  """MAE's loss: per-patch MSE (optionally on per-patch normalised pixels), averaged over the
  masked patches of the whole batch. images [B, H, W, C], pred [B, L, p*p*C], mask [B, L]."""
  total, count = per_example_loss(images, pred, mask, patch, norm_pix_loss)
  return total.sum() / count.sum()


class MAEDecoder(nn.Module):
  """Visible latents [B, P + K, C] and ids_restore [B, L] -> pixel predictions [B, L, p*p*c]."""
  width: int = 512
  depth: int = 8
  num_heads: int = 16
  mlp_dim: Optional[int] = None
  patch_pixels: int = 768
  num_prefix: int = 1
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = False
  attention_impl: Optional[str] = None
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, latent, ids_restore, grid, *, deterministic: bool = True):
    """`grid`: the encoder's PatchGrid (or its (gh, gw))."""
    dense = lambda n, name: nn.Dense(n, kernel_init=nn.initializers.xavier_uniform(), dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    x = dense(self.width, "embed")(latent)
    b, p, length = x.shape[0], self.num_prefix, ids_restore.shape[1]
    token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, self.width),
                       self.param_dtype).astype(x.dtype)
    patches = jnp.concatenate(
        [x[:, p:], jnp.broadcast_to(token, (b, length - (x.shape[1] - p), self.width))], axis=1)
    patches = rbase.take_tokens(patches, ids_restore)
    pos = posemb_lib.sincos_2d_mae(grid, self.width, dtype=x.dtype)
    x = jnp.concatenate([x[:, :p], patches + pos], axis=1)  # prefix positions are zero in MAE
    x = decoder_blocks(self, x, p, grid, deterministic)
    return dense(self.patch_pixels, "pred")(x)[:, p:].astype(jnp.float32)


def decoder_blocks(decoder: nn.Module, x, num_prefix: int, grid, deterministic: bool):
  """A decoder's pre-norm blocks (`block_NN`) and final LayerNorm (`norm`) over x [B, N, C],
  built inside `decoder`'s compact call from its fields (depth, num_heads, mlp_dim, ...)."""
  # A decoder's tokens follow its own order (VideoMAE's: visible, then masked), not time slices.
  state = rbase.TokenState.create(x, num_prefix=num_prefix, grid=grid).replace(slices=1)
  for i in range(decoder.depth):
    state, _ = vit.EncoderBlock(
        decoder.num_heads, decoder.mlp_dim or 4 * decoder.width, layer=i,
        gelu_approximate=decoder.gelu_approximate, layer_norm_eps=decoder.layer_norm_eps,
        attention_impl=decoder.attention_impl, deterministic=deterministic, dtype=decoder.dtype,
        param_dtype=decoder.param_dtype, name=f"block_{i:02d}")(state)
  return nn.LayerNorm(decoder.layer_norm_eps, dtype=decoder.dtype,
                      param_dtype=decoder.param_dtype, name="norm")(state.x)


def check_decoder(width: int, depth: int, num_heads: int):
  for key, value in (("decoder_width", width), ("decoder_depth", depth),
                     ("decoder_heads", num_heads)):
    if not settings_lib.is_count(value):
      raise ConfigError(f"{key} must be a positive int, got {value!r}")
  if width % num_heads:
    raise ConfigError(f"decoder_width {width} is not divisible by decoder_heads {num_heads}")
  if width % 4:
    raise ConfigError(f"decoder_width {width} must be divisible by 4 (sin-cos positions)")


class MaskedAutoencoder(nn.Module):
  """MAE pretraining: `apply(variables, images, noise=None, mask_ratio=None, train=False)`
  -> (loss, pred [B, L, p*p*C], mask [B, L]). Without `noise` it draws uniform noise from the
  "masking" rng stream. Params: {"encoder": a ViT's, "decoder": ...}."""
  encoder: Any = None  # ViT fields, e.g. {"variant": "B/16"}
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_heads: int = 16  # the decoder's own head count, not the encoder variant's
  decoder_mlp_dim: Optional[int] = None
  mask_ratio: float = 0.75
  norm_pix_loss: bool = False

  def encoder_config(self) -> Dict[str, Any]:
    return encoder_fields(self.encoder, "MAE")

  def encoder_model(self, mask_ratio: Optional[float] = None, name: Optional[str] = None):
    entry = {"method": "random_masking", "name": MASKING_ENTRY,
             "mask_ratio": self.mask_ratio if mask_ratio is None else mask_ratio}
    return pretraining_encoder(self.encoder_config(), entry, name)

  def rng_streams(self) -> frozenset:
    return self.encoder_model().rng_streams()

  @nn.compact
  def __call__(self, images, *, noise=None, mask_ratio=None, train: bool = False):
    check_decoder(self.decoder_width, self.decoder_depth, self.decoder_heads)
    ratio = check_mask_ratio(self.mask_ratio if mask_ratio is None else mask_ratio)
    encoder = self.encoder_model(ratio, name="encoder")
    inputs = {} if noise is None else {"noise": noise}
    _, aux = encoder(images, train=train, inputs=inputs)
    record = aux["reduction"][MASKING_ENTRY]
    grid = encoder.patch_grid(images.shape[1:3])
    check_token_count(aux["encoded"], encoder.num_prefix + keep_count(grid.num_patches, ratio),
                      "MAE")
    patch = tuple(encoder.patch_size)
    pred = MAEDecoder(
        self.decoder_width, self.decoder_depth, self.decoder_heads, self.decoder_mlp_dim,
        grid.patch_dim(encoder.channels), encoder.num_prefix, encoder.layer_norm_eps,
        encoder.gelu_approximate, encoder.attention_impl, encoder.dtype, encoder.param_dtype,
        name="decoder")(aux["encoded"], record["ids_restore"], grid, deterministic=not train)
    mask = record["mask"]
    return loss(images, pred, mask, patch, self.norm_pix_loss), pred, mask

