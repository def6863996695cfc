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

import dataclasses
from typing import (
  Any,
  Callable,
  ClassVar,
  Dict,
  FrozenSet,
  List,
  Mapping,
  Optional,
  Sequence,
  Tuple,
)

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vitoken.errors import ConfigError
from vitoken.models import layers
from vitoken.models.reducers.token_state import TokenState

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
  # The ViT's MLP nonlinearity (`layers.MLP_ACTIVATIONS`); None: GELU as gelu_approximate says.
  mlp_activation: Optional[str] = None

  def dense(self, features, **kw) -> nn.Dense:
    return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, **kw)

  def layer_norm(self, **kw) -> nn.LayerNorm:
    return nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, **kw)

  def gelu(self, x):
    return nn.gelu(x, approximate=self.gelu_approximate)

  def activation(self, x):
    """The model's own MLP nonlinearity, for a reducer's MLP that should match the blocks'."""
    return layers.mlp_activation(self.mlp_activation, self.gelu_approximate)(x)


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
  # The start of the training-schedule phase being traced, as a fraction of training (a
  # static Python float: token counts that follow a schedule are fixed per compiled program,
  # one per phase, see `ReductionPlan.phase_starts`); None outside the trainer's schedule
  # (evaluation, or a training call that names no phase), where final settings apply.
  phase: Optional[float] = flax.struct.field(pytree_node=False, default=None)
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
  # Run on each time slice of a video separately (the entry's `per_slice`; see `run_reducer`).
  per_slice: bool = False

  stages: ClassVar[Tuple[str, ...]] = (POST_ATTN,)
  needs: ClassVar[FrozenSet[str]] = frozenset()
  changes_shape: ClassVar[bool] = True  # False lets the ViT scan over layers
  # True: the `slices` of the state it returns are right as they are (a tube mask keeps them;
  # TESTA merges whole slices and sets them); otherwise a change of the token count over all
  # tokens leaves them unordered by slice, and `run_reducer` sets them to 1.
  keeps_slices: ClassVar[bool] = False
  # True: it may change how many sequences of each example lie along the batch axis and how
  # many protected tokens lead each (`TokenState.sequences`, `num_prefix`; TempMe runs frames
  # as sequences and regroups them). Both stay static; a reducer that does not declare it
  # must leave them as they are, and the ViT joins the sequences after the last block.
  regroups: ClassVar[bool] = False
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
      raise ConfigError(f"token_reduction method {cls.method_name()!r} needs `layers`, "
                        "the block indices it runs at")
    return {int(i): dict(settings) for i in layers}

  @classmethod
  def phase_starts(cls, kwargs: Mapping[str, Any]) -> Tuple[float, ...]:
    """Training progress fractions at which this configured layer's static shapes change
    (each starts a phase, read at trace time as `BlockInfo.phase`); none by default."""
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
      raise ConfigError(f"{self.where}: {self.method_name()} would keep {num_out} tokens "
                        f"but {state.num_prefix} are protected (class/register tokens)")


def run_reducer(reducer: Reducer, state: TokenState, info: BlockInfo, *, train: bool):
  """Calls `reducer` at a stage. With `per_slice` (and a state of several time slices) it runs
  on each slice as its own sequence (`TokenState.fold_slices`; the block information folded
  alike, the class token's attention restricted to the slice), so any method can act within
  frames. A reducer over all tokens that changes their count leaves them unordered by slice."""
  if reducer.per_slice and reducer.regroups:
    raise ConfigError(f"{reducer.where}: {reducer.method_name()} regroups sequences of time "
                      "slices itself; it cannot run per_slice")
  if reducer.per_slice and state.slices > 1:
    folded, prefix = state.fold_slices()

    def fold(a):
      return None if a is None else state.fold_array(a)

    new, aux = reducer(folded, info.replace(keys_mean=fold(info.keys_mean),
                                            cls_attn=fold(info.cls_attn)), train=train)
    if new.num_prefix:
      raise ConfigError(f"{reducer.where}: {reducer.method_name()} added protected tokens to "
                        "a time slice; it cannot run per_slice")
    return state.unfold_slices(new, prefix), aux
  new, aux = reducer(state, info, train=train)
  if not reducer.regroups and (new.sequences, new.num_prefix) != (state.sequences, state.num_prefix):
    raise ConfigError(f"{reducer.where}: {reducer.method_name()} changed the sequences per example "
                      f"or the protected tokens ({state.sequences}, {state.num_prefix} -> "
                      f"{new.sequences}, {new.num_prefix}) without declaring `regroups`")
  if state.slices > 1 and new.num_tokens != state.num_tokens and not reducer.keeps_slices:
    new = new.replace(slices=1)
  return new, aux


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




def registered_reducer(method: str) -> type:
  """The Reducer class registered as `method` (a ValueError naming the known ones if none).

  Only methods whose modules have been imported are registered; `build_plan` imports the
  built-in ones first.
  """
  if method not in _REGISTRY:
    raise ConfigError(f"unknown token_reduction method {method!r}; known: {registered_methods()}")
  return _REGISTRY[method]
