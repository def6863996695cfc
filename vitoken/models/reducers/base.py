"""The token-reduction contract shared by every method (ToMe, TokenLearner, EViT, ...).

A reducer is a Linen module placed at a layer of the ViT by a config entry. It declares the
`stages` of the block it acts at; at each, the block calls

    state, aux = reducer(state, info, train=train)       # info.stage says which stage

and the reducer returns a new state with static shapes plus an `aux` dict. One module
instance serves all of its stages at a layer, so a method that acts before and after a block
(TokenFuser, LookupViT) shares its parameters and passes arrays between its stages through
`state.carry` (see `TokenState.put`). Where it runs is a property of the method, so the ViT
never branches on the method name.

    pre_posemb (once, embedding level) -> [pre_block -> attention -> post_attn -> MLP
                                          -> post_block] x depth
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Callable, ClassVar, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

from jax.experimental import checkify
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vitoken import settings as settings_lib

# Stages at which a reducer can act.
PRE_POSEMB = "pre_posemb"  # once, between patch embedding and position embedding (SimMIM masks)
PRE_BLOCK = "pre_block"  # before a block (TokenLearner, DynamicViT, MAE masking)
POST_ATTN = "post_attn"  # between attention and MLP (ToMe, EViT)
POST_BLOCK = "post_block"  # after the MLP (TokenFuser restoring N tokens)
BLOCK_STAGES = (PRE_BLOCK, POST_ATTN, POST_BLOCK)
STAGES = (PRE_POSEMB,) + BLOCK_STAGES
EMBED_LAYER = -1  # the layer key of the embedding-level stage in `layer_settings`

# What a reducer may ask the block's attention to compute. Both are per-token arrays that
# ride in the state after the attention, so every gather or merge by an earlier reducer at
# the same stage moves them: a reducer always reads them for the tokens it is given.
KEYS_MEAN = "keys_mean"  # [B, N, head_dim] keys averaged over heads (ToMe's metric)
CLS_ATTN = "cls_attn"  # [B, N] class-token attention averaged over heads (EViT)
BLOCK_NEEDS = (KEYS_MEAN, CLS_ATTN)
BLOCK_OWNER = "block"  # carry owner of the block's per-token information
BLOCK_MERGE = {KEYS_MEAN: "mean", CLS_ATTN: "sum"}  # attention mass adds up over a merge

# `TokenState.ids` of a token that is no single input position (a learned or fused token).
LEARNED_ID = -1

# How a per-token carried array follows a merge of tokens (a gather just moves it):
# "mean" size-weighted like the tokens, "sum", "max", or "keep" the destination's value.
MERGE_MODES = ("mean", "sum", "max", "keep")

_DEBUG = {"checked_gathers": False}
_PHASE = {"start": None}


@contextlib.contextmanager
def checked_gathers(enabled: bool = True):
  """Debug switch: inside it, every token gather checks its indices (checkify user checks).

  Functions traced inside must run under `checkify.checkify(...)` (see `run_checked`); an
  index outside the token axis then raises instead of filling NaN.
  """
  previous = _DEBUG["checked_gathers"]
  _DEBUG["checked_gathers"] = enabled
  try:
    yield
  finally:
    _DEBUG["checked_gathers"] = previous


@contextlib.contextmanager
def schedule_phase(start: Optional[float]):
  """Trace-time switch for reducers whose token counts follow a training schedule (EViT's
  keep rate): inside it, they build the program for the phase of training that begins at
  progress `start` (a Python float, one of `ReductionPlan.phase_starts()`, or 0.0).

  Token counts must be static per compiled program, so a schedule is a few fixed phases and
  the trainer compiles one train step per phase (the phase is a static argument of its jit).
  Outside it (evaluation, or a training call outside the trainer) the final setting applies.
  """
  previous = _PHASE["start"]
  _PHASE["start"] = None if start is None else float(start)
  try:
    yield
  finally:
    _PHASE["start"] = previous


def current_phase() -> Optional[float]:
  """The start of the training phase being traced (see `schedule_phase`), or None."""
  return _PHASE["start"]


def run_checked(fn: Callable, *args, **kwargs):
  """Calls `fn` with checked gathers, raising on any out-of-range token index."""
  with checked_gathers():
    err, out = checkify.checkify(fn, errors=checkify.user_checks)(*args, **kwargs)
  err.throw()
  return out


def take_tokens(x: jax.Array, indices: jax.Array) -> jax.Array:
  """Batched gather along the token axis: x [B, T, ...], indices [B, K] -> [B, K, ...].

  Unchecked (see `checked_gathers`), an index >= T fills (NaN for floats) and a negative one
  counts from the end, as numpy's; neither is an error.
  """
  if _DEBUG["checked_gathers"]:
    t = x.shape[1]
    checkify.check(jnp.all((indices >= 0) & (indices < t)),
                   f"token gather index out of range for {t} tokens (shape {tuple(x.shape)})")
  return jnp.take_along_axis(x, indices.reshape(indices.shape + (1,) * (x.ndim - 2)), axis=1)


@dataclasses.dataclass(frozen=True)
class ModelContext:
  """The model's settings a reducer needs to build layers that fit it (static, hashable)."""
  width: int
  num_heads: int
  mlp_dim: int
  depth: int
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = False
  attention_impl: Optional[str] = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  num_prefix: int = 0
  class_token: Optional[bool] = None  # None: unknown (a reducer built outside a ViT)

  def dense(self, features, **kw) -> nn.Dense:
    return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, **kw)

  def layer_norm(self, **kw) -> nn.LayerNorm:
    return nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, **kw)

  def gelu(self, x):
    return nn.gelu(x, approximate=self.gelu_approximate)


