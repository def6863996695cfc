"""Learned compressors of a vision encoder's patch tokens into the few visual tokens a language
model reads: Qwen-VL's perceiver resampler (with MQT-LLaVA's Matryoshka query training and its
position-keyed variant) and QueCC (query-dependent convolutional compression).

    Resampler(num_queries=M, width=D, num_heads, keys)   x [B, N, C], grid (h, w) -> [B, m, D]
    QueCC(num_tokens=K, width=D, num_heads=8)             features [B, N, C], levels [B, N, L*C],
                                                          text [B, T], grid (h, w) -> [B, K, D]
    matryoshka_tokens(rng, M)                             a random even m in {2, 4, ..., M}
    query_mask(m, M)                                      [M] bool, True for the first m queries

Resampler, keys="content" (default): Qwen-VL's `Resampler` (Qwen/Qwen-VL `visual.py`; vLLM's
`Resampler2` with `adaptive=False`) followed by the `ln_post` and `proj` that Qwen-VL's
VisionTransformer applies to its output:

    kv = LN_kv(x @ W_kv)             W_kv [C, D] without bias, only when C != D (else identity)
    q  = LN_q(query[:m]) + pos_q[:m]                     query [M, D] learned
    out = MHA(q, kv + pos_k, kv)     one torch nn.MultiheadAttention, num_heads heads
    y  = LN_post(out) @ proj                             proj [D, D]

Resampler, keys="position": MQT-LLaVA's `Resampler` (gordonhu608/MQT-LLaVA,
`llava/model/multimodal_projector/builder.py`), whose keys carry no image content, so the
attention weights are the same for every image:

    q  = LN_q(query[:m] + pos_q[:m])                     query [M, C] learned
    out = MHA(q, LN_k(pos_k), LN_v(x))                   the attention runs at the input width C
    y  = out @ proj                                      proj [C, D]; no kv projection, no LN_post

Both: pos_q is MAE's 2-D sin-cos table over the sqrt(M) x sqrt(M) query grid (M must be a
square), pos_k the same table resized to the input grid by torch's bicubic interpolation
(`F.interpolate(mode="bicubic", align_corners=False)`, the references' `get_abs_pos`; it is
not recomputed for the input grid). The first m queries use the first m rows of pos_q, as
MQT-LLaVA slices them, and the key table does not depend on m; queries never attend to each
other, so the output for m queries is exactly the first m rows of the output for M.

Matryoshka training (MQT-LLaVA's `get_matry_n`, "second_stage": `random.choice(range(2, M + 2,
2))`): draw m with `matryoshka_tokens` every step. The number of queries is a shape: with
`num_tokens` a Python int the module runs m queries (one compile per m); with `num_tokens` a
jax array (traced inside a jitted step) it runs all M queries and zeroes the outputs from row m
on, which equals the static-m result on the first m rows; `query_mask(m, M)` is the mask to
give the language model for those rows.

QueCC (locuslab/llava-token-compression, `llava/model/multimodal_projector/quecc.py`, fed by
`multimodal_encoder/clip_encoder.py`): with s = sqrt(N / K), the kernel and stride of the
query downsampling,

    x = features + LN(Linear(text))                      text: the LM's last-layer state at the
                                                         question's last token, [B, T]
    q = depthwise_conv_{s x s, stride s}(LN(Linear(GELU(Linear(x)))))        -> K queries
    k, v = LN(Linear(GELU(Linear(levels)))), one MLP each                    [B, N, D]
    out = MHA(q, k, v), each query attending only to the s x s patches of its own cell

`features` is the reference's select layer (CLIP hidden_states[-2], CLS dropped), `levels` the
concatenation of hidden_states 12, 16, 22 and 23 along channels. The reference's attention and
output width is the vision width C; here it is `width` (the first Linear of the query MLP maps
C -> width), which is the reference when width == C. The LLaVA projector that follows QueCC is
not part of it.

Attention follows torch's nn.MultiheadAttention (packed in-projection with bias, scaled dot
product, out-projection with bias; softmax in float32); every LayerNorm has eps 1e-6, as the
references. Parameter names follow the references' modules, so weights move across.
"""
import math
import operator
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitoken.errors import ConfigError, InputError

