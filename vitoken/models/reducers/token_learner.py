"""TokenLearner (Ryoo et al., "TokenLearner: What Can 8 Learned Tokens Do for Images and
Videos?", NeurIPS 2021) and TokenFuser, as scenic's `projects/token_learner/model.py`.

Building blocks, each usable on its own (deterministic unless a "dropout" rng is given):

    TokenLearnerV11(num_tokens=S)   [B, N, C] -> [B, S, C]   LayerNorm -> MLP (C -> 64 -> S, tanh
                                    GELU, dropout) -> softmax over the N positions -> weights @ x
    TokenLearnerV1(num_tokens=S)    [B, h*w, C] (h == w) or [B, h, w, C] -> [B, S, C]: LayerNorm ->
                                    3 x (3x3 conv to S maps, no bias, GELU) -> 3x3 conv -> sigmoid
                                    -> sum (or mean) pooling of x weighted by each map
    TokenFuser()                    [B, S, C], [B, N, C] -> [B, N, C]: the S tokens mixed across
                                    the token axis (zero-initialised kernel), re-weighted per
                                    position by sigmoid(MLP(LayerNorm(original))); the caller adds
                                    the residual

The pooling always uses the raw input tokens, not the normalised ones, and every LayerNorm uses
flax's eps 1e-6, as scenic. Parameter names follow scenic's modules, so weights move across.

The reducer `token_learner` places them in a ViT through the token-reduction interface:

    {"method": "token_learner", "num_tokens": 8, "loc": 9, "version": "v1.1", "mode": "learner"}

- mode "learner": before block `loc` the patch tokens become S learned tokens; that block and
  every later one see S tokens (plus the class/register tokens, which are never pooled);
- mode "fuser" (scenic's EncoderModFuser): at every block from `loc` on, the learner makes S
  tokens, the block runs on them, the TokenFuser maps them back to the N positions and the N
  tokens that entered the block are added. Class/register tokens run through the block with
  the S tokens and keep its output; the fuser acts on patch tokens only.

Learned tokens count as one token each where the ViT weighs tokens by size (gap pooling is a
plain mean over them, as scenic's "gap"): their `size` and `source` use the pooling weights
normalised per learned token.
"""
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitoken import settings as settings_lib
from vitoken.errors import ConfigError, InputError
from vitoken.models.reducers import base

LN_EPS = 1e-6  # flax's default, which scenic uses for every LayerNorm here
VERSIONS = ("v1", "v1.1")
MODES = ("learner", "fuser")


def _deterministic(module: nn.Module, deterministic: Optional[bool]) -> bool:
  return (not module.has_rng("dropout")) if deterministic is None else deterministic


class BottleneckMlp(nn.Module):
  """scenic's MlpBlock with an output width: Dense -> GELU (tanh) -> dropout -> Dense -> dropout."""
  hidden_dim: int
  out_dim: int
  dropout_rate: float = 0.0
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    dense = lambda n: nn.Dense(n, kernel_init=nn.initializers.xavier_uniform(),
                               bias_init=nn.initializers.normal(stddev=1e-6), dtype=self.dtype,
                               param_dtype=self.param_dtype)
    x = nn.gelu(dense(self.hidden_dim)(x), approximate=True)
    x = nn.Dropout(self.dropout_rate)(x, deterministic)
    x = dense(self.out_dim)(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic)


def _layer_norm(module, name=None):
  return nn.LayerNorm(LN_EPS, dtype=module.dtype, param_dtype=module.param_dtype, name=name)


class TokenLearnerV11(nn.Module):
  """TokenLearner v1.1: S softmax-normalised spatial maps from a bottleneck MLP."""
  num_tokens: int
  bottleneck_dim: int = 64
  dropout_rate: float = 0.0
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: Optional[bool] = None, return_weights: bool = False):
    """x [B, N, C] (or [B, h, w, C]) -> [B, S, C]; with `return_weights` also the [B, S, N] maps."""
    deterministic = _deterministic(self, deterministic)
    if x.ndim == 4:
      x = x.reshape(x.shape[0], -1, x.shape[-1])
    if x.ndim != 3:
      raise InputError("TokenLearnerV11 takes [batch, tokens, channels], got shape "
                       f"{tuple(x.shape)}")
    logits = BottleneckMlp(self.bottleneck_dim, self.num_tokens, self.dropout_rate, self.dtype,
                           self.param_dtype, name="token_masking")(
                               _layer_norm(self, "LayerNorm_0")(x), deterministic=deterministic)
    weights = jax.nn.softmax(jnp.swapaxes(logits, 1, 2).astype(jnp.float32), axis=-1)
    out = jnp.einsum("bsn,bnc->bsc", weights.astype(x.dtype), x)
    return (out, weights) if return_weights else out


