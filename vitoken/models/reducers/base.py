"""The token-reduction contract shared by every method (ToMe, TokenLearner, EViT, ...).

A reducer is a Linen module placed at a layer of the ViT. It receives the token state and
what that layer's attention computed, and returns a new (usually smaller) state with static
shapes plus an `aux` dict. Where in the block it runs is a property of the method (its
`stage`), so the ViT never branches on the method name.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, ClassVar, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

# Stages of a pre-norm block at which a reducer can run.
PRE_BLOCK = "pre_block"  # before the block (TokenLearner, DynamicViT, MAE masking)
POST_ATTN = "post_attn"  # between attention and MLP (ToMe, EViT)
POST_BLOCK = "post_block"  # after the MLP (TokenFuser restoring N tokens)
STAGES = (PRE_BLOCK, POST_ATTN, POST_BLOCK)

# What a reducer may ask the block's attention to compute.
KEYS_MEAN = "keys_mean"  # [B, N, head_dim] keys averaged over heads (ToMe's metric)
CLS_ATTN = "cls_attn"  # [B, N] class-token attention averaged over heads (EViT)
BLOCK_NEEDS = (KEYS_MEAN, CLS_ATTN)


def take_tokens(x: jax.Array, indices: jax.Array) -> jax.Array:
  """Batched gather along the token axis: x [B, T, ...], indices [B, K] -> [B, K, ...]."""
  return jnp.take_along_axis(x, indices.reshape(indices.shape + (1,) * (x.ndim - 2)), axis=1)


@flax.struct.dataclass
class TokenState:
  """Everything a block and its reducers know about the current token sequence.

  Leading `num_prefix` tokens (class token, registers) are protected: no reducer may drop,
  merge or reorder them. All per-token arrays share the [B, N] leading dims.
  """
  x: jax.Array  # [B, N, C] tokens
  size: jax.Array  # [B, N] float32: how many original tokens each token stands for
  ids: jax.Array  # [B, N] int32: index of each token in the initial sequence (prefix included)
  source: Optional[jax.Array] = None  # [B, N, N0] which initial tokens each token holds
  mask: Optional[jax.Array] = None  # [B, N] bool: False marks a dropped or padding token
  # Method-specific carried arrays (stashed full-resolution tokens for TokenFuser, LookupViT's
  # second token set, ...). Keys are owned by the reducer that writes them.
  extras: Dict[str, Any] = flax.struct.field(default_factory=dict)
  num_prefix: int = flax.struct.field(pytree_node=False, default=0)
  grid: Tuple[int, int] = flax.struct.field(pytree_node=False, default=(0, 0))  # patch grid

  @property
  def num_tokens(self) -> int:
    return self.x.shape[1]

  @classmethod
  def create(cls, x, *, num_prefix: int, grid: Tuple[int, int], track_source: bool = False):
    b, n, _ = x.shape
    ids = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    source = None
    if track_source:
      source = jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32), (b, n, n))
    return cls(x=x, size=jnp.ones((b, n), jnp.float32), ids=ids, source=source,
               num_prefix=num_prefix, grid=tuple(grid))

  def per_token_fields(self) -> Dict[str, jax.Array]:
    """The arrays whose second axis is the token axis (those a gather must move)."""
    fields = {"x": self.x, "size": self.size, "ids": self.ids}
    if self.source is not None:
      fields["source"] = self.source
    if self.mask is not None:
      fields["mask"] = self.mask
    return fields

  def gather(self, indices: jax.Array) -> "TokenState":
    """Keeps tokens `indices` [B, K] (batched gather of every per-token field)."""
    return self.replace(**{name: take_tokens(a, indices) for name, a in self.per_token_fields().items()})


@flax.struct.dataclass
class BlockInfo:
  """What the current block computed that a reducer may use. Unrequested fields are None."""
  layer: int = flax.struct.field(pytree_node=False)
  keys_mean: Optional[jax.Array] = None
  cls_attn: Optional[jax.Array] = None


class Reducer(nn.Module):
  """Base class for token reducers.

  Subclasses set the class attributes and implement `__call__(state, info, train)` returning
  `(state, aux)`. `aux` may hold `"losses"`: {name: scalar}, which the trainer adds to the loss,
  and any other records (they surface in the ViT's aux under "reduction").

  `layer_settings(depth, **settings)` turns a config entry into {layer: module kwargs}; its
  signature is the config schema, so unknown keys are rejected by name.
  """
  layer: int = 0

  stage: ClassVar[str] = POST_ATTN
  needs: ClassVar[FrozenSet[str]] = frozenset()
  changes_shape: ClassVar[bool] = True  # False lets the ViT scan over layers
  proportional_attention: ClassVar[bool] = False  # add log(size) to attention logits
  track_source: ClassVar[bool] = False  # ask the ViT to initialise TokenState.source

  @classmethod
  def layer_settings(cls, depth: int, layers: Optional[Sequence[int]] = None,
                     **settings) -> Dict[int, Dict[str, Any]]:
    if layers is None:
      raise ValueError(f"token_reduction method {cls.method_name()!r} needs `layers`, "
                       "the block indices it runs at")
    return {int(i): dict(settings) for i in layers}

  @classmethod
  def method_name(cls) -> str:
    return getattr(cls, "_registered_name", cls.__name__)

  @classmethod
  def plan_flags(cls, settings: Mapping[str, Any]) -> Dict[str, bool]:
    """Plan-wide switches this configured reducer turns on (e.g. proportional attention)."""
    return {"proportional_attention": cls.proportional_attention,
            "track_source": cls.track_source}

  def __call__(self, state: TokenState, info: BlockInfo, *, train: bool = False):
    raise NotImplementedError

  def check_protected(self, state: TokenState, num_out: int):
    if num_out < state.num_prefix:
      raise ValueError(f"layer {self.layer}: {self.method_name()} would keep {num_out} tokens "
                       f"but {state.num_prefix} are protected (class/register tokens)")


_REGISTRY: Dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
  """Class decorator: makes a Reducer available as `token_reduction={"method": name, ...}`."""
  def wrap(cls):
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(f"token reducer {name!r} is registered twice")
    cls._registered_name = name
    _REGISTRY[name] = cls
    return cls
  return wrap


def registered_methods() -> List[str]:
  return sorted(_REGISTRY)


@dataclasses.dataclass(frozen=True)
class PlannedReducer:
  cls: type
  kwargs: Tuple[Tuple[str, Any], ...]

  def build(self, layer: int, name: str) -> Reducer:
    return self.cls(layer=layer, name=name, **dict(self.kwargs))


@dataclasses.dataclass(frozen=True)
class ReductionPlan:
  """Static per-layer placement of reducers, derived once from the config."""
  depth: int
  per_layer: Tuple[Tuple[PlannedReducer, ...], ...]
  proportional_attention: bool = False
  track_source: bool = False

  def at(self, layer: int, stage: Optional[str] = None) -> Tuple[PlannedReducer, ...]:
    return tuple(p for p in self.per_layer[layer] if stage is None or p.cls.stage == stage)

  def needs(self, layer: int) -> FrozenSet[str]:
    return frozenset().union(*(p.cls.needs for p in self.per_layer[layer]))

  @property
  def empty(self) -> bool:
    return not any(self.per_layer)

  @property
  def scannable(self) -> bool:
    """True when every layer runs the same shape-preserving reducers."""
    first = self.per_layer[0] if self.per_layer else ()
    return (all(layer == first for layer in self.per_layer)
            and not any(p.cls.changes_shape for p in first))


def _as_plain(value):
  if hasattr(value, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: _as_plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_as_plain(v) for v in value)
  return value


def build_plan(token_reduction: Any, depth: int) -> ReductionPlan:
  """Normalises `token_reduction` (None, one spec dict, or a list of them) into a plan."""
  from vitoken.models import reducers as _  # noqa: F401  (registers the built-in methods)

  spec = _as_plain(token_reduction)
  if spec is None or spec == {} or spec == ():
    specs = ()
  elif isinstance(spec, Mapping):
    specs = (spec,)
  elif isinstance(spec, (tuple, list)):
    specs = tuple(spec)
  else:
    raise ValueError(f"token_reduction must be a dict, a list of dicts or None, got {type(spec).__name__}")

  per_layer: List[List[PlannedReducer]] = [[] for _ in range(depth)]
  flags = {"proportional_attention": False, "track_source": False}
  for entry in specs:
    if not isinstance(entry, Mapping) or "method" not in entry:
      raise ValueError(f"each token_reduction entry needs a 'method' key, got {entry!r}")
    settings = dict(entry)
    method = settings.pop("method")
    if method is None or method == "none":
      continue
    if method not in _REGISTRY:
      raise ValueError(f"unknown token_reduction method {method!r}; known: {registered_methods()}")
    cls = _REGISTRY[method]
    _check_settings(cls, settings)
    for layer, kwargs in cls.layer_settings(depth, **settings).items():
      if not 0 <= layer < depth:
        raise ValueError(f"token_reduction {method!r} targets layer {layer}, but the ViT has "
                         f"{depth} layers (0..{depth - 1})")
      per_layer[layer].append(PlannedReducer(cls, tuple(sorted(kwargs.items()))))
    for key, on in cls.plan_flags(settings).items():
      flags[key] = flags[key] or on
  return ReductionPlan(depth=depth, per_layer=tuple(tuple(p) for p in per_layer), **flags)


def _check_settings(cls, settings):
  """Rejects config keys the method does not take, naming them and the allowed ones."""
  params = inspect.signature(cls.layer_settings).parameters
  allowed = {n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD} - {"depth"}
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    # Extra settings are forwarded to the module, so its fields are the schema.
    allowed |= {f.name for f in dataclasses.fields(cls)} - {"layer", "name", "parent"}
  unknown = sorted(set(settings) - allowed)
  if unknown:
    raise ValueError(f"unknown setting(s) {unknown} for token_reduction method "
                     f"{cls.method_name()!r}; allowed: {sorted(allowed)}")