LN_EPS = 1e-6  # the references' LayerNorm eps (Qwen-VL, MQT-LLaVA and QueCC alike)
KEYS = ("content", "position")
CUBIC_A = -0.75  # torch's bicubic convolution coefficient (PIL and jax.image use -0.5)


# ---- position tables ----

def sincos_2d(width: int, side: int) -> np.ndarray:
  """MAE's `get_2d_sincos_pos_embed(width, side)`: [side*side, width] float32, laid out as
  (sin col, cos col, sin row, cos row), frequencies 10000^(-i / (width/4)); computed in float32
  numpy as the references do, so the table is bit-identical to theirs."""
  if width % 4:
    raise ConfigError(f"the resampler's 2-D sin-cos position table needs a width divisible by 4, "
                      f"got {width}")
  quarter = width // 4
  omega = np.arange(quarter, dtype=np.float32) / np.float32(quarter)
  omega = np.float32(1.0) / np.float32(10000.0) ** omega
  rows, cols = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32),
                           indexing="ij")
  col = np.einsum("m,d->md", cols.reshape(-1), omega)
  row = np.einsum("m,d->md", rows.reshape(-1), omega)
  return np.concatenate([np.sin(col), np.cos(col), np.sin(row), np.cos(row)], axis=1)


def _cubic_weights(t: float):
  """torch's `get_cubic_upsample_coefficients`: weights of the taps at -1, 0, 1, 2 from t."""
  a = CUBIC_A
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return far(t + 1), near(t), near(1 - t), far(2 - t)


def bicubic_matrix(src: int, dst: int) -> np.ndarray:
  """[dst, src] matrix of torch's 1-D bicubic resampling (align_corners=False, no antialias):
  source index (o + 0.5) * src/dst - 0.5 and taps clamped to the border."""
  out = np.zeros((dst, src), np.float64)
  for o in range(dst):
    real = (o + 0.5) * (src / dst) - 0.5
    i0 = min(math.floor(real), src - 1)
    t = min(max(real - i0, 0.0), 1.0)
    for j, weight in zip(range(i0 - 1, i0 + 3), _cubic_weights(t)):
      out[o, min(max(j, 0), src - 1)] += weight
  return out


def resize_table(table: np.ndarray, side: int, grid: Tuple[int, int]) -> np.ndarray:
  """The references' `get_abs_pos`: a [side*side, W] table bicubically resized to the h x w
  grid, [h*w, W] float32 (returned as it is when the grid is the table's)."""
  h, w = grid
  if (h, w) == (side, side):
    return table
  grid_table = table.reshape(side, side, -1).astype(np.float64)
  resized = np.einsum("hi,ijd,wj->hwd", bicubic_matrix(side, h), grid_table,
                      bicubic_matrix(side, w))
  return resized.reshape(h * w, -1).astype(np.float32)


# ---- Matryoshka query counts ----

