"""Multi-head self-attention with an additive logit bias and key masks.

The fused path goes through `jax.nn.dot_product_attention` (cuDNN flash attention where the
shapes allow). Token reducers can ask for the keys averaged over heads (ToMe) or the class
token's attention (EViT); the latter is one extra query row, so the fused path is kept.
"""
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

IMPLEMENTATIONS = (None, "auto", "xla", "cudnn")


def check_implementation(implementation: Optional[str]) -> Optional[str]:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  return None if implementation == "auto" else implementation


def _masked_logits(logits, bias, key_mask):
  if bias is not None:
    logits = logits + bias.astype(logits.dtype)
  if key_mask is not None:
    logits = jnp.where(key_mask, logits, jnp.finfo(logits.dtype).min)
  return logits


POLICY_EPS = 1e-6  # DynamicViT's softmax_with_policy eps


def attention_logits(q, k):
  """q [B, Nq, H, D], k [B, Nk, H, D] -> q k^T / sqrt(D) as [B, H, Nq, Nk], in float32."""
  scale = q.shape[-1] ** -0.5
  return jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale


def attention_probs(q, k, *, bias=None, key_mask=None, policy=None, query_offset: int = 0):
  """Explicit softmax(q k^T / sqrt(d) + bias) in float32: [B, H, Nq, Nk].

  With a keep `policy` [B, Nk] (float weights in [0, 1]) this is DynamicViT's
  softmax_with_policy: exp(logit - max) times the key's weight, where every query keeps full
  weight on itself (query i is key i + query_offset), then (a + eps/Nk) / (sum a + eps).
  """
  logits = _masked_logits(attention_logits(q, k), bias, key_mask)
  if policy is None:
    return jax.nn.softmax(logits, axis=-1)
  nq, nk = logits.shape[-2:]
  eye = (jnp.arange(nq)[:, None] + query_offset == jnp.arange(nk)[None, :]).astype(jnp.float32)
  weights = policy.astype(jnp.float32)[:, None, None, :]
  weights = weights + (1.0 - weights) * eye
  a = jnp.exp(logits - logits.max(axis=-1, keepdims=True)) * weights
  return (a + POLICY_EPS / nk) / (a.sum(axis=-1, keepdims=True) + POLICY_EPS)


def fused_attention(q, k, v, *, bias=None, key_mask=None, implementation=None):
  """q [B, Nq, H, D], k/v [B, Nk, H, D]; bias broadcastable to [B, H, Nq, Nk]; key_mask [B, Nk]."""
  mask = None if key_mask is None else key_mask[:, None, None, :]
  if bias is not None:
    bias = bias.astype(q.dtype)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask,
                                      implementation=check_implementation(implementation))


class SelfAttention(nn.Module):
  """Pre-projected fused QKV (one matmul), attention, output projection."""
  num_heads: int
  qkv_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x, *, bias=None, key_mask=None, policy=None, need_keys_mean=False,
               need_cls_attn=False, return_probs=False):
    """Returns (out [B, N, C], info) where info holds what was asked for.

    A keep `policy` [B, N] needs the explicit attention (DynamicViT's formula); otherwise the
    fused path runs unless the probabilities are asked for.
    """
    _, _, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    init = dict(kernel_init=nn.initializers.xavier_uniform(), dtype=self.dtype,
                param_dtype=self.param_dtype)
    qkv = nn.DenseGeneral((3, self.num_heads, head_dim), use_bias=self.qkv_bias, name="qkv",
                          **init)(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, H, D]
    if bias is not None:
      if bias.ndim > 4:
        raise ValueError(f"attention bias must broadcast to [B, H, N, N], got shape {bias.shape}")
      bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    mask4 = None if key_mask is None else key_mask[:, None, None, :]

    info: Dict[str, jax.Array] = {}
    if return_probs or policy is not None:
      probs = attention_probs(q, k, bias=bias, key_mask=mask4, policy=policy)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
      if return_probs:
        info["probs"] = probs
    else:
      out = fused_attention(q, k, v, bias=bias, key_mask=key_mask, implementation=self.implementation)
    if need_keys_mean:
      info["keys_mean"] = k.mean(axis=2)
    if need_cls_attn:
      row_bias = None if bias is None else bias[..., :1, :]
      cls_probs = attention_probs(q[:, :1], k, bias=row_bias, key_mask=mask4,
                                  policy=policy)  # [B, H, 1, N]
      info["cls_attn"] = cls_probs[:, :, 0].mean(axis=1)
    out = nn.DenseGeneral(width, axis=(-2, -1), name="out", **init)(out)
    return out, info
