"""Multi-head self-attention with an additive logit bias and key masks.

The fused path goes through `jax.nn.dot_product_attention` (cuDNN flash attention where the
shapes allow). Token reducers can ask for the keys averaged over heads (ToMe) or the class
token's attention (EViT); the latter is one extra query row, so the fused path is kept.
"""
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitoken.errors import ConfigError

IMPLEMENTATIONS = (None, "auto", "xla", "cudnn")


def check_implementation(implementation: Optional[str]) -> Optional[str]:
  if implementation not in IMPLEMENTATIONS:
    raise ConfigError(f"attention implementation must be one of {IMPLEMENTATIONS} "
                      f"(attention_impl), got {implementation!r}")
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


# cuDNN's fused attention refuses some sequence lengths (197, ViT-B/16's, in the backward
# pass); padding queries and keys to a multiple of this, with the padded keys masked out and
# the padded rows dropped, leaves the result unchanged.
CUDNN_SEQ_MULTIPLE = 64
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def choose_implementation(implementation: Optional[str], q) -> str:
  """"xla" or "cudnn": an explicit choice stands; None/"auto" takes cuDNN on a GPU for
  half-precision inputs with head dims it supports (multiples of 8 up to 128), else XLA."""
  implementation = check_implementation(implementation)
  if implementation is not None:
    return implementation
  head_dim = q.shape[-1]
  if (jax.default_backend() == "gpu" and q.dtype in CUDNN_DTYPES and head_dim % 8 == 0
      and head_dim <= 128):
    return "cudnn"
  return "xla"


def _pad_axis(x, axis: int, pad: int, value=0, broadcast: bool = False):
  if not pad or (broadcast and x.shape[axis] == 1):  # a bias's broadcast dimension stays
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def fused_attention(q, k, v, *, bias=None, key_mask=None, implementation=None,
                    pad_to: Optional[int] = None):
  """q [B, N, H, D], k/v [B, N, H, D]; bias broadcastable to [B, H, N, N]; key_mask [B, N].

  The sequence is padded to a multiple of `pad_to` (default: CUDNN_SEQ_MULTIPLE under cuDNN,
  none under XLA); padded keys are masked out and padded query rows are dropped."""
  impl = choose_implementation(implementation, q)
  nq, nk = q.shape[1], k.shape[1]
  pad_to = (CUDNN_SEQ_MULTIPLE if impl == "cudnn" else 0) if pad_to is None else pad_to
  pad_q, pad_k = ((-nq) % pad_to, (-nk) % pad_to) if pad_to else (0, 0)
  q_lengths = kv_lengths = None
  if pad_q or pad_k:
    q = _pad_axis(q, 1, pad_q)
    k, v = _pad_axis(k, 1, pad_k), _pad_axis(v, 1, pad_k)
    if bias is not None:
      bias = _pad_axis(_pad_axis(bias, -1, pad_k, broadcast=True), -2, pad_q, broadcast=True)
    if key_mask is not None:
      key_mask = _pad_axis(key_mask, 1, pad_k, False)
    else:
      kv_lengths = jnp.full((q.shape[0],), nk, jnp.int32)
      q_lengths = jnp.full((q.shape[0],), nq, jnp.int32)
  mask = None if key_mask is None else key_mask[:, None, None, :]
  if bias is not None:
    bias = bias.astype(q.dtype)
  out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, query_seq_lengths=q_lengths,
                                     key_value_seq_lengths=kv_lengths, implementation=impl)
  return out[:, :nq]


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
      raise ConfigError(f"width {width} is not divisible by num_heads {self.num_heads}")
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
