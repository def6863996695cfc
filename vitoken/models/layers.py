"""Small building blocks of the transformer: MLP, layer scale, stochastic depth."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout: float = 0.0
  gelu_approximate: bool = False  # timm: exact erf GELU; big_vision: tanh approximation
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    init = dict(kernel_init=nn.initializers.xavier_uniform(),
                bias_init=nn.initializers.normal(stddev=1e-6), dtype=self.dtype,
                param_dtype=self.param_dtype)
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, name="fc1", **init)(x)
    x = nn.gelu(x, approximate=self.gelu_approximate)
    x = nn.Dropout(self.dropout)(x, deterministic)
    x = nn.Dense(width, name="fc2", **init)(x)
    return nn.Dropout(self.dropout)(x, deterministic)


class LayerScale(nn.Module):
  """Per-channel scale of a residual branch (CaiT / DeiT-3)."""
  init_value: float
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],),
                       self.param_dtype)
    return x * gamma.astype(x.dtype)


def drop_path(module: nn.Module, x, rate, *, deterministic: bool):
  """Stochastic depth: drops the whole residual branch per example, rescaling the survivors.

  `rate` may be a traced scalar (each scanned layer gets its own rate), so no Python
  branching on its value.
  """
  if deterministic:
    return x
  keep_prob = 1.0 - jnp.asarray(rate, jnp.float32)
  keep = jax.random.bernoulli(module.make_rng("dropout"), keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / keep_prob.astype(x.dtype), jnp.zeros_like(x))
