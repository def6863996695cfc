"""Parameter groups, by path: what trains, what decays, which layer a parameter sits in.

Paths are the '/'-joined flax names (`block_00/attn/qkv/kernel`). Both ViT layouts are
supported: unscanned (`block_NN/...`) and scanned (`blocks/...`, every leaf stacked on a
leading layer axis). Which top-level names sit before or after the blocks is the model's
knowledge: it arrives as `groups` (`VisionTransformer.layer_decay_groups()`, which adds what
the reducers declare), defaulting to the plain ViT's `vit.LAYER_DECAY_GROUPS`.
"""
import numbers
import re
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from vitoken import settings as settings_lib
from vitoken.engine.optim.config import DEFAULT_DECAY_REGEX, compile_regex
from vitoken.models import layout, vit

SCANNED_BLOCKS = "blocks"
_BLOCK = re.compile(r"^block_(\d+)$")


def _shape(x) -> Tuple[int, ...]:
  # .shape first: params may be abstract (jax.ShapeDtypeStruct from jax.eval_shape).
  return tuple(x.shape) if hasattr(x, "shape") else jnp.shape(x)


def map_with_names(fn: Callable[[str, Any], Any], tree):
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(layout.path_str(p), x), tree)

def trainable_mask(params, trainable_regex: Optional[str]):
  """Tree of bools: True for the params the optimizer updates (all when the regex is None)."""
  pattern = compile_regex(trainable_regex, "trainable_regex")
  if pattern is None:
    return jax.tree.map(lambda _: True, params)
  return map_with_names(lambda name, _: pattern.search(name) is not None, params)

def weight_decay_mask(params, decay_regex: Optional[str] = DEFAULT_DECAY_REGEX):
  """Tree of bools: True where `decay_regex` matches (re.search) the leaf's path.

  The default matches Dense/Conv `kernel`s only, so biases, LayerNorm scales, layer-scale
  gammas, pos_embedding, cls, registers and the MAP probe are not decayed. None: all leaves.
  """
  pattern = compile_regex(decay_regex)
  if pattern is None:
    return jax.tree.map(lambda _: True, params)
  return map_with_names(lambda name, _: pattern.search(name) is not None, params)


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
  """{top-level name: "stem" | "head"}, as the model (with its reducers and task) declares
  them; None: the plain ViT's (`vit.LAYER_DECAY_GROUPS`)."""
  out = {}
  for name, group in (vit.LAYER_DECAY_GROUPS if groups is None else groups).items():
    if group not in ("stem", "head"):
      raise ValueError(f"layer_decay group of {name!r} must be 'stem' or 'head', got {group!r}")
    out[name] = group
  return out


def layer_multiplier(name: str, leaf, layer_decay: float, depth: int,
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


def check_layer_decay(layer_decay):
  if isinstance(layer_decay, bool) or not isinstance(layer_decay, numbers.Real) or not (
      0.0 < layer_decay <= 1.0):
    raise ValueError(f"optim config key 'layer_decay' must be None or a number in (0, 1], "
                     f"got {layer_decay!r}")
  return float(layer_decay)


def resolve_depth(params, depth: Optional[int]) -> int:
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
  layer_decay = check_layer_decay(layer_decay)
  depth = resolve_depth(params, depth)
  return map_with_names(lambda n, x: layer_multiplier(n, x, layer_decay, depth, groups), params)

def check_lr_scale(rules):
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
    compiled.append((compile_regex(regex, "lr_scale"), float(mult)))
  return compiled


def lr_scale_labels(params, rules) -> Any:
  """Tree of labels "lr_scale_<i>" (the first `lr_scale` rule that matches the leaf's path) or
  "lr_scale_none"."""
  compiled = check_lr_scale(rules)
  def label(name, _):
    return next((f"lr_scale_{i}" for i, (pattern, _) in enumerate(compiled)
                 if pattern.search(name)), "lr_scale_none")
  return map_with_names(label, params)
