"""Optimizers and learning-rate schedules for training and fine-tuning vitoken ViTs.

The trainer calls:

  tx, schedule = make_optimizer(config.optim, config.schedule, params, total_steps)

`make_optimizer` builds an optax chain of

  [global-norm clipping] -> adaptive/momentum scaling -> decoupled weight decay (masked)
  -> [LAMB trust ratio] -> [layer-wise lr decay] -> learning-rate schedule

from two small configs (see `default_optim_config` / `default_schedule_config`). Both configs
may be `ml_collections.ConfigDict`s or plain dicts; missing keys take their defaults and
unknown keys are rejected, so a typo cannot silently train with a default.

Parameter paths are the '/'-joined flax names (`block_00/attn/qkv/kernel`). Both ViT layouts
are supported: unscanned (`block_NN/...`) and scanned (`blocks/...`, every leaf stacked on a
leading layer axis). One step on scanned params equals one step on the same params in the
unscanned layout, also for LAMB (whose trust ratio is taken per layer slice) and with
layer-wise lr decay (whose multiplier is a per-slice array for `blocks/...` leaves).
"""
import math
import numbers
import re
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict
import optax

from vitoken import settings as settings_lib
from vitoken.models import layout

OPTIMIZERS = ("adamw", "sgd", "lamb")
DECAYS = ("cosine", "linear", "constant")
DEFAULT_DECAY_REGEX = r"(^|/)kernel$"

# Top-level parameter names of vitoken's ViT, by where they sit relative to the blocks; the
# layer-wise lr decay needs this, and an unlisted name fails loudly rather than guessing.
PRE_BLOCK_NAMES = ("embedding", "cls", "registers", "pos_embedding", "norm_pre")
POST_BLOCK_NAMES = ("encoder_norm", "fc_norm", "map_head", "pre_logits", "head")
SCANNED_BLOCKS = "blocks"
_BLOCK = re.compile(r"^block_(\d+)$")


def default_optim_config() -> ml_collections.ConfigDict:
  """Optimizer settings. See `make_optimizer` for what each key does."""
  return ml_collections.ConfigDict(dict(
      name="adamw",  # "adamw" | "sgd" | "lamb"
      lr=1e-3,  # base (peak) learning rate; the schedule scales it
      b1=0.9,  # adamw/lamb first-moment decay
      b2=0.999,  # adamw/lamb second-moment decay
      eps=1e-8,  # adamw/lamb denominator epsilon
      momentum=0.9,  # sgd momentum (0 or None: plain sgd)
      nesterov=False,  # sgd: Nesterov momentum; adamw/lamb: NAdam-style first moment
      weight_decay=0.0,  # decoupled, multiplied by the lr (as optax.adamw), on decay_regex only
      decay_regex=DEFAULT_DECAY_REGEX,  # searched in '/'-joined param paths; None: all params
      # Placeholders (None, typed) so command-line overrides like `clip_grad_norm=1.0` work.
      clip_grad_norm=config_dict.placeholder(float),  # None or max global norm of raw grads
      layer_decay=config_dict.placeholder(float),  # None or in (0, 1]: BEiT-style layer lr decay
      # None, or a regex searched in '/'-joined param paths: only matching params are updated
      # (a linear probe trains "^head/"); the others stay exactly as initialised or loaded.
      trainable_regex=config_dict.placeholder(str),
      # ((regex, multiplier), ...): the lr of params whose path matches a regex (the first
      # that does) is multiplied, e.g. DynamicViT fine-tunes its backbone at 0.01x the
      # predictors' lr: ((r"(^|/)dynamicvit/", 1.0), (".*", 0.01)).
      lr_scale=(),
  ))


def default_schedule_config() -> ml_collections.ConfigDict:
  """Learning-rate schedule settings. See `make_schedule`."""
  return ml_collections.ConfigDict(dict(
      warmup_steps=0,  # linear warmup from base_lr * warmup_init_factor to base_lr
      decay="cosine",  # "cosine" | "linear" | "constant" after warmup
      end_factor=0.0,  # final lr = base_lr * end_factor (cosine/linear)
      warmup_init_factor=0.0,  # lr at step 0 = base_lr * warmup_init_factor (with warmup)
  ))