class TokenLearnerV1(nn.Module):
  """TokenLearner v1 (the paper's module): convolutional sigmoid maps over the square grid."""
  num_tokens: int
  use_sum_pooling: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: Optional[bool] = None, return_weights: bool = False):
    """x [B, h*w, C] with h == w, or [B, h, w, C] -> [B, S, C] (and the [B, S, h*w] maps)."""
    del deterministic  # no dropout in v1
    if x.ndim == 3:
      b, hw, c = x.shape
      h = math.isqrt(hw)
      if h * h != hw:
        raise ConfigError(f"TokenLearner v1 needs a square patch grid, got {hw} tokens; use "
                          "version 'v1.1' for other grids")
      grid = x.reshape(b, h, h, c)
    elif x.ndim == 4:
      grid = x
    else:
      raise InputError(f"TokenLearnerV1 takes [batch, h*w, channels] or [batch, h, w, channels], "
                       f"got shape {tuple(x.shape)}")
    b, h, w, c = grid.shape
    maps = _layer_norm(self, "LayerNorm_0")(grid)
    conv = lambda i: nn.Conv(self.num_tokens, (3, 3), padding="SAME", use_bias=False,
                             dtype=self.dtype, param_dtype=self.param_dtype, name=f"Conv_{i}")
    for i in range(3):
      maps = nn.gelu(conv(i)(maps), approximate=True)
    maps = conv(3)(maps).reshape(b, h * w, self.num_tokens)
    weights = jax.nn.sigmoid(jnp.swapaxes(maps, 1, 2).astype(jnp.float32))  # [B, S, h*w]
    if not self.use_sum_pooling:
      weights = weights / (h * w)
    out = jnp.einsum("bsn,bnc->bsc", weights.astype(grid.dtype), grid.reshape(b, h * w, c))
    return (out, weights) if return_weights else out


class TokenFuser(nn.Module):
  """Maps S processed tokens back to the N positions of `original` ([B, S, C] -> [B, N, C])."""
  use_normalization: bool = True
  bottleneck_dim: int = 64
  dropout_rate: float = 0.0
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, original, deterministic: Optional[bool] = None):
    deterministic = _deterministic(self, deterministic)
    if tokens.ndim != 3:
      raise InputError(f"TokenFuser takes tokens [batch, S, channels], got {tuple(tokens.shape)}")
    grid_shape = original.shape if original.ndim == 4 else None
    if original.ndim == 4:
      original = original.reshape(original.shape[0], -1, original.shape[-1])
    s = tokens.shape[1]
    if self.use_normalization:
      tokens = _layer_norm(self, "fuser_mix_norm1")(tokens)
    # Mixing across the token axis; the zero kernel makes the fuser output zero at init, so a
    # fused block starts as the identity on the patch tokens.
    tokens = jnp.swapaxes(nn.Dense(s, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name="Dense_0")(
                                       jnp.swapaxes(tokens, 1, 2)), 1, 2)
    if self.use_normalization:
      tokens = _layer_norm(self, "fuser_mix_norm2")(tokens)
    mix = BottleneckMlp(self.bottleneck_dim, s, self.dropout_rate, self.dtype, self.param_dtype,
                        name="token_masking")(_layer_norm(self, "LayerNorm_0")(original),
                                              deterministic=deterministic)
    mix = jax.nn.sigmoid(mix.astype(jnp.float32)).astype(tokens.dtype)  # [B, N, S]
    out = jnp.einsum("bsc,bns->bnc", tokens, mix)
    out = nn.Dropout(self.dropout_rate)(out, deterministic)
    return out.reshape(grid_shape[:-1] + (-1,)) if grid_shape is not None else out


