"""Planning: a config's `token_reduction` entries turned into a static per-layer placement of
reducers (`build_plan` -> `ReductionPlan`), with the plan-wide switches the ViT reads.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Tuple

from vitoken import settings as settings_lib
from vitoken.errors import ConfigError
from vitoken.models.reducers.contract import (
  BLOCK_STAGES,
  EMBED_LAYER,
  POST_ATTN,
  POST_BLOCK,
  PRE_BLOCK,
  PRE_POSEMB,
  ModelContext,
  Reducer,
  registered_reducer,
)


@dataclasses.dataclass(frozen=True)
class PlannedReducer:
  cls: type
  name: str  # the config entry's name: module name and carry owner
  kwargs: Tuple[Tuple[str, Any], ...]
  per_slice: bool = False  # the entry's `per_slice`: run on each time slice separately

  def build(self, layer: Optional[int], context: Optional[ModelContext] = None) -> Reducer:
    return self.cls(layer=layer, context=context, name=self.name, per_slice=self.per_slice,
                    **dict(self.kwargs))

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


def build_plan(token_reduction: Any, depth: int) -> ReductionPlan:
  """Normalises `token_reduction` (None, one spec dict, or a list of them) into a plan."""
  # Registers the built-in methods. Function-local because the package imports the method
  # modules, which import the contract (and this module, through `base`): a module-level
  # import here would be a cycle.
  from vitoken.models import reducers as _builtin  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import

  spec = settings_lib.plain(token_reduction)
  if spec is None or spec == {} or spec == ():
    specs = ()
  elif isinstance(spec, Mapping):
    specs = (spec,)
  elif isinstance(spec, (tuple, list)):
    specs = tuple(spec)
  else:
    raise ConfigError("token_reduction must be a dict, a list of dicts or None, got "
                      f"{type(spec).__name__}: {spec!r}")

  per_layer: List[List[PlannedReducer]] = [[] for _ in range(depth)]
  embed: List[PlannedReducer] = []
  flags = {"proportional_attention": False, "track_source": False, "rng_streams": frozenset()}
  proportional_from = depth
  for entry in specs:
    if not isinstance(entry, Mapping) or "method" not in entry:
      raise ConfigError(f"each token_reduction entry needs a 'method' key, got {entry!r}")
    settings = dict(entry)
    method = settings.pop("method")
    if method is None or method == "none":
      continue
    cls = registered_reducer(method)
    name = settings.pop("name", method)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
      raise ConfigError(f"token_reduction entry name {name!r} must be an identifier")
    per_slice = settings.pop("per_slice", False)
    if not isinstance(per_slice, bool):
      raise ConfigError(f"token_reduction {method!r}: per_slice must be true or false, got "
                        f"{per_slice!r}")
    _check_settings(cls, settings)
    entry_flags = cls.plan_flags(settings)
    for layer, kwargs in cls.layer_settings(depth, **settings).items():
      if entry_flags.get("proportional_attention"):
        sees = layer == EMBED_LAYER or PRE_BLOCK in cls.stages
        proportional_from = min(proportional_from, max(layer, 0) if sees else layer + 1)
      planned = PlannedReducer(cls, name, tuple(sorted(kwargs.items())), per_slice)
      if layer == EMBED_LAYER:
        if PRE_POSEMB not in cls.stages:
          raise ConfigError(f"token_reduction {method!r} has no {PRE_POSEMB!r} stage, so it "
                            "cannot be placed at the embedding")
        target = embed
      elif 0 <= layer < depth:
        if not set(cls.stages) & set(BLOCK_STAGES):
          raise ConfigError(f"token_reduction {method!r} acts only at {cls.stages}; it cannot be "
                            f"placed in block {layer}")
        target = per_layer[layer]
      else:
        raise ConfigError(f"token_reduction {method!r} targets layer {layer}, but the ViT has "
                          f"{depth} layers (0..{depth - 1})")
      if any(p.name == name for p in target):
        where = "the embedding" if layer == EMBED_LAYER else f"layer {layer}"
        raise ConfigError(f"two token_reduction entries named {name!r} act at {where}; give each "
                          "a distinct `name` (it names the parameters and carried arrays)")
      target.append(planned)
    for key, on in entry_flags.items():
      flags[key] = flags[key] | on if key == "rng_streams" else (flags[key] or on)
  for p in (p for layer in per_layer for p in layer):
    attends = set(p.cls.stages) & {POST_ATTN, POST_BLOCK}
    if p.cls.needs and not attends:
      raise ConfigError(f"token_reduction {p.cls.method_name()!r} needs {sorted(p.cls.needs)}, "
                        f"which the attention computes, but it acts only at {p.cls.stages}")
  return ReductionPlan(depth=depth, per_layer=tuple(tuple(p) for p in per_layer),
                       embed=tuple(embed), proportional_from=proportional_from, **flags)


def _check_settings(cls, settings):
  """Rejects config keys the method does not take, naming them and the allowed ones."""
  section = f"token_reduction method {cls.method_name()!r}"
  extra = None
  if settings_lib.takes_var_keywords(cls.layer_settings):
    # Extra settings are forwarded to the module, so its fields are the schema.
    extra = {f.name for f in dataclasses.fields(cls)} - {"layer", "context", "name", "parent",
                                                         "per_slice"}
  settings_lib.check_call(cls.layer_settings, settings, section, exclude=("depth",),
                          extra_allowed=extra)