def _resolve(config, defaults: ml_collections.ConfigDict, what: str) -> Dict[str, Any]:
  """Merges `config` (ConfigDict, mapping or None) over `defaults` into a plain dict."""
  try:
    return settings_lib.resolve(config, defaults, f"{what} config")
  except TypeError as e:
    raise ValueError(str(e)) from None


def _number(cfg, key, what, rule: str, ok: Callable[[float], bool], *, allow_none=False,
            integer=False):
  """Validates cfg[key] as a finite number with ok(value) (described by `rule`); returns it."""
  value = cfg[key]
  if value is None and allow_none:
    return None
  ok_type = isinstance(value, numbers.Integral if integer else numbers.Real)
  # bool is an int subclass, and `warmup_steps=True` is a bug, not a 1.
  if isinstance(value, bool) or not ok_type or not math.isfinite(value) or not ok(value):
    kind = "an integer" if integer else "a number"
    raise ValueError(f"{what} config key {key!r} must be {kind} {rule}"
                     f"{' (or None)' if allow_none else ''}, got {value!r}")
  return int(value) if integer else float(value)


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


def make_schedule(schedule_config, base_lr: float, total_steps: int) -> optax.Schedule:
  """Returns `step -> learning rate` (jit-friendly; `step` is the optimizer step count).

  Steps [0, warmup_steps) warm up linearly from base_lr * warmup_init_factor towards base_lr
  (reaching it at step warmup_steps). Over the remaining total_steps - warmup_steps steps the
  lr then follows `decay`: "cosine" (half cosine) or "linear" from base_lr down to
  base_lr * end_factor, or "constant" (stays at base_lr; end_factor is not used). Steps past
  total_steps hold the final value.
  """
  cfg = _resolve(schedule_config, default_schedule_config(), "schedule")
  if isinstance(base_lr, bool) or not isinstance(base_lr, numbers.Real) or not (
      math.isfinite(base_lr) and base_lr >= 0):
    raise ValueError(f"base_lr must be a finite number >= 0, got {base_lr!r}")
  if (isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral)
      or total_steps < 1):
    raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
  total_steps = int(total_steps)
  warmup = _number(cfg, "warmup_steps", "schedule", ">= 0", lambda v: v >= 0, integer=True)
  if warmup > total_steps:
    raise ValueError(f"schedule config key 'warmup_steps' ({warmup}) must be <= total_steps "
                     f"({total_steps})")
  decay = cfg["decay"]
  if decay not in DECAYS:
    raise ValueError(f"schedule config key 'decay' must be one of {DECAYS}, got {decay!r}")
  end_factor = _number(cfg, "end_factor", "schedule", ">= 0", lambda v: v >= 0)
  init_factor = _number(cfg, "warmup_init_factor", "schedule", ">= 0", lambda v: v >= 0)

  base_lr = float(base_lr)
  # warmup_steps == total_steps leaves no step after warmup; max() keeps optax's decay length
  # positive there (the lr then reaches its end value one step past total_steps).
  decay_steps = max(total_steps - warmup, 1)
  if decay == "cosine":
    after = optax.cosine_decay_schedule(base_lr, decay_steps, alpha=end_factor)
  elif decay == "linear":
    after = optax.linear_schedule(base_lr, base_lr * end_factor, decay_steps)
  else:
    after = optax.constant_schedule(base_lr)
  if warmup > 0:
    after = optax.join_schedules(
        [optax.linear_schedule(base_lr * init_factor, base_lr, warmup), after], [warmup])

  def schedule(step):
    return jnp.asarray(after(jnp.asarray(step, jnp.float32)), jnp.float32)

  return schedule


# ---------------------------------------------------------------------------------------------
# Parameter paths, weight-decay mask, layer-wise lr decay
# ---------------------------------------------------------------------------------------------


