"""BEiT-style masked visual-token prediction (Bao et al., ICLR 2022; microsoft/unilm `beit`).

A frozen visual tokenizer gives every patch a discrete code; block-wise masks
(`block_masking`) choose about 40% of the patches; a learned mask token replaces their patch
embeddings (the `mask_token` reducer, before the position embedding, as SimMIM); the encoder
sees every token; a linear head over each normalised patch token predicts its code; the loss
is the softmax cross-entropy averaged over the masked patches of the whole batch (the
reference's `CrossEntropyLoss` over `x[bool_masked_pos]`), computed as a static-shape masked
mean.

    model = beit.BEiT(encoder={"variant": "B/16"}, codebook_size=8192)
    loss, logits, mask = model.apply({"params": params}, images_nhwc, codes, mask)
"""
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import optax

from vitoken.errors import InputError
from vitoken.models import mae, simmim


def per_example_loss(logits, codes, mask):
  """([B] summed cross-entropy over masked patches, [B] masked patch counts)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), codes)
  mask = mask.astype(jnp.float32)
  return (ce * mask).sum(axis=1), mask.sum(axis=1)


def loss(logits, codes, mask):
  """Mean cross-entropy over every masked patch of the batch; logits [B, L, K], codes [B, L]."""
  total, count = per_example_loss(logits, codes, mask)
  return total.sum() / jnp.maximum(count.sum(), 1.0)


def code_accuracy(logits, codes, mask):
  """([B] correctly predicted masked codes, [B] masked counts)."""
  mask = mask.astype(jnp.float32)
  return ((jnp.argmax(logits, axis=-1) == codes) * mask).sum(axis=1), mask.sum(axis=1)


class BEiT(nn.Module):
  """`apply(variables, images, codes, mask, train=False)` -> (loss, logits [B, L, K], mask)."""
  encoder: Any = None  # ViT fields, e.g. {"variant": "B/16"}
  codebook_size: int = 8192

  def encoder_config(self):
    return mae.encoder_fields(self.encoder, "BEiT")

  def encoder_model(self, name: Optional[str] = None):
    return mae.pretraining_encoder(self.encoder_config(),
                                   {"method": "mask_token", "name": simmim.MASK_ENTRY}, name)

  @nn.compact
  def __call__(self, images, codes, mask, *, train: bool = False):
    encoder = self.encoder_model(name="encoder")
    tokens = simmim.masked_patch_tokens(encoder, images, mask, train, "BEiT")
    if codes.shape != mask.shape:
      raise InputError(f"BEiT needs one code per patch: codes {tuple(codes.shape)} vs mask "
                       f"{tuple(mask.shape)}")
    logits = nn.Dense(self.codebook_size, dtype=encoder.dtype, param_dtype=encoder.param_dtype,
                      kernel_init=nn.initializers.truncated_normal(0.02),
                      name="lm_head")(tokens).astype(jnp.float32)
    return loss(logits, codes, mask), logits, mask.astype(jnp.float32)
