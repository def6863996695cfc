"""VIOLET-style masked visual-token modeling on clips (Fu et al., 2021, tsujuifu/pytorch_violet;
BEiT's task on video): a frozen image tokenizer gives every frame's patches a code; space-time
block masks (`block_masking.SpaceTimeBlockMasking` or VIOLET's own) choose tokens of the clip;
a learned mask token replaces their tubelet embeddings (the `mask_token` reducer, before the
position table); the video encoder sees every token; a linear head over each normalised token
predicts the codes of the frames its tubelet spans.

The tokenizer codes single frames (tubelet 1): a video model with tubelets of t frames x p x p
has, per token, the t codes of its p x p patch in each of its t frames (`tubelet_codes`), and
its head gives t * codebook_size logits, read as [t, codebook_size]. The loss is the softmax
cross-entropy averaged over every masked token and each of its t frames, over the whole batch
(BEiT's masked mean, with the frames as t more targets per token).

    model = violet.VIOLET(encoder={"variant": "Ti/8", "patch_size": (4, 8, 8)}, codebook_size=512)
    loss, logits, mask = model.apply({"params": params}, clips, codes, mask)
    # clips [B, T, H, W, C]; codes int32 [B, L, t]; mask [B, L] (1 = masked); logits [B, L, t, K]
"""
from typing import Any, Dict, Optional

import flax.linen as nn
import jax.numpy as jnp

from vitoken.errors import InputError
from vitoken.models import beit, mae, simmim, videomae


def tubelet_codes(frame_codes, tubelet: int):
  """Per-frame codes [B, T, h*w] -> [B, T/t * h*w, t]: each token's codes in its t frames,
  tokens time-major (slice, then row-major patches), as the video ViT orders them."""
  b, frames, positions = frame_codes.shape
  if frames % tubelet:
    raise InputError(f"{frames} frames of codes do not split into tubelets of {tubelet}")
  x = frame_codes.reshape(b, frames // tubelet, tubelet, positions)
  return x.transpose(0, 1, 3, 2).reshape(b, frames // tubelet * positions, tubelet)


def frame_codes(codes, positions: int):
  """The inverse of `tubelet_codes`: [B, L, t] -> [B, T, h*w] with `positions` = h*w."""
  b, length, tubelet = codes.shape
  slices = length // positions
  return codes.reshape(b, slices, positions, tubelet).transpose(0, 1, 3, 2).reshape(
      b, slices * tubelet, positions)


def _flat(logits, codes, mask):
  """[B, L*t, K] logits, [B, L*t] codes and mask: each frame of a token one target."""
  b, length, t = codes.shape
  if logits.shape[:3] != codes.shape or mask.shape != (b, length):
    raise InputError(f"VIOLET needs logits [B, L, t, K], codes [B, L, t] and a mask [B, L]; got "
                     f"{tuple(logits.shape)}, {tuple(codes.shape)} and {tuple(mask.shape)}")
  return (logits.reshape(b, length * t, -1), codes.reshape(b, length * t),
          jnp.repeat(mask, t, axis=1))


def per_example_loss(logits, codes, mask):
  """([B] summed cross-entropy over the masked tokens' frames, [B] their count: masked x t)."""
  return beit.per_example_loss(*_flat(logits, codes, mask))


def loss(logits, codes, mask):
  """Mean cross-entropy over every masked token and frame of the batch."""
  return beit.loss(*_flat(logits, codes, mask))


def code_accuracy(logits, codes, mask):
  """([B] correctly predicted codes of masked tokens' frames, [B] their count)."""
  return beit.code_accuracy(*_flat(logits, codes, mask))


class VIOLET(nn.Module):
  """`apply(variables, clips, codes, mask, train=False)` -> (loss, logits [B, L, t, K], mask)."""
  encoder: Any = None  # video ViT fields with a (t, p, p) patch
  codebook_size: int = 512

  def encoder_config(self) -> Dict[str, Any]:
    # VideoMAE's encoder defaults, so `configs/video.py:stage=finetune` loads either.
    return videomae.encoder_fields(self.encoder, "VIOLET")

  def encoder_model(self, name: Optional[str] = None):
    return mae.pretraining_encoder(self.encoder_config(),
                                   {"method": "mask_token", "name": simmim.MASK_ENTRY}, name)

  @nn.compact
  def __call__(self, clips, codes, mask, *, train: bool = False):
    encoder = self.encoder_model(name="encoder")
    tubelet = tuple(encoder.patch_size)[0]
    if codes.ndim != 3 or codes.shape[:2] != mask.shape or codes.shape[2] != tubelet:
      raise InputError(f"VIOLET needs the {tubelet} frame codes of every token: codes "
                       f"{tuple(codes.shape)} vs mask {tuple(mask.shape)}")
    tokens = simmim.masked_patch_tokens(encoder, clips, mask, train, "VIOLET")
    logits = nn.Dense(tubelet * self.codebook_size, dtype=encoder.dtype,
                      param_dtype=encoder.param_dtype,
                      kernel_init=nn.initializers.truncated_normal(0.02),
                      name="lm_head")(tokens).astype(jnp.float32)
    logits = logits.reshape(logits.shape[:2] + (tubelet, self.codebook_size))
    return loss(logits, codes, mask), logits, mask.astype(jnp.float32)
