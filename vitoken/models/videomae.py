"""VideoMAE (Tong et al., NeurIPS 2022) as MCG-NJU/VideoMAE defines it: its reconstruction
targets and loss (`engine_for_pretraining.py`) and its pretraining model (`modeling_pretrain.py`).

    model = videomae.VideoMAE(encoder={"variant": "B/16x2"})
    loss, pred, mask = model.apply({"params": params}, clips_bthwc, noise=noise)

The encoder is vitoken's video ViT (no class token, VideoMAE's fixed 1-D sin-cos table over all
tokens, added before the masked tokens are dropped) with the `tube_masking` reducer at the
embedding, so its parameters load into a video ViT for fine-tuning unchanged. The decoder
projects the visible tokens to its width without a bias, appends one learned mask token per
masked tubelet, adds its own 1-D table (visible positions, then masked, each in ascending
order), runs its blocks and predicts the masked tubelets' pixels from its last M tokens.

The targets are the clip's pixels per tubelet, flattened (time, row, column, channel); with
`norm_target` each tubelet is normalised per channel over its t*p*p pixels by its mean and its
unbiased standard deviation plus 1e-6 (added to the deviation, not inside the square root,
unlike MAE's per-patch normalisation over all channels). The clip is first returned to pixel
values when it was normalised for the model (`input_mean`, `input_std`). The loss is the mean
squared error over every value of every masked tubelet, the masked tubelets taken in ascending
position order (the reference's boolean indexing).
"""
from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vitoken.errors import ConfigError, InputError
from vitoken.models import mae, masking, posemb as posemb_lib, vit
from vitoken.models.reducers import base as rbase

NORM_EPS = 1e-6


def unnormalise(videos, input_mean: Optional[Sequence[float]], input_std: Optional[Sequence[float]]):
  """videos * std + mean per channel (the reference's `unnorm_videos`); as is without stats."""
  videos = jnp.asarray(videos, jnp.float32)
  if input_mean is None and input_std is None:
    return videos
  mean = jnp.asarray(input_mean if input_mean is not None else 0.0, jnp.float32)
  std = jnp.asarray(input_std if input_std is not None else 1.0, jnp.float32)
  return videos * std + mean


def targets(videos, patch: Sequence[int], norm_target: bool = True, *, input_mean=None,
            input_std=None):
  """clips [B, T, H, W, C] -> [B, T/t*h*w, t*p*p*C] reconstruction targets."""
  patch = tuple(patch)
  if len(patch) != 3:
    raise InputError(f"VideoMAE targets need a (t, p, p) tubelet, got patch {patch}")
  pixels = unnormalise(videos, input_mean, input_std)
  tubes = masking.patchify(pixels, patch)  # [B, L, t*p*p*C], (time, row, column, channel)
  if not norm_target:
    return tubes
  b, n, _ = tubes.shape
  c = pixels.shape[-1]
  mean, scale = tube_stats(tubes, c)
  return ((tubes.reshape(b, n, -1, c) - mean) / scale).reshape(b, n, -1)


def tube_stats(tubes, channels: int):
  """(mean, unbiased standard deviation + 1e-6) of each tubelet and channel of `tubes`
  [B, L, t*p*p*C], [B, L, 1, C] each: what `targets` normalises by (and a picture of the
  predictions undoes)."""
  b, n, _ = tubes.shape
  per_channel = tubes.reshape(b, n, -1, channels)  # [B, L, t*p*p, C]
  mean = per_channel.mean(axis=2, keepdims=True)
  return mean, jnp.sqrt(per_channel.var(axis=2, ddof=1, keepdims=True)) + NORM_EPS


def masked_targets(target, mask, num_masked: int):
  """The targets of the masked tubelets, in ascending position: [B, M, D] with M static."""
  order = jnp.argsort(1 - mask, axis=1, stable=True)[:, :num_masked]  # masked first, in order
  return jnp.take_along_axis(target, order[..., None], axis=1)


def loss(videos, pred, mask, patch: Sequence[int], norm_target: bool = True, *, input_mean=None,
         input_std=None):
  """Mean squared error of `pred` [B, M, t*p*p*C] (the masked tubelets in ascending position
  order) against the targets; `mask` [B, L] is 1 at the M masked tubelets of every example."""
  target = targets(videos, patch, norm_target, input_mean=input_mean, input_std=input_std)
  if pred.ndim != 3 or pred.shape[0] != target.shape[0] or pred.shape[2] != target.shape[2]:
    raise InputError(f"predictions {tuple(pred.shape)} are not [batch, masked tubelets, "
                     f"{target.shape[2]}] for targets {tuple(target.shape)}")
  if tuple(mask.shape) != target.shape[:2]:
    raise InputError(f"mask {tuple(mask.shape)} is not [batch, {target.shape[1]}] tubelets")
  picked = masked_targets(target, mask, pred.shape[1])
  return jnp.mean((pred.astype(jnp.float32) - picked) ** 2)


MASKING_ENTRY = "masking"


def encoder_fields(fields: Any, method: str = "VideoMAE") -> Dict[str, Any]:
  """ViT fields of a video pretraining encoder (VideoMAE's; VIOLET's alike, so that one
  fine-tuning stage loads either): no class token, the fixed 1-D table, and no pooling or
  head; a video patch (t, p, p) is required."""
  fields = mae.encoder_fields({"class_token": False, "posemb": "sincos1d",
                               **(dict(fields) if fields else {})}, method)
  patch = fields.get("patch_size")
  if patch is None or len(tuple(patch)) != 3:
    raise ConfigError(f"the {method} encoder reads clips: config.model needs a tubelet patch_size "
                      f"(t, p, p), e.g. (4, 8, 8) or variant 'B/16x2'; got patch_size {patch}")
  return fields


