"""Small building blocks of the transformer: MLP, layer scale, stochastic depth."""
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitoken.errors import ConfigError

# The MLP nonlinearities a converted checkpoint may need: "gelu" (exact erf: timm, torch's
# nn.GELU), "gelu_tanh" (big_vision, flax's default) and "quick_gelu" (OpenAI CLIP).
MLP_ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


def quick_gelu(x):
  """OpenAI CLIP's GELU stand-in, x * sigmoid(1.702 x); its checkpoints were trained with it."""
  return x * jax.nn.sigmoid(1.702 * x)


def check_mlp_activation(name: Optional[str], gelu_approximate: bool = False):
  """A ConfigError for an unknown `mlp_activation` or one that `gelu_approximate` contradicts."""
  if name is not None and name not in MLP_ACTIVATIONS:
    raise ConfigError(f"mlp_activation must be one of {MLP_ACTIVATIONS} or None (GELU as "
                      f"gelu_approximate says), got {name!r}")
  # gelu_approximate=False is also the default, so only True can contradict a name.
  if gelu_approximate and name in ("gelu", "quick_gelu"):
    raise ConfigError(f"gelu_approximate=True asks for the tanh GELU but mlp_activation={name!r} "
                      "is another function; set gelu_approximate=False, or "
                      "mlp_activation='gelu_tanh' (or None)")


def mlp_activation(name: Optional[str] = None, gelu_approximate: bool = False) -> Callable:
  """The MLP nonlinearity as a function of x. None keeps the older switch: GELU, with the tanh
  approximation iff `gelu_approximate`."""
  check_mlp_activation(name, gelu_approximate)
  if name is None:
    name = "gelu_tanh" if gelu_approximate else "gelu"
  if name == "quick_gelu":
    return quick_gelu
  approximate = name == "gelu_tanh"
  return lambda x: nn.gelu(x, approximate=approximate)


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout: float = 0.0
  gelu_approximate: bool = False  # timm: exact erf GELU; big_vision: tanh approximation
  dtype: Any = None
  param_dtype: Any = jnp.float32
  activation: Optional[str] = None  # a name from MLP_ACTIVATIONS; None: as gelu_approximate

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    init = dict(kernel_init=nn.initializers.xavier_uniform(),
                bias_init=nn.initializers.normal(stddev=1e-6), dtype=self.dtype,
                param_dtype=self.param_dtype)
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, name="fc1", **init)(x)
    x = mlp_activation(self.activation, self.gelu_approximate)(x)
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
