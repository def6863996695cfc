"""Update transformations optax lacks: layer-wise lr decay and LAMB's trust ratio per layer
slice of a scanned stack; freezing and per-parameter lr multipliers as optax compositions."""
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from vitoken.engine.optim.param_groups import (
  SCANNED_BLOCKS,
  check_layer_decay,
  check_lr_scale,
  layer_multiplier,
  lr_scale_labels,
  map_with_names,
  trainable_mask,
)
from vitoken.models import layout


def scale_by_layer_decay(layer_decay: float, depth: int,
                         groups: Optional[Mapping[str, str]] = None) -> optax.GradientTransformation:
  """Multiplies each update by its layer-wise lr multiplier (see `layer_decay_multipliers`).

  The multipliers are recomputed from the update tree's paths (at trace time, so no state):
  that keeps them in step with whatever container type (dict, FrozenDict) the trainer uses.
  """
  layer_decay = check_layer_decay(layer_decay)

  def scale(name, u):
    m = layer_multiplier(name, u, layer_decay, depth, groups)
    return u * (jnp.asarray(m, u.dtype) if isinstance(m, jax.Array) else m)

  def update_fn(updates, state, params=None):
    del params
    return map_with_names(scale, updates), state

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


def scale_by_lr_rules(rules) -> optax.GradientTransformation:
  """Multiplies each update by the multiplier of the first `lr_scale` rule its path matches
  (1 where none does): one `optax.scale` per rule, composed with `optax.multi_transform`."""
  compiled = check_lr_scale(rules)
  transforms = {f"lr_scale_{i}": optax.scale(m) for i, (_, m) in enumerate(compiled)}
  transforms["lr_scale_none"] = optax.identity()
  return optax.multi_transform(transforms, lambda params: lr_scale_labels(params, rules))


def train_only(inner: optax.GradientTransformation,
               trainable_regex: str) -> optax.GradientTransformation:
  """`inner` on the params `trainable_regex` matches; the others get zero updates and carry
  no optimizer state (a frozen ViT-B encoder costs no Adam moments)."""
  def labels(params):
    return jax.tree.map(lambda t: "train" if t else "frozen", trainable_mask(params, trainable_regex))
  return optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()}, labels)