class VideoMAEDecoder(nn.Module):
  """Visible latents [B, K, C] (position order) and the tube mask [B, L] -> pixel predictions
  [B, M, t*p*p*c] of the M masked tubelets in position order."""
  width: int = 384
  depth: int = 4
  num_heads: int = 6
  mlp_dim: Optional[int] = None
  patch_pixels: int = 1536
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = False
  attention_impl: Optional[str] = None
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, latent, mask, grid, *, deterministic: bool = True):
    dense = lambda n, name, **kw: nn.Dense(n, kernel_init=nn.initializers.xavier_uniform(),
                                           dtype=self.dtype, param_dtype=self.param_dtype,
                                           name=name, **kw)
    b, k = latent.shape[:2]
    length = mask.shape[1]
    m = length - k
    x = dense(self.width, "embed", use_bias=False)(latent)  # encoder_to_decoder
    # timm's trunc_normal_(std=.02, a=-.02, b=.02), as the reference: cut at one deviation.
    token = self.param("mask_token", nn.initializers.truncated_normal(0.02, lower=-1.0, upper=1.0),
                       (1, 1, self.width), self.param_dtype).astype(x.dtype)
    # Visible positions then masked ones, each ascending: a stable sort of the 0/1 mask.
    order = jnp.argsort(mask, axis=1, stable=True)
    table = jnp.broadcast_to(posemb_lib.sincos_1d(length, self.width, dtype=x.dtype),
                             (b, length, self.width))
    x = jnp.concatenate([x, jnp.broadcast_to(token, (b, m, self.width))], axis=1)
    x = mae.decoder_blocks(self, x + rbase.take_tokens(table, order), 0, grid, deterministic)
    return dense(self.patch_pixels, "pred")(x[:, k:]).astype(jnp.float32)


class VideoMAE(nn.Module):
  """VideoMAE pretraining: `apply(variables, clips, noise=None, mask=None, mask_ratio=None,
  train=False)` -> (loss, pred [B, M, t*p*p*C], mask [B, L]). `mask`: a [B, L] tube mask
  (1 = masked) from the input pipeline; else `noise` [B, h*w] draws one, else the "masking"
  rng stream. `input_mean` / `input_std`: how the clips were normalised (the targets are
  built from pixel values, as the reference's). Params: {"encoder": a video ViT's, "decoder"}."""
  encoder: Any = None  # video ViT fields, e.g. {"variant": "B/16x2"}
  decoder_width: int = 384
  decoder_depth: int = 4
  decoder_heads: int = 6
  decoder_mlp_dim: Optional[int] = None
  mask_ratio: float = 0.9
  norm_target: bool = True
  input_mean: Optional[Sequence[float]] = None
  input_std: Optional[Sequence[float]] = None

  def encoder_config(self) -> Dict[str, Any]:
    return encoder_fields(self.encoder)

  def encoder_model(self, mask_ratio: Optional[float] = None, name: Optional[str] = None):
    entry = {"method": "tube_masking", "name": MASKING_ENTRY,
             "mask_ratio": self.mask_ratio if mask_ratio is None else mask_ratio}
    return mae.pretraining_encoder(self.encoder_config(), entry, name)

  def rng_streams(self) -> frozenset:
    return self.encoder_model().rng_streams()

  @nn.compact
  def __call__(self, videos, *, noise=None, mask=None, mask_ratio=None, train: bool = False):
    mae.check_decoder(self.decoder_width, self.decoder_depth, self.decoder_heads)
    ratio = masking.check_mask_ratio(self.mask_ratio if mask_ratio is None else mask_ratio)
    encoder = self.encoder_model(ratio, name="encoder")
    inputs = {k: v for k, v in (("noise", noise), ("tube_mask", mask)) if v is not None}
    _, aux = encoder(videos, train=train, inputs=inputs)
    mask = aux["reduction"][MASKING_ENTRY]["mask"]
    grid = encoder.patch_grid(videos.shape[1:-1])
    positions = grid.num_patches // grid.frames
    visible = grid.frames * (positions - masking.tube_mask_count(positions, ratio))
    mae.check_token_count(aux["encoded"], visible, "VideoMAE")
    pred = VideoMAEDecoder(
        self.decoder_width, self.decoder_depth, self.decoder_heads, self.decoder_mlp_dim,
        grid.patch_dim(encoder.channels), encoder.layer_norm_eps, encoder.gelu_approximate,
        encoder.attention_impl, encoder.dtype, encoder.param_dtype, name="decoder")(
            aux["encoded"], mask, grid, deterministic=not train)
    value = loss(videos, pred, mask, tuple(encoder.patch_size), self.norm_target,
                 input_mean=self.input_mean, input_std=self.input_std)
    return value, pred, mask


def finetune_model(module: VideoMAE, num_classes: int, **fields) -> vit.VisionTransformer:
  """The video ViT that fine-tunes `module`'s encoder as VideoMAE's `modeling_finetune`: mean
  pooling over the tokens with a LayerNorm after it (`fc_norm`), then a fresh head."""
  encoder = {k: v for k, v in module.encoder_config().items()
             if k not in ("num_classes", "pool_type", "fc_norm", "token_reduction")}
  return vit.Model(num_classes, **{**encoder, "pool_type": "gap", "fc_norm": True, **fields})