@flax.struct.dataclass
class TokenState:
  """Everything a block and its reducers know about the current token sequence.

  Leading `num_prefix` tokens (class token, registers) are protected: no reducer may drop,
  merge or reorder them. All per-token arrays share the [B, N] leading dims.

  Learned and fused tokens (a token learner's outputs) have `ids == LEARNED_ID`, `size` the
  total patch mass they pool (sum of their weights times the input sizes) and `source` the
  same weights spread over the initial tokens.
  """
  x: jax.Array  # [B, N, C] tokens
  size: jax.Array  # [B, N] float32: how many original tokens each token stands for
  ids: jax.Array  # [B, N] int32: index in the initial sequence (prefix included); LEARNED_ID
  source: Optional[jax.Array] = None  # [B, N, N0] which initial tokens each token holds
  mask: Optional[jax.Array] = None  # [B, N] bool: False marks a dropped or padding token
  # [B, N] float keep weights in [0, 1] (DynamicViT): attention to a key is scaled by its
  # weight (each token still attends fully to itself), so gradients reach the policy.
  policy: Optional[jax.Array] = None
  # Arrays a method carries between its stages and layers, as {"owner/key": array}. Keys
  # listed in `per_token` (with their merge mode) are [B, N, ...] and move with every gather
  # and merge; the others are global and nothing touches them.
  carry: Dict[str, Any] = flax.struct.field(default_factory=dict)
  per_token: Tuple[Tuple[str, str], ...] = flax.struct.field(pytree_node=False, default=())
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

  # ---- carried arrays ---------------------------------------------------------------------
  def put(self, owner: str, key: str, value, *, per_token: bool = False,
          merge: str = "mean") -> "TokenState":
    """Carries `value` under `owner/key` (owner: the reducer's config-entry name)."""
    full = f"{owner}/{key}"
    if per_token:
      if merge not in MERGE_MODES:
        raise ValueError(f"carry {full!r}: merge must be one of {MERGE_MODES}, got {merge!r}")
      if tuple(value.shape[:2]) != tuple(self.x.shape[:2]):
        raise ValueError(f"per-token carry {full!r} has shape {tuple(value.shape)}, but the "
                         f"tokens are {tuple(self.x.shape[:2])} [batch, tokens]")
    modes = tuple((k, m) for k, m in self.per_token if k != full)
    if per_token:
      modes += ((full, merge),)
    return self.replace(carry={**self.carry, full: value}, per_token=modes)

  def has(self, owner: str, key: str) -> bool:
    return f"{owner}/{key}" in self.carry

  def get(self, owner: str, key: str):
    full = f"{owner}/{key}"
    if full not in self.carry:
      raise KeyError(f"no carried array {full!r} in the token state (carried: "
                     f"{sorted(self.carry) or 'none'}); the stage that writes it has not run")
    return self.carry[full]

  def pop(self, owner: str, key: str):
    """(value, state without it)."""
    value, full = self.get(owner, key), f"{owner}/{key}"
    carry = {k: v for k, v in self.carry.items() if k != full}
    return value, self.replace(carry=carry, per_token=tuple(p for p in self.per_token if p[0] != full))

  def carried_per_token(self) -> Dict[str, Tuple[jax.Array, str]]:
    return {k: (self.carry[k], mode) for k, mode in self.per_token}

  # ---- moving tokens ----------------------------------------------------------------------
  def per_token_fields(self) -> Dict[str, jax.Array]:
    """The fields whose second axis is the token axis (those a gather must move)."""
    fields = {"x": self.x, "size": self.size, "ids": self.ids}
    for name in ("source", "mask", "policy"):
      if getattr(self, name) is not None:
        fields[name] = getattr(self, name)
    return fields

  def map_tokens(self, fn: Callable[[jax.Array], jax.Array]) -> "TokenState":
    """Applies `fn` to every per-token field and per-token carry (a gather or a slice)."""
    moved = {name: fn(a) for name, a in self.per_token_fields().items()}
    carry = dict(self.carry)
    for key, _ in self.per_token:
      carry[key] = fn(carry[key])
    return self.replace(carry=carry, **moved)

  def gather(self, indices: jax.Array) -> "TokenState":
    """Keeps tokens `indices` [B, K] (batched gather of every per-token field and carry)."""
    return self.map_tokens(lambda a: take_tokens(a, indices))

  def combine(self, weights: jax.Array, x: jax.Array, *, keep: Optional[jax.Array] = None
              ) -> "TokenState":
    """Replaces the unprotected tokens by learned ones: `x` [B, S, C] built with `weights`
    [B, S, T] over the T unprotected input tokens (rows need not sum to 1).

    The protected tokens stay in front, followed by the tokens `keep` [B, K] (indices into
    the whole sequence, protected ones included) when given (EViT keeps its attentive tokens
    and fuses the rest), then the new ones. The new tokens get ids LEARNED_ID, size = weights
    @ size, source = weights @ source, and per-token carries with merge "sum" or "mean" are
    combined the same way ("mean" normalised by the new size); "max"/"keep" carries cannot
    follow a soft combination and are an error (pop them first). Masked or policy-weighted
    states are refused: learned tokens have no single keep decision.
    """
    p = self.num_prefix
    if self.mask is not None or self.policy is not None:
      raise ValueError("combine: the token state has a mask or a keep policy; learned tokens "
                       "cannot inherit them")
    b, s = x.shape[:2]
    w = weights.astype(jnp.float32)
    size_in = self.size[:, p:]
    new_size = jnp.einsum("bst,bt->bs", w, size_in)
    head = self.map_tokens(lambda a: a[:, :p]) if keep is None else self.gather(keep)
    cat = lambda pre, new: jnp.concatenate([pre.astype(new.dtype), new], axis=1)
    carry = dict(head.carry)
    for key, mode in self.per_token:
      v = self.carry[key][:, p:].astype(jnp.float32)
      if mode == "sum":
        new = jnp.einsum("bst,bt...->bs...", w, v)
      elif mode == "mean":
        ws = w * size_in[:, None, :]
        new = jnp.einsum("bst,bt...->bs...", ws, v) / jnp.maximum(
            new_size, 1e-6).reshape((b, s) + (1,) * (v.ndim - 2))
      else:
        raise ValueError(f"combine: carry {key!r} merges by {mode!r}, which learned tokens "
                         "cannot follow; pop it before combining")
      carry[key] = cat(head.carry[key], new.astype(self.carry[key].dtype))
    source = None
    if self.source is not None:
      source = cat(head.source, jnp.einsum("bst,btm->bsm", w, self.source[:, p:]))
    ids = cat(head.ids, jnp.full((b, s), LEARNED_ID, jnp.int32))
    return self.replace(x=cat(head.x, x), size=cat(head.size, new_size), ids=ids,
                        source=source, carry=carry)