def _shape(x) -> Tuple[int, ...]:
  # .shape first: params may be abstract (jax.ShapeDtypeStruct from jax.eval_shape).
  return tuple(x.shape) if hasattr(x, "shape") else jnp.shape(x)


def _map_with_names(fn: Callable[[str, Any], Any], tree):
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(layout.path_str(p), x), tree)


def _compile_regex(regex, key: str = "decay_regex"):
  if regex is None:
    return None
  if not isinstance(regex, str):
    raise ValueError(f"optim config key {key!r} must be a string or None, got {regex!r}")
  try:
    return re.compile(regex)
  except re.error as e:
    raise ValueError(f"optim config key {key!r} is not a valid regex ({regex!r}): {e}") from e


def trainable_mask(params, trainable_regex: Optional[str]):
  """Tree of bools: True for the params the optimizer updates (all when the regex is None)."""
  pattern = _compile_regex(trainable_regex, "trainable_regex")
  if pattern is None:
    return jax.tree.map(lambda _: True, params)
  return _map_with_names(lambda name, _: pattern.search(name) is not None, params)


def freeze_untrainable(trainable_regex: str) -> optax.GradientTransformation:
  """Zeroes the updates of params outside `trainable_regex` (after every other transform, so
  neither weight decay nor momentum moves them)."""
  def update_fn(updates, state, params=None):
    del params
    keep = trainable_mask(updates, trainable_regex)
    return jax.tree.map(lambda u, k: u if k else jnp.zeros_like(u), updates, keep), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def weight_decay_mask(params, decay_regex: Optional[str] = DEFAULT_DECAY_REGEX):
  """Tree of bools: True where `decay_regex` matches (re.search) the leaf's path.

  The default matches Dense/Conv `kernel`s only, so biases, LayerNorm scales, layer-scale
  gammas, pos_embedding, cls, registers and the MAP probe are not decayed. None: all leaves.
  """
  pattern = _compile_regex(decay_regex)
  if pattern is None:
    return jax.tree.map(lambda _: True, params)
  return _map_with_names(lambda name, _: pattern.search(name) is not None, params)


def infer_depth(params) -> Optional[int]:
  """Number of encoder blocks in a ViT param tree (either layout); None if it has none."""
  names = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if path:
      names.setdefault(layout.key_name(path[0]), []).append(leaf)
  blocks = sorted(int(m.group(1)) for k in names if (m := _BLOCK.match(k)))
  if blocks and SCANNED_BLOCKS in names:
    raise ValueError(f"params have both block_NN subtrees and a scanned {SCANNED_BLOCKS!r} "
                     "subtree; expected one layout")
  if blocks:
    if blocks != list(range(len(blocks))):
      raise ValueError(f"block indices are not contiguous from 0: {blocks}")
    return len(blocks)
  if SCANNED_BLOCKS in names:
    sizes = {_shape(x)[0] if _shape(x) else None for x in names[SCANNED_BLOCKS]}
    if len(sizes) != 1 or None in sizes:
      raise ValueError(f"leaves of the scanned {SCANNED_BLOCKS!r} subtree must share a leading "
                       f"layer axis, got leading sizes {sorted(sizes, key=str)}")
    return sizes.pop()
  return None


def _groups(groups: Optional[Mapping[str, str]]) -> Dict[str, str]:
  """{top-level name: "stem" | "head"}: the ViT's own names plus what a model/task declares."""
  out = {**{n: "stem" for n in PRE_BLOCK_NAMES}, **{n: "head" for n in POST_BLOCK_NAMES}}
  for name, group in (groups or {}).items():
    if group not in ("stem", "head"):
      raise ValueError(f"layer_decay group of {name!r} must be 'stem' or 'head', got {group!r}")
    out[name] = group
  return out


