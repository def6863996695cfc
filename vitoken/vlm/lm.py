"""A tiny causal language model over [visual tokens, question], LLaVA-style: the visual tokens
(already at the LM's width, from the tokenizer's projector) come first, then the embedded
question words; the answer is the next token after the question's last word."""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitoken.errors import InputError
from vitoken.models import attention as attention_lib, layers

LN_EPS = 1e-5


class CausalBlock(nn.Module):
  """Pre-norm block with causal self-attention (and keys masked out where `key_mask` is False)."""
  num_heads: int
  mlp_dim: int
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, bias):
    norm = lambda name: nn.LayerNorm(LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=name)
    y, _ = attention_lib.SelfAttention(self.num_heads, dtype=self.dtype,
                                       param_dtype=self.param_dtype, name="attn")(
                                           norm("norm1")(x), bias=bias)
    x = x + y
    return x + layers.MlpBlock(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                               name="mlp")(norm("norm2")(x), deterministic=True)


class TinyLM(nn.Module):
  """`__call__(visual [B, K, D] or None, question [B, L] word ids (0 pads, at the end),
  visual_mask [B, K] or None) -> (logits [B, V] of the next word after the question's last
  word, state [B, D] the last layer's output there)`."""
  vocab_size: int
  width: int = 128
  depth: int = 2
  num_heads: int = 4
  mlp_dim: Optional[int] = None
  max_length: int = 256
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, visual, question, visual_mask=None):
    if question.ndim != 2:
      raise InputError(f"question must be [batch, words], got shape {tuple(question.shape)}")
    b, length = question.shape
    words = nn.Embed(self.vocab_size, self.width, param_dtype=self.param_dtype,
                     name="embed")(question)
    pieces, keep = [words], [question != 0]
    if visual is not None:
      if visual.shape[-1] != self.width:
        raise InputError(f"visual tokens have width {visual.shape[-1]}, the language model "
                         f"{self.width}: set the tokenizer's projector to {self.width}")
      pieces.insert(0, visual.astype(words.dtype))
      keep.insert(0, jnp.ones(visual.shape[:2], bool) if visual_mask is None
                  else visual_mask.astype(bool))
    x, keep = jnp.concatenate(pieces, axis=1), jnp.concatenate(keep, axis=1)
    n = x.shape[1]
    if n > self.max_length:
      raise InputError(f"{n} tokens exceed the language model's max_length {self.max_length}")
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, self.max_length,
                                                                     self.width),
                     self.param_dtype)
    x = (x + pos[:, :n].astype(x.dtype)).astype(self.dtype or jnp.float32)
    causal = jnp.tril(jnp.ones((n, n), bool))
    allowed = causal[None] & keep[:, None, :]
    # A query always sees itself, so a row of masked keys (padding) stays finite.
    allowed = allowed | jnp.eye(n, dtype=bool)[None]
    bias = jnp.where(allowed, 0.0, -1e9)[:, None].astype(jnp.float32)
    for i in range(self.depth):
      x = CausalBlock(self.num_heads, self.mlp_dim or 4 * self.width, self.dtype,
                      self.param_dtype, name=f"block_{i:02d}")(x, bias)
    x = nn.LayerNorm(LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
    last = n - length + jnp.maximum((question != 0).sum(axis=1) - 1, 0)
    state = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    logits = nn.Dense(self.vocab_size, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="head")(state)
    del b
    return logits.astype(jnp.float32), state


def flops_per_example(width: int, depth: int, mlp_dim: Optional[int], tokens: int,
                      vocab: int) -> float:
  """XLA-style FLOPs (2 per multiply-add) of one forward pass over `tokens` tokens: the
  projections, the attention's two matmuls (full, as computed) and the head at one position."""
  mlp = mlp_dim or 4 * width
  per_token = 2 * (4 * width * width + 2 * width * mlp)
  attention = 2 * 2 * tokens * tokens * width
  return depth * (tokens * per_token + attention) + 2 * width * vocab


def answer_loss(logits, answer):
  """Cross-entropy of the answer word [B] (int ids) under the next-word logits [B, V]."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(logp, answer[:, None].astype(jnp.int32), axis=-1)[:, 0]