@flax.struct.dataclass
class BlockInfo:
  """What a reducer may read at a stage. Unrequested fields are None."""
  layer: Any  # int; a traced int32 scalar inside a scanned encoder
  stage: str = flax.struct.field(pytree_node=False, default=POST_ATTN)
  keys_mean: Optional[jax.Array] = None
  cls_attn: Optional[jax.Array] = None
  # Training progress for schedules (keep-rate warmup, Gumbel temperature): the optimizer
  # step (None outside training) and the fraction of training done (1.0 outside training).
  step: Optional[jax.Array] = None
  progress: Any = 1.0
  inputs: Dict[str, Any] = flax.struct.field(default_factory=dict)  # extra batch fields


class Reducer(nn.Module):
  """Base class for token reducers.

  Subclasses set the class attributes and implement `__call__(state, info, train)` returning
  `(state, aux)`. `aux` may hold `"losses"`: {name: scalar}, which the trainer adds to the loss,
  and any other records (they surface in the ViT's aux under "reduction").

  `layer_settings(depth, **settings)` turns a config entry into {layer: module kwargs}
  (EMBED_LAYER for the embedding-level stage); its signature is the config schema, so unknown
  keys are rejected by name. Every config entry may also set `name` (default: the method),
  which names the module's parameters and owns its carried arrays.
  """
  layer: Optional[int] = 0  # None inside a scanned encoder: read `info.layer`
  context: Optional[ModelContext] = None

  stages: ClassVar[Tuple[str, ...]] = (POST_ATTN,)
  needs: ClassVar[FrozenSet[str]] = frozenset()
  changes_shape: ClassVar[bool] = True  # False lets the ViT scan over layers
  proportional_attention: ClassVar[bool] = False  # add log(size) to attention logits
  track_source: ClassVar[bool] = False  # ask the ViT to initialise TokenState.source
  rng_streams: ClassVar[FrozenSet[str]] = frozenset()  # rng streams it draws from, also in eval
  # Layer-wise lr decay group of parameters created at the embedding level ("stem" or "head");
  # parameters inside a block follow their block.
  layer_decay_group: ClassVar[str] = "stem"
  # (regex on the parameter path below the reducer, partition spec); the rest is replicated.
  sharding_rules: ClassVar[Tuple[Tuple[str, Tuple], ...]] = ()

  # Where the default `layer_settings` places the method when its entry names no `layers`.
  default_layers: ClassVar[Optional[Tuple[int, ...]]] = None

  @classmethod
  def layer_settings(cls, depth: int, layers: Optional[Sequence[int]] = None,
                     **settings) -> Dict[int, Dict[str, Any]]:
    """Default schema: `layers` (or the class's `default_layers`) plus the module's fields."""
    layers = cls.default_layers if layers is None else layers
    if layers is None:
      raise ValueError(f"token_reduction method {cls.method_name()!r} needs `layers`, "
                       "the block indices it runs at")
    return {int(i): dict(settings) for i in layers}

  @classmethod
  def phase_starts(cls, kwargs: Mapping[str, Any]) -> Tuple[float, ...]:
    """Training progress fractions at which this configured layer's static shapes change
    (see `schedule_phase`); none by default."""
    return ()

  @classmethod
  def method_name(cls) -> str:
    return getattr(cls, "_registered_name", cls.__name__)

  @classmethod
  def plan_flags(cls, settings: Mapping[str, Any]) -> Dict[str, Any]:
    """Plan-wide switches this configured reducer turns on (e.g. proportional attention). A
    method whose schema takes `trace_source` turns source tracking on with it (pictures)."""
    return {"proportional_attention": cls.proportional_attention,
            "track_source": cls.track_source or bool(settings.get("trace_source")),
            "rng_streams": frozenset(cls.rng_streams)}

  def __call__(self, state: TokenState, info: BlockInfo, *, train: bool = False):
    raise NotImplementedError

  @property
  def where(self) -> str:
    return "a scanned layer" if self.layer is None else (
        "the embedding" if self.layer == EMBED_LAYER else f"layer {self.layer}")

  def check_protected(self, state: TokenState, num_out: int):
    if num_out < state.num_prefix:
      raise ValueError(f"{self.where}: {self.method_name()} would keep {num_out} tokens "
                       f"but {state.num_prefix} are protected (class/register tokens)")