def _layer_multiplier(name: str, leaf, layer_decay: float, depth: int,
                      groups: Optional[Mapping[str, str]] = None):
  """BEiT/MAE multiplier layer_decay ** (depth + 1 - layer_id) for the leaf called `name`."""
  top = name.split("/", 1)[0]
  groups = _groups(groups)
  if groups.get(top) == "stem":
    return layer_decay ** (depth + 1)
  if groups.get(top) == "head":
    return 1.0
  if m := _BLOCK.match(top):
    i = int(m.group(1))
    if i >= depth:
      raise ValueError(f"parameter {name!r} belongs to block {i}, but depth is {depth}")
    return layer_decay ** (depth - i)
  if top == SCANNED_BLOCKS:
    shape = _shape(leaf)
    ndim = len(shape)
    if ndim == 0 or shape[0] != depth:
      raise ValueError(f"scanned parameter {name!r} has shape {shape}; expected a "
                       f"leading layer axis of size depth={depth}")
    # Slice i is block i (layer_id i + 1); shaped to broadcast against the leaf.
    factors = [layer_decay ** (depth - i) for i in range(depth)]
    return jnp.asarray(factors, jnp.float32).reshape((depth,) + (1,) * (ndim - 1))
  raise ValueError(
      f"layer_decay: cannot place parameter {name!r} (top-level name {top!r}) in a layer; "
      f"known names are {sorted(k for k, g in groups.items() if g == 'stem')} (before the "
      f"blocks), block_NN / {SCANNED_BLOCKS!r} and "
      f"{sorted(k for k, g in groups.items() if g == 'head')} (after the blocks). A reducer "
      "declares its group with `layer_decay_group`, a task with `layer_decay_groups()`")


def _check_layer_decay(layer_decay):
  if isinstance(layer_decay, bool) or not isinstance(layer_decay, numbers.Real) or not (
      0.0 < layer_decay <= 1.0):
    raise ValueError(f"optim config key 'layer_decay' must be None or a number in (0, 1], "
                     f"got {layer_decay!r}")
  return float(layer_decay)


def _resolve_depth(params, depth: Optional[int]) -> int:
  inferred = infer_depth(params)
  if depth is None:
    if inferred is None:
      raise ValueError("layer_decay: cannot infer the depth, the params have no block_NN or "
                       f"{SCANNED_BLOCKS!r} subtree; pass depth=")
    return inferred
  if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < 1:
    raise ValueError(f"depth must be a positive integer, got {depth!r}")
  depth = int(depth)
  if inferred is not None and inferred != depth:
    raise ValueError(f"depth={depth} was given, but the params have {inferred} blocks")
  return depth


def layer_decay_multipliers(params, layer_decay: float, depth: Optional[int] = None,
                            groups: Optional[Mapping[str, str]] = None):
  """Per-leaf lr multipliers layer_decay ** (depth + 1 - layer_id) (BEiT/MAE convention).

  layer_id is 0 for the stem (embedding, cls, registers, pos_embedding, norm_pre), i + 1 for
  block i and depth + 1 for everything after the blocks (encoder_norm, fc_norm, map_head,
  pre_logits, head). `groups` ({top-level name: "stem" | "head"}) places further top-level
  parameters (a reducer's or task's). Leaves of a scanned `blocks` subtree get an array
  [depth, 1, ...] with one factor per layer slice; other leaves get a Python float.
  """
  layer_decay = _check_layer_decay(layer_decay)
  depth = _resolve_depth(params, depth)
  return _map_with_names(lambda n, x: _layer_multiplier(n, x, layer_decay, depth, groups), params)


