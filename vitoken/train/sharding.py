"""Device meshes, regex partitioning rules, and creating train state already sharded.

One rule set covers the whole train state: a rule matches the end of a leaf's path, so
`attn/qkv/kernel` also places the optimizer moments `opt_state/0/mu/block_03/attn/qkv/kernel`
and the EMA copy. Leaves under a scanned `blocks/` subtree get an unsharded layer axis first.
"""
import logging
import math
import re
from typing import Any, Callable, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vitoken.models import layout

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # FSDP is data parallel with sharded params: both split the batch

# (regex searched in the '/'-joined leaf path, partition spec of the unscanned leaf)
VIT_RULES: Tuple[Tuple[str, Tuple], ...] = (
    (r"attn/qkv/kernel$", ("fsdp", None, "tensor", None)),  # [C, 3, H, D]
    (r"attn/qkv/bias$", (None, "tensor", None)),
    (r"attn/out/kernel$", ("tensor", None, "fsdp")),  # [H, D, C]
    (r"map_head/q/kernel$", ("fsdp", "tensor", None)),  # [C, H, D]
    (r"map_head/kv/kernel$", ("fsdp", None, "tensor", None)),
    (r"map_head/out/kernel$", ("tensor", None, "fsdp")),
    (r"mlp/fc1/kernel$", ("fsdp", "tensor")),
    (r"mlp/fc1/bias$", ("tensor",)),
    (r"mlp/fc2/kernel$", ("tensor", "fsdp")),
    (r"head/kernel$", ("fsdp", None)),
    (r"embedding/kernel$", (None, None, None, "fsdp")),
    (r".*", ()),  # everything else replicated
)


def combined_rules(*extra) -> Tuple[Tuple[str, Tuple], ...]:
  """Rule sets in priority order (a config's, a task's, its reducers'), then the ViT's own.

  Each rule is (regex, spec); specs are checked to name mesh axes only.
  """
  rules = []
  for group in extra:
    for rule in group or ():
      if len(rule) != 2 or not isinstance(rule[0], str):
        raise ValueError(f"a sharding rule is (regex, partition spec), got {rule!r}")
      pattern, spec = rule[0], tuple(rule[1] or ())
      bad = [a for a in spec if a is not None and a not in AXES]
      if bad:
        raise ValueError(f"sharding rule {pattern!r} names unknown mesh axes {bad}; the axes are {AXES}")
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"sharding rule {pattern!r} is not a valid regex: {e}") from None
      rules.append((pattern, spec))
  return tuple(rules) + VIT_RULES


def make_mesh(mesh_config, devices: Sequence[jax.Device] = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = [int(mesh_config.get(a, 1)) for a in AXES]
  unknown = sorted(set(mesh_config) - set(AXES))
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}; the mesh axes are {AXES}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh {dict(zip(AXES, shape))}: sizes must be positive, at most one -1")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if len(devices) % known:
      raise ValueError(f"mesh {dict(zip(AXES, shape))} does not fit {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) > len(devices) or len(devices) % math.prod(shape):
    raise ValueError(f"mesh {dict(zip(AXES, shape))} needs {math.prod(shape)} devices, "
                     f"there are {len(devices)}")
  if math.prod(shape) < len(devices):
    if jax.process_count() > 1:
      raise ValueError(f"mesh {dict(zip(AXES, shape))} leaves devices of a multi-host run idle")
    devices = devices[:math.prod(shape)]
  grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def spec_for(path: str, shape: Tuple[int, ...], mesh: Mesh, rules=VIT_RULES) -> P:
  """The first matching rule's spec, fitted to the leaf (layer axis, divisibility)."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      break
  else:
    spec = ()
  spec = tuple(spec)
  if re.search(r"(^|/)blocks/", path) and len(shape) == len(spec) + 1:
    spec = (None,) + spec  # scanned layer axis stays whole
  if len(spec) > len(shape):
    spec = ()  # a rule for a different-rank leaf (e.g. a factored optimizer moment)
  fitted = []
  for dim, axis in zip(shape, spec + (None,) * (len(shape) - len(spec))):
    size = 1 if axis is None else mesh.shape[axis]
    if dim % size:
      logging.info("sharding: %s dim %d (size %d) not divisible by mesh axis %s=%d; replicated",
                   path, len(fitted), dim, axis, size)
      axis = None
    fitted.append(axis if size > 1 else None)
  return P(*fitted)


def tree_shardings(abstract_tree, mesh: Mesh, rules=VIT_RULES):
  """NamedShardings for every leaf of an (abstract) pytree, by path."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, spec_for(layout.path_str(path), tuple(leaf.shape), mesh, rules)),
      abstract_tree)


def init_sharded(init_fn: Callable[[], Any], mesh: Mesh, rules=VIT_RULES):
  """Creates the tree `init_fn()` returns directly in its sharded layout (never whole on one device)."""
  abstract = jax.eval_shape(init_fn)
  shardings = tree_shardings(abstract, mesh, rules)
  return jax.jit(init_fn, out_shardings=shardings)(), shardings


def global_batch(local_batch, sharding: NamedSharding):
  """Assembles each process's slice into one global array sharded along the batch axis."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)