_REGISTRY: Dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
  """Class decorator: makes a Reducer available as `token_reduction={"method": name, ...}`."""
  def wrap(cls):
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(f"token reducer {name!r} is registered twice")
    bad = sorted(set(cls.stages) - set(STAGES))
    if bad or not cls.stages:
      raise ValueError(f"reducer {name!r}: stages must be a non-empty subset of {STAGES}, "
                       f"got {cls.stages}")
    cls._registered_name = name
    _REGISTRY[name] = cls
    return cls
  return wrap


def registered_methods() -> List[str]:
  return sorted(_REGISTRY)


@dataclasses.dataclass(frozen=True)
class PlannedReducer:
  cls: type
  name: str  # the config entry's name: module name and carry owner
  kwargs: Tuple[Tuple[str, Any], ...]

  def build(self, layer: Optional[int], context: Optional[ModelContext] = None) -> Reducer:
    return self.cls(layer=layer, context=context, name=self.name, **dict(self.kwargs))

  def acts_at(self, stage: str) -> bool:
    return stage in self.cls.stages


@dataclasses.dataclass(frozen=True)
class ReductionPlan:
  """Static per-layer placement of reducers, derived once from the config."""
  depth: int
  per_layer: Tuple[Tuple[PlannedReducer, ...], ...]
  embed: Tuple[PlannedReducer, ...] = ()  # embedding-level (pre_posemb) reducers
  proportional_attention: bool = False
  # The first block whose attention adds log(size): the first one a proportional reducer can
  # have changed sizes for (its layer when it acts before the block, the next one otherwise).
  # Earlier blocks run as without it, so e.g. EViT's blocks stay exact before ToMe starts.
  proportional_from: int = 0
  track_source: bool = False
  rng_streams: FrozenSet[str] = frozenset()

  def proportional_at(self, layer: int) -> bool:
    return self.proportional_attention and layer >= self.proportional_from

  def at(self, layer: int, stage: Optional[str] = None) -> Tuple[PlannedReducer, ...]:
    return tuple(p for p in self.per_layer[layer] if stage is None or p.acts_at(stage))

  def needs(self, layer: int) -> FrozenSet[str]:
    return frozenset().union(*(p.cls.needs for p in self.per_layer[layer]))

  @property
  def empty(self) -> bool:
    return not any(self.per_layer) and not self.embed

  @property
  def scannable(self) -> bool:
    """True when every layer runs the same shape-preserving reducers."""
    first = self.per_layer[0] if self.per_layer else ()
    return (all(layer == first for layer in self.per_layer)
            and not any(p.cls.changes_shape for p in first))

  def entries(self) -> Tuple[PlannedReducer, ...]:
    return self.embed + tuple(p for layer in self.per_layer for p in layer)

  def sharding_rules(self) -> Tuple[Tuple[str, Tuple], ...]:
    """Each reducer's declared rules, anchored below its own module name."""
    rules = {}
    for p in self.entries():
      for pattern, spec in p.cls.sharding_rules:
        # Patterns are relative to the reducer's own parameters: a leading ^ means its top.
        pattern = pattern[1:] if pattern.startswith("^") else f"(.*/)?{pattern}"
        rules[(rf"(^|/){re.escape(p.name)}/{pattern}", tuple(spec))] = None
    return tuple(rules)

  def phase_starts(self) -> Tuple[float, ...]:
    """Sorted progress fractions in (0, 1) where a scheduled reducer changes token counts."""
    starts = {s for p in self.entries() for s in p.cls.phase_starts(dict(p.kwargs))}
    return tuple(sorted(s for s in starts if 0.0 < s < 1.0))

  def layer_decay_groups(self) -> Dict[str, str]:
    """{top-level parameter name: group} for embedding-level reducers."""
    return {p.name: p.cls.layer_decay_group for p in self.embed}