@base.register("token_learner")
class TokenLearner(base.Reducer):
  """TokenLearner / TokenFuser placed through the reducer interface (see the module docstring)."""
  stages = (base.PRE_BLOCK, base.POST_BLOCK)

  num_tokens: int = 8
  version: str = "v1.1"
  mode: str = "learner"
  bottleneck_dim: int = 64
  dropout_rate: float = 0.0
  use_sum_pooling: bool = True
  fuser_normalization: bool = True

  @classmethod
  def layer_settings(cls, depth: int, loc: Optional[int] = None, num_tokens: int = 8,
                     version: str = "v1.1", mode: str = "learner", bottleneck_dim: int = 64,
                     dropout_rate: float = 0.0, use_sum_pooling: bool = True,
                     fuser_normalization: bool = True):
    """`loc`: the block the learner runs before (learner mode) or the first fused block."""
    if loc is None:
      raise ConfigError("token_learner needs `loc`, the block before which the learner runs "
                        f"(0..{depth - 1}; scenic's ImageNet setting uses 2/3 of the depth, 9 of "
                        "12)")
    if not settings_lib.is_count(loc, 0) or loc >= depth:
      raise ConfigError(f"token_learner loc={loc!r} is outside the ViT's {depth} blocks "
                        f"(0..{depth - 1})")
    if not settings_lib.is_count(num_tokens):
      raise ConfigError(f"token_learner num_tokens must be a positive integer, got {num_tokens!r}")
    if version not in VERSIONS:
      raise ConfigError(f"token_learner version must be one of {VERSIONS}, got {version!r}")
    if mode not in MODES:
      raise ConfigError(f"token_learner mode must be one of {MODES}, got {mode!r}")
    if not settings_lib.is_count(bottleneck_dim):
      raise ConfigError(f"token_learner bottleneck_dim must be a positive integer, got "
                        f"{bottleneck_dim!r}")
    if not 0.0 <= dropout_rate < 1.0:
      raise ConfigError(f"token_learner dropout_rate must be in [0, 1), got {dropout_rate!r}")
    kwargs = dict(num_tokens=int(num_tokens), version=version, mode=mode,
                  bottleneck_dim=int(bottleneck_dim), dropout_rate=float(dropout_rate),
                  use_sum_pooling=bool(use_sum_pooling),
                  fuser_normalization=bool(fuser_normalization))
    layers = [int(loc)] if mode == "learner" else range(int(loc), depth)
    return {i: dict(kwargs) for i in layers}

  def _dtypes(self):
    """(compute dtype, param dtype): the model's, so the learned modules run in its precision."""
    ctx = self.context
    return (None, jnp.float32) if ctx is None else (ctx.dtype, ctx.param_dtype)

  def _learner(self) -> nn.Module:
    if self.version == "v1":
      return TokenLearnerV1(self.num_tokens, self.use_sum_pooling, *self._dtypes(), name="learner")
    return TokenLearnerV11(self.num_tokens, self.bottleneck_dim, self.dropout_rate,
                           *self._dtypes(), name="learner")

  @nn.compact
  def __call__(self, state: base.TokenState, info: base.BlockInfo, *, train: bool = False):
    if info.stage == base.PRE_BLOCK:
      return self._learn(state, train)
    if self.mode == "fuser":
      return self._fuse(state, train)
    return state, {}

  def _learn(self, state: base.TokenState, train: bool):
    p = state.num_prefix
    patches = state.x[:, p:]
    n = patches.shape[1]
    if self.num_tokens > n:
      raise ConfigError(f"{self.where}: token_learner num_tokens={self.num_tokens} is more than "
                        f"the {n} patch tokens it would pool"
                        + (" (those of one time slice, as per_slice=True)" if self.per_slice
                           else ""))
    if state.mask is not None or state.policy is not None:
      raise ConfigError(f"{self.where}: token_learner cannot pool a masked or policy-weighted "
                        "token state (learned tokens have no single keep decision); place it "
                        "before the pruning reducer")
    if self.version == "v1":
      h, w = state.grid.hw
      if h != w:
        raise ConfigError(f"{self.where}: token_learner version 'v1' needs a square patch grid, "
                          f"got {h}x{w}; use version 'v1.1'")
      if n != h * w:
        raise ConfigError(f"{self.where}: token_learner version 'v1' convolves over the {h}x{w} "
                          f"patch grid, but {n} patch tokens arrive (an earlier reducer changed "
                          "them); use version 'v1.1'")
    tokens, weights = self._learner()(patches, deterministic=not train, return_weights=True)
    # Attribution of each learned token over its inputs, normalised: a learned token counts as
    # one token where the ViT weighs tokens by size.
    share = weights / jnp.maximum(weights.sum(axis=-1, keepdims=True), 1e-12)
    new = state.combine(share, tokens.astype(state.x.dtype))
    if self.mode == "fuser":
      # The N tokens entering the block (every per-token field and carry), restored after it.
      entry = {"fields": state.per_token_fields(),
               "carry": {k: state.carry[k] for k, _ in state.per_token}}
      new = new.put(self.name, "entry", entry)
    return new, {"weights": weights}

  def _fuse(self, state: base.TokenState, train: bool):
    entry, state = state.pop(self.name, "entry")
    p = state.num_prefix
    fields = entry["fields"]
    residual = fields["x"][:, p:]
    fused = TokenFuser(self.fuser_normalization, self.bottleneck_dim, self.dropout_rate,
                       *self._dtypes(), name="fuser")(
                           state.x[:, p:], residual, deterministic=not train)
    x = jnp.concatenate([state.x[:, :p], (fused + residual).astype(state.x.dtype)], axis=1)
    per_token = dict(state.per_token)
    carry = {k: v for k, v in state.carry.items() if k not in per_token}
    carry.update(entry["carry"])
    return state.replace(**{**fields, "x": x}, carry=carry,
                         per_token=tuple((k, m) for k, m in state.per_token if k in entry["carry"])
                         ), {}
