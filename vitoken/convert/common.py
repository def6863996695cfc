"""What every weight importer shares: checking converted params against the model they feed."""
from typing import Any, Dict, Tuple, Union

from absl import logging
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from vitoken.models import layout, vit
from vitoken.settings import pair  # noqa: F401  (the converters' `common.pair`)

ImageSize = Union[int, Tuple[int, int]]


def build_model(inferred: Dict[str, Any], overrides: Dict[str, Any]) -> vit.VisionTransformer:
  """The checkpoint decides the architecture; overrides change how it runs (dtype, reducers...)."""
  check_overrides(inferred, overrides)
  fields = {**inferred, **overrides}
  return vit.Model(fields.pop("num_classes"), **fields)


def check_overrides(inferred: Dict[str, Any], overrides: Dict[str, Any]):
  """Overrides may not change the sizes the weights fix."""
  architecture = {"width", "depth", "mlp_dim", "patch_size", "channels"}
  clash = sorted(k for k in architecture & set(overrides) if overrides[k] != inferred.get(k))
  if clash:
    raise ValueError(f"override(s) {clash} contradict the checkpoint: "
                     + ", ".join(f"{k}={inferred.get(k)!r} in the weights" for k in clash))


def finalize(module: vit.VisionTransformer, params: Dict[str, Any], image_size: Tuple[int, int]):
  """Checks every name and shape against the model's own init, then lays params out for it."""
  params = {k: np.asarray(v, np.float32) for k, v in params.items()}
  tree = traverse_util.unflatten_dict(params, sep="/")
  if module.scan:
    tree = layout.to_scanned(tree)
  images = jax.ShapeDtypeStruct((1, *image_size, module.channels), jnp.float32)
  expected = jax.eval_shape(module.init, jax.random.key(0), images)["params"]
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(expected, sep="/").items()}
  have = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}
  # Learned token reducers (TokenLearner, LookupViT's cross-attention) have no weights in a
  # dense checkpoint: they start from their initialisers, so fine-tuning is expected.
  fresh = sorted(k for k in set(want) - set(have) if k.startswith(reducer_scopes(module)))
  if fresh:
    init = jax.jit(module.init)(jax.random.key(0), jnp.zeros(images.shape, images.dtype))["params"]
    init = traverse_util.flatten_dict(init, sep="/")
    tree = traverse_util.flatten_dict(tree, sep="/")
    tree.update({k: np.asarray(init[k], np.float32) for k in fresh})
    logging.info("token reducer parameters not in the checkpoint start from their "
                 "initialisers: %s", ", ".join(fresh))
    have.update({k: want[k] for k in fresh})
    tree = traverse_util.unflatten_dict(tree, sep="/")
  check_shapes(want, have)
  dtype = module.param_dtype
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def check_shapes(want: Dict[str, Tuple[int, ...]], have: Dict[str, Tuple[int, ...]]):
  """Every param path and shape of the model's init ({path: shape}) against the converted."""
  problems = [f"missing {k} {want[k]}" for k in sorted(set(want) - set(have))]
  problems += [f"unexpected {k} {have[k]}" for k in sorted(set(have) - set(want))]
  problems += [f"{k}: checkpoint {have[k]} vs model {want[k]}"
               for k in sorted(set(want) & set(have)) if want[k] != have[k]]
  if problems:
    raise ValueError("checkpoint does not match the model:\n  " + "\n  ".join(problems))


def reducer_scopes(module: vit.VisionTransformer) -> Tuple[str, ...]:
  """Parameter path prefixes owned by the configured token reducers."""
  plan = module.plan()
  scopes = {f"{p.name}/" for p in plan.embed}
  for i, entries in enumerate(plan.per_layer):
    block = "blocks" if module.scan else f"block_{i:02d}"
    scopes.update(f"{block}/{p.name}/" for p in entries)
  return tuple(sorted(scopes))


def grid_from_posemb(length: int, num_prefix: int, image_size=None, patch=None):
  """(grid, has_prefix_positions) for a learned position embedding of `length` entries."""
  if image_size is not None and patch is not None:
    grid = (image_size[0] // patch[0], image_size[1] // patch[1])
    n = grid[0] * grid[1]
    if length in (n, n + num_prefix):
      return grid, length == n + num_prefix and num_prefix > 0
  for prefix in ((num_prefix, 0) if num_prefix else (0,)):
    side = int(round(np.sqrt(length - prefix)))
    if side * side == length - prefix:
      return (side, side), prefix > 0
  raise ValueError(f"cannot infer the patch grid from a position embedding of length {length} "
                   f"with {num_prefix} prefix tokens; pass image_size=")