def matryoshka_tokens(rng, max_tokens: int) -> jax.Array:
  """A random number of queries for one training step: int32 scalar, uniform over the even
  numbers {2, 4, ..., max_tokens} (max_tokens - 1 at the top when max_tokens is odd)."""
  max_tokens = _positive_int(max_tokens, "max_tokens")
  if max_tokens < 2:
    raise ConfigError(f"matryoshka_tokens needs max_tokens >= 2 (the smallest even count), got "
                      f"{max_tokens}")
  return 2 * jax.random.randint(rng, (), 1, max_tokens // 2 + 1, dtype=jnp.int32)


def query_mask(num_tokens, max_tokens: int) -> jax.Array:
  """[max_tokens] bool, True for the first `num_tokens` queries (a Python int or a traced
  scalar): which rows of a masked resampler output are visual tokens."""
  return jnp.arange(_positive_int(max_tokens, "max_tokens")) < num_tokens


def _positive_int(value, name: str) -> int:
  try:
    value = operator.index(value)
  except TypeError:
    raise ConfigError(f"{name} must be a positive integer, got {value!r}") from None
  if isinstance(value, bool) or value < 1:
    raise ConfigError(f"{name} must be a positive integer, got {value!r}")
  return value


# ---- shared layers ----

def _layer_norm(module: nn.Module, name: str) -> nn.LayerNorm:
  # Two-pass variance, as torch's LayerNorm, so float32 results match it closely.
  return nn.LayerNorm(LN_EPS, dtype=module.dtype, param_dtype=module.param_dtype,
                      use_fast_variance=False, name=name)


def _torch_uniform_bias(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


# torch's default Linear/Conv init (kaiming_uniform with a=sqrt(5)): U(+-1/sqrt(fan_in)).
_TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_dense(module: nn.Module, features: int, fan_in: int, name: str) -> nn.Dense:
  return nn.Dense(features, kernel_init=_TORCH_KERNEL_INIT,
                  bias_init=_torch_uniform_bias(fan_in), dtype=module.dtype,
                  param_dtype=module.param_dtype, name=name)


def _check_heads(width: int, num_heads: int, what: str):
  if not isinstance(num_heads, int) or num_heads < 1 or width % num_heads:
    raise ConfigError(f"{what}: num_heads={num_heads!r} must be a positive integer that divides "
                      f"the attention width {width}")


class TorchMultiheadAttention(nn.Module):
  """torch.nn.MultiheadAttention's forward (no mask, no dropout) on [..., Nq, E] queries and
  [..., Nk, E] keys and values whose leading dims broadcast: packed in-projection
  `in_proj_kernel` [E, 3E] (torch's in_proj_weight transposed) and `in_proj_bias` [3E],
  softmax(q k^T / sqrt(E/H)) in float32, then `out_proj`. Returns (out [..., Nq, E], weights
  [..., H, Nq, Nk])."""
  num_heads: int
  out_kernel_init: Any = _TORCH_KERNEL_INIT
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q, k, v):
    e = q.shape[-1]
    heads = self.num_heads
    hd = e // heads
    # xavier_uniform over the packed [E, 3E] matrix and zero biases, as torch's _reset_parameters
    kernel = self.param("in_proj_kernel", nn.initializers.xavier_uniform(), (e, 3 * e),
                        self.param_dtype)
    bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * e,), self.param_dtype)
    q, k, v, kernel, bias = nn.dtypes.promote_dtype(q, k, v, kernel, bias, dtype=self.dtype)
    split = lambda t, i: (t @ kernel[:, i * e:(i + 1) * e] + bias[i * e:(i + 1) * e])
    split_heads = lambda t: t.reshape(t.shape[:-1] + (heads, hd))
    # Project before broadcasting: a batch-free query (or key) set is projected once.
    q, k, v = (split_heads(split(t, i)) for i, t in enumerate((q, k, v)))
    lead = jnp.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    q, k, v = (jnp.broadcast_to(t, lead + t.shape[-3:]) for t in (q, k, v))
    logits = jnp.einsum("...qhd,...khd->...hqk", q.astype(jnp.float32),
                        k.astype(jnp.float32)) * hd ** -0.5
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("...hqk,...khd->...qhd", weights.astype(v.dtype), v)
    out = out.reshape(out.shape[:-2] + (e,))
    out = nn.Dense(e, kernel_init=self.out_kernel_init, bias_init=nn.initializers.zeros,
                   dtype=self.dtype, param_dtype=self.param_dtype, name="out_proj")(out)
    return out, weights


def _grid(grid, n: int, what: str) -> Tuple[int, int]:
  try:
    h, w = (operator.index(g) for g in grid)
  except (TypeError, ValueError):
    raise InputError(f"{what}: grid must be a pair of ints (h, w), got {grid!r}") from None
  if h < 1 or w < 1 or h * w != n:
    raise InputError(f"{what}: grid {h}x{w} does not hold the {n} input tokens (h*w must be N)")
  return h, w


# ---- Resampler ----

def _static_or_traced(num_tokens, max_tokens: int):
  """(m, traced): the query count to run and whether the caller's count is a jax value."""
  if num_tokens is None:
    return max_tokens, False
  if isinstance(num_tokens, jax.Array):
    if num_tokens.ndim != 0 or not jnp.issubdtype(num_tokens.dtype, jnp.integer):
      raise InputError(f"resampler num_tokens as an array must be an integer scalar, got dtype "
                       f"{num_tokens.dtype} and shape {tuple(num_tokens.shape)}")
    return max_tokens, True
  try:
    m = operator.index(num_tokens)
  except TypeError:
    raise ConfigError(f"resampler num_tokens must be an int (or a jax integer scalar for the "
                      f"masked path), got {num_tokens!r}") from None
  if isinstance(num_tokens, bool) or not 1 <= m <= max_tokens:
    raise ConfigError(f"resampler num_tokens={num_tokens!r} must be in [1, num_queries="
                      f"{max_tokens}]")
  return m, False