_ENTRY_KEYS = ("method", "name")


def build_plan(token_reduction: Any, depth: int) -> ReductionPlan:
  """Normalises `token_reduction` (None, one spec dict, or a list of them) into a plan."""
  from vitoken.models import reducers as _  # noqa: F401  (registers the built-in methods)

  spec = settings_lib.plain(token_reduction)
  if spec is None or spec == {} or spec == ():
    specs = ()
  elif isinstance(spec, Mapping):
    specs = (spec,)
  elif isinstance(spec, (tuple, list)):
    specs = tuple(spec)
  else:
    raise ValueError(f"token_reduction must be a dict, a list of dicts or None, got {type(spec).__name__}")

  per_layer: List[List[PlannedReducer]] = [[] for _ in range(depth)]
  embed: List[PlannedReducer] = []
  flags = {"proportional_attention": False, "track_source": False, "rng_streams": frozenset()}
  proportional_from = depth
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
    name = settings.pop("name", method)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
      raise ValueError(f"token_reduction entry name {name!r} must be an identifier")
    _check_settings(cls, settings)
    entry_flags = cls.plan_flags(settings)
    for layer, kwargs in cls.layer_settings(depth, **settings).items():
      if entry_flags.get("proportional_attention"):
        sees = layer == EMBED_LAYER or PRE_BLOCK in cls.stages
        proportional_from = min(proportional_from, max(layer, 0) if sees else layer + 1)
      planned = PlannedReducer(cls, name, tuple(sorted(kwargs.items())))
      if layer == EMBED_LAYER:
        if PRE_POSEMB not in cls.stages:
          raise ValueError(f"token_reduction {method!r} has no {PRE_POSEMB!r} stage, so it "
                           "cannot be placed at the embedding")
        target = embed
      elif 0 <= layer < depth:
        if not set(cls.stages) & set(BLOCK_STAGES):
          raise ValueError(f"token_reduction {method!r} acts only at {cls.stages}; it cannot be "
                           f"placed in block {layer}")
        target = per_layer[layer]
      else:
        raise ValueError(f"token_reduction {method!r} targets layer {layer}, but the ViT has "
                         f"{depth} layers (0..{depth - 1})")
      if any(p.name == name for p in target):
        where = "the embedding" if layer == EMBED_LAYER else f"layer {layer}"
        raise ValueError(f"two token_reduction entries named {name!r} act at {where}; give each "
                         "a distinct `name` (it names the parameters and carried arrays)")
      target.append(planned)
    for key, on in entry_flags.items():
      flags[key] = flags[key] | on if key == "rng_streams" else (flags[key] or on)
  for p in (p for layer in per_layer for p in layer):
    attends = set(p.cls.stages) & {POST_ATTN, POST_BLOCK}
    if p.cls.needs and not attends:
      raise ValueError(f"token_reduction {p.cls.method_name()!r} needs {sorted(p.cls.needs)}, "
                       f"which the attention computes, but it acts only at {p.cls.stages}")
  return ReductionPlan(depth=depth, per_layer=tuple(tuple(p) for p in per_layer),
                       embed=tuple(embed), proportional_from=proportional_from, **flags)


def _check_settings(cls, settings):
  """Rejects config keys the method does not take, naming them and the allowed ones."""
  section = f"token_reduction method {cls.method_name()!r}"
  extra = None
  if settings_lib.takes_var_keywords(cls.layer_settings):
    # Extra settings are forwarded to the module, so its fields are the schema.
    extra = {f.name for f in dataclasses.fields(cls)} - {"layer", "context", "name", "parent"}
  settings_lib.check_call(cls.layer_settings, settings, section, exclude=("depth",),
                          extra_allowed=extra)