def scale_by_layer_decay(layer_decay: float, depth: int,
                         groups: Optional[Mapping[str, str]] = None) -> optax.GradientTransformation:
  """Multiplies each update by its layer-wise lr multiplier (see `layer_decay_multipliers`).

  The multipliers are recomputed from the update tree's paths (at trace time, so no state):
  that keeps them in step with whatever container type (dict, FrozenDict) the trainer uses.
  """
  layer_decay = _check_layer_decay(layer_decay)

  def scale(name, u):
    m = _layer_multiplier(name, u, layer_decay, depth, groups)
    return u * (jnp.asarray(m, u.dtype) if isinstance(m, jax.Array) else m)

  def update_fn(updates, state, params=None):
    del params
    return _map_with_names(scale, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _check_lr_scale(rules):
  rules = settings_lib.plain(rules) or ()
  if not isinstance(rules, (list, tuple)):
    raise ValueError(f"optim config key 'lr_scale' must be ((regex, multiplier), ...), got {rules!r}")
  compiled = []
  for rule in rules:
    if not isinstance(rule, (list, tuple)) or len(rule) != 2:
      raise ValueError(f"optim config key 'lr_scale': each rule is (regex, multiplier), got {rule!r}")
    regex, mult = rule
    if isinstance(mult, bool) or not isinstance(mult, (int, float)) or mult < 0:
      raise ValueError(f"optim config key 'lr_scale': multiplier for {regex!r} must be >= 0, "
                       f"got {mult!r}")
    compiled.append((_compile_regex(regex, "lr_scale"), float(mult)))
  return compiled


def scale_by_lr_rules(rules) -> optax.GradientTransformation:
  """Multiplies each update by its `lr_scale` multiplier (recomputed from the update tree's
  paths at trace time, as `scale_by_layer_decay`)."""
  compiled = _check_lr_scale(rules)

  def update_fn(updates, state, params=None):
    del params
    first = lambda name: next((m for pattern, m in compiled if pattern.search(name)), 1.0)
    return _map_with_names(lambda name, u: u * first(name), updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_trust_ratio_per_layer() -> optax.GradientTransformation:
  """optax.scale_by_trust_ratio (LAMB), but per layer slice for scanned `blocks` leaves.

  A scanned leaf stacks `depth` separate parameters; one norm over the stack would couple the
  layers and break scanned == unscanned. Every other leaf uses one norm, exactly as optax.
  """

  def ratio(update, param, axis):
    # Matches optax (min_norm=0, trust_coefficient=1, eps=0): ratio 1 where a norm is 0.
    p_norm = jnp.sqrt(jnp.sum(jnp.square(param), axis=axis, keepdims=True))
    u_norm = jnp.sqrt(jnp.sum(jnp.square(update), axis=axis, keepdims=True))
    zero = jnp.logical_or(p_norm == 0.0, u_norm == 0.0)
    safe = jnp.where(zero, jnp.ones_like(u_norm), u_norm)
    return update * jnp.where(zero, jnp.array(1.0, param.dtype), p_norm / safe)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("the LAMB trust ratio needs params: call update(updates, state, params)")

    def scale(path, u, p):
      scanned = layout.path_str(path).split("/", 1)[0] == SCANNED_BLOCKS and jnp.ndim(u) >= 1
      return ratio(u, p, tuple(range(1, jnp.ndim(u))) if scanned else None)

    return jax.tree_util.tree_map_with_path(scale, updates, params), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


# ---------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------


def make_optimizer(optim_config, schedule_config, params, total_steps: int, *,
                   depth: Optional[int] = None, groups: Optional[Mapping[str, str]] = None
                   ) -> Tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds (optax transformation, lr schedule) from the two configs.

  Optimizers (`name`):
    adamw: optax.adamw(schedule, b1, b2, eps, weight_decay, mask) plus the extras below.
    lamb:  optax.lamb(schedule, b1, b2, eps, weight_decay, mask); the trust ratio is taken per
           layer slice for scanned `blocks` leaves.
    sgd:   optax.sgd(schedule, momentum, nesterov) with *decoupled* weight decay (SGDW,
           Loshchilov & Hutter): wd * param is added after the momentum, before the lr, so
           the step is -lr * (momentum_buffer + wd * param). It is not L2 (it never enters the
           momentum buffer), and, as in optax.adamw, the decay is scaled by the scheduled lr.
  Weight decay applies only where `decay_regex` matches (re.search) the leaf's '/'-joined
  path (None: every leaf). `nesterov` is Nesterov momentum for sgd and the NAdam-style first
  moment of optax.scale_by_adam for adamw/lamb.

  Extras, in chain order:
    clip_grad_norm: global-norm clipping of the raw gradients, before anything else.
    layer_decay:    updates (after adaptive scaling, weight decay and the LAMB trust ratio,
                    which would otherwise cancel it) are multiplied by
                    layer_decay ** (depth + 1 - layer_id), before the lr; `depth` is inferred
                    from `params` unless given.
    lr_scale:       ((regex, multiplier), ...): updates are multiplied by the first matching
                    rule's multiplier (1 where none matches), before the lr.
    trainable_regex: updates of params whose path it does not match are zeroed last.

  `params` is only read for its structure (weight-decay mask check, depth), so abstract
  params (jax.eval_shape) do; the transformation then works on that tree's layout.
  """
  cfg = _resolve(optim_config, default_optim_config(), "optim")
  name = cfg["name"]
  if name not in OPTIMIZERS:
    raise ValueError(f"optim config key 'name' must be one of {OPTIMIZERS}, got {name!r}")
  lr = _number(cfg, "lr", "optim", ">= 0", lambda v: v >= 0)
  b1 = _number(cfg, "b1", "optim", "in [0, 1)", lambda v: 0 <= v < 1)
  b2 = _number(cfg, "b2", "optim", "in [0, 1)", lambda v: 0 <= v < 1)
  eps = _number(cfg, "eps", "optim", ">= 0", lambda v: v >= 0)
  momentum = _number(cfg, "momentum", "optim", "in [0, 1)", lambda v: 0 <= v < 1,
                     allow_none=True)
  if not isinstance(cfg["nesterov"], bool):
    raise ValueError(f"optim config key 'nesterov' must be a bool, got {cfg['nesterov']!r}")
  nesterov = cfg["nesterov"]
  weight_decay = _number(cfg, "weight_decay", "optim", ">= 0", lambda v: v >= 0)
  clip = _number(cfg, "clip_grad_norm", "optim", "> 0", lambda v: v > 0, allow_none=True)
  layer_decay = cfg["layer_decay"]
  if layer_decay is not None:
    layer_decay = _check_layer_decay(layer_decay)
  decay_regex = cfg["decay_regex"]
  pattern = _compile_regex(decay_regex)
  if weight_decay > 0 and pattern is not None:
    if not any(jax.tree.leaves(weight_decay_mask(params, decay_regex))):
      raise ValueError(f"optim config key 'decay_regex' ({decay_regex!r}) matches no parameter, "
                       f"so weight_decay={weight_decay} would do nothing")

  trainable = cfg["trainable_regex"]
  if trainable is not None and not any(jax.tree.leaves(trainable_mask(params, trainable))):
    raise ValueError(f"optim config key 'trainable_regex' ({trainable!r}) matches no parameter, "
                     "so nothing would train")

  schedule = make_schedule(schedule_config, lr, total_steps)

  if weight_decay > 0:
    decay = [optax.add_decayed_weights(
        weight_decay, mask=lambda tree: weight_decay_mask(tree, decay_regex))]
  else:
    decay = []

  chain = []
  if clip is not None:
    chain.append(optax.clip_by_global_norm(clip))
  if name == "adamw":
    chain += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps, nesterov=nesterov), *decay]
  elif name == "lamb":
    chain += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps, nesterov=nesterov), *decay,
              scale_by_trust_ratio_per_layer()]
  else:  # sgd
    if momentum:
      chain.append(optax.trace(decay=momentum, nesterov=nesterov))
    chain += decay
  if layer_decay is not None:
    # Validates the tree now (unknown top-level names, depth) rather than at the first step.
    layer_decay_multipliers(params, layer_decay, depth, groups)
    chain.append(scale_by_layer_decay(layer_decay, _resolve_depth(params, depth), groups))
  lr_rules = _check_lr_scale(cfg["lr_scale"])
  if lr_rules:
    for pattern, _ in lr_rules:
      if not any(jax.tree.leaves(_map_with_names(lambda n, _, p=pattern: bool(p.search(n)), params))):
        raise ValueError(f"optim config key 'lr_scale': regex {pattern.pattern!r} matches no "
                         "parameter")
    chain.append(scale_by_lr_rules(cfg["lr_scale"]))
  if trainable is not None:
    chain.append(freeze_untrainable(trainable))
  chain.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*chain), schedule