class Resampler(nn.Module):
  """A perceiver resampler: M learned queries cross-attend once to the patch tokens.

  keys="content" is Qwen-VL's, keys="position" MQT-LLaVA's (see the module docstring).
  """
  num_queries: int
  width: int
  num_heads: int
  keys: str = "content"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def _side(self) -> int:
    m = _positive_int(self.num_queries, "resampler num_queries")
    side = math.isqrt(m)
    if side * side != m:
      raise ConfigError(f"resampler num_queries={m} must be a square (the queries' position "
                        f"table is a sqrt(M) x sqrt(M) grid, as Qwen-VL's 16 x 16 = 256)")
    return side

  @nn.compact
  def __call__(self, x, grid: Sequence[int], num_tokens=None, *, return_weights: bool = False):
    """x [B, N, C] patch tokens on the h x w grid (h*w == N) -> [B, m, width].

    num_tokens: None (all M queries), an int m in [1, M] (the first m queries: [B, m, width]),
    or a jax integer scalar m, traced or not (all M queries run and rows m.. are zero:
    [B, M, width]). With `return_weights` also the attention [B, heads, m or M, N].
    """
    side = self._side()
    if self.keys not in KEYS:
      raise ConfigError(f"resampler keys must be one of {KEYS}, got {self.keys!r}")
    _positive_int(self.width, "resampler width")
    if x.ndim != 3:
      raise InputError(f"resampler takes x [batch, tokens, channels], got {tuple(x.shape)}")
    h, w = _grid(grid, x.shape[1], "resampler")
    m, traced = _static_or_traced(num_tokens, self.num_queries)
    # Qwen-VL attends at the output width; MQT-LLaVA at the input width, projecting after.
    embed = self.width if self.keys == "content" else x.shape[-1]
    _check_heads(embed, self.num_heads, f"resampler keys={self.keys!r}")
    table = sincos_2d(embed, side)
    pos_q = jnp.asarray(table[:m])
    pos_k = jnp.asarray(resize_table(table, side, (h, w)))
    # The references' trunc_normal_(std=.02) cuts at +-2 absolute, i.e. a plain normal.
    query = self.param("query", nn.initializers.normal(0.02), (self.num_queries, embed),
                       self.param_dtype)[:m]
    attn = TorchMultiheadAttention(self.num_heads, nn.initializers.normal(0.02), self.dtype,
                                   self.param_dtype, name="attn")
    if self.keys == "content":
      kv = x
      if x.shape[-1] != self.width:
        kv = nn.Dense(self.width, use_bias=False, kernel_init=nn.initializers.normal(0.02),
                      dtype=self.dtype, param_dtype=self.param_dtype, name="kv_proj")(x)
      kv = _layer_norm(self, "ln_kv")(kv)
      q = _layer_norm(self, "ln_q")(query)
      out, weights = attn(q + pos_q.astype(q.dtype), kv + pos_k.astype(kv.dtype), kv)
      out = _layer_norm(self, "ln_post")(out)
    else:
      q = _layer_norm(self, "ln_q")(query + pos_q.astype(query.dtype))
      k = _layer_norm(self, "ln_k")(pos_k.astype(self.dtype or self.param_dtype))
      out, weights = attn(q, k, _layer_norm(self, "ln_v")(x))
    proj = self.param("proj", nn.initializers.normal(self.width ** -0.5), (embed, self.width),
                      self.param_dtype)
    out, proj = nn.dtypes.promote_dtype(out, proj, dtype=self.dtype)
    out = out @ proj
    if traced:
      keep = query_mask(num_tokens, self.num_queries)
      out = jnp.where(keep[None, :, None], out, 0)
      weights = jnp.where(keep[None, None, :, None], weights, 0)
    return (out, weights) if return_weights else out


# ---- QueCC ----

class Projector(nn.Module):
  """Linear -> GELU (erf) -> Linear, torch's Linear init: LLaVA-1.5's `mlp2x_gelu` projector,
  and with `norm` a LayerNorm after it, QueCC's q/k/v projections."""
  width: int
  dtype: Any = None
  param_dtype: Any = jnp.float32
  norm: bool = False

  @nn.compact
  def __call__(self, x):
    x = _torch_dense(self, self.width, x.shape[-1], "fc1")(x)
    x = _torch_dense(self, self.width, self.width, "fc2")(nn.gelu(x, approximate=False))
    return _layer_norm(self, "norm")(x) if self.norm else x


def quecc_cell(num_tokens: int, grid: Tuple[int, int]) -> int:
  """s = sqrt(N / K), QueCC's kernel and stride; ConfigError unless s is an integer dividing
  both sides of the h x w grid."""
  h, w = grid
  n = h * w
  k = _positive_int(num_tokens, "quecc num_tokens")
  s = math.isqrt(n // k) if n % k == 0 else 0
  if s < 1 or s * s * k != n or h % s or w % s:
    raise ConfigError(f"quecc num_tokens={num_tokens!r} does not tile the {h}x{w} patch grid "
                      f"(N={n}): N/num_tokens must be a square s*s with s dividing {h} and {w} "
                      f"(each token pools an s x s cell; e.g. N=576 takes 144, 64, 36, 16 or 9)")
  return s


class QueCC(nn.Module):
  """QueCC: text-conditioned queries, one per s x s cell, each attending to its own cell of
  multi-level features (see the module docstring)."""
  num_tokens: int
  width: int
  num_heads: int = 8
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, levels, text, grid: Sequence[int], *,
               return_weights: bool = False):
    """features [B, N, C] (the select layer's patches), levels [B, N, L*C] (the levels
    concatenated along channels), text [B, T] (the LM's last-layer state at the question's last
    token), grid (h, w) with h*w == N -> [B, num_tokens, width]; with `return_weights` also the
    attention [B, num_tokens, heads, 1, s*s] over each query's cell."""
    if text is None:
      raise InputError("quecc needs the question's LM state: pass text [batch, lm_width], the "
                       "language model's last-layer hidden state at the question's last token")
    if features.ndim != 3 or levels.ndim != 3 or text.ndim != 2:
      raise InputError(f"quecc takes features [B, N, C], levels [B, N, L*C] and text [B, T], got "
                       f"{tuple(features.shape)}, {tuple(levels.shape)} and {tuple(text.shape)}")
    b, n, c = features.shape
    if levels.shape[:2] != (b, n) or text.shape[0] != b:
      raise InputError(f"quecc: features {tuple(features.shape)}, levels {tuple(levels.shape)} "
                       f"and text {tuple(text.shape)} must share the batch (and N for levels)")
    _positive_int(self.width, "quecc width")
    h, w = _grid(grid, n, "quecc")
    s = quecc_cell(self.num_tokens, (h, w))
    _check_heads(self.width, self.num_heads, "quecc")
    d = self.width

    text = _torch_dense(self, c, text.shape[-1], "text_projection")(text)
    x = features + _layer_norm(self, "text_norm")(text)[:, None, :]
    q = Projector(d, self.dtype, self.param_dtype, norm=True, name="q_proj")(x).reshape(b, h, w, d)
    q = nn.Conv(d, (s, s), strides=(s, s), padding="VALID", feature_group_count=d,
                kernel_init=_TORCH_KERNEL_INIT, bias_init=_torch_uniform_bias(s * s),
                dtype=self.dtype, param_dtype=self.param_dtype, name="q_downsample")(q)
    q = q.reshape(b, self.num_tokens, 1, d)  # cells in row-major order, as the reference

    def cells(t):  # [B, N, D] -> [B, K, s*s, D]: the tokens of each cell, row-major inside
      t = t.reshape(b, h // s, s, w // s, s, d).transpose(0, 1, 3, 2, 4, 5)
      return t.reshape(b, self.num_tokens, s * s, d)

    k = Projector(d, self.dtype, self.param_dtype, norm=True, name="k_proj")(levels)
    v = Projector(d, self.dtype, self.param_dtype, norm=True, name="v_proj")(levels)
    out, weights = TorchMultiheadAttention(self.num_heads, dtype=self.dtype,
                                           param_dtype=self.param_dtype, name="clip_attn")(
                                               q, cells(k), cells(v))
    out = out[:, :, 0]
    return (out, weights) if return_weights else out


__all__ = ["Resampler", "QueCC", "TorchMultiheadAttention", "matryoshka_tokens", "query_mask",
           "quecc_cell", "sincos_2d", "bicubic_matrix", "resize_table", "KEYS"]
