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
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from vitoken import settings as settings_lib
from vitoken.models import layout

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # FSDP is data parallel with sharded params: both split the batch

# Rules are (regex searched in the '/'-joined leaf path, partition spec of the unscanned leaf).
# The models declare theirs (`vit.SHARDING_RULES`, a reducer's `sharding_rules`); a leaf no
# rule matches is replicated.


def combined_rules(*extra) -> Tuple[Tuple[str, Tuple], ...]:
  """Rule sets in priority order (a config's, then the task's: its reducers', its model's).

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
  return tuple(rules)


MESH_KEYS = AXES + ("slices",)


def _resolve_shape(shape, num_devices: int, what: str):
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh {what}: sizes must be positive, at most one -1")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if num_devices % known:
      raise ValueError(f"mesh {what} does not fit {num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  return shape


def num_slices(devices) -> int:
  """Multi-slice TPU jobs give devices a slice_index; everything else is one slice."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def device_grid(mesh_config, devices: Sequence[Any]) -> np.ndarray:
  """Devices arranged as a (data, fsdp, tensor) array by jax's topology-aware helpers.

  `slices` (default 1; -1 = every slice of a multi-slice job) adds data parallelism across
  slices: the data axis is then slices x data, with each slice's devices laid out by the
  interconnect and only the data axis crossing the slower network between slices.
  """
  settings_lib.check_keys(mesh_config, MESH_KEYS, "mesh config")
  shape = [int(mesh_config.get(a, 1)) for a in AXES]
  slices = int(mesh_config.get("slices", 1))
  have = num_slices(devices)
  if slices == -1:
    slices = have
  if slices < 1:
    raise ValueError(f"mesh slices must be a positive count or -1, got {slices}")
  if slices > 1:
    if slices != have:
      raise ValueError(f"mesh slices={slices} but the devices form {have} slice(s)")
    per_slice = len(devices) // slices
    shape = _resolve_shape(shape, per_slice, f"{dict(zip(AXES, shape))} per slice")
    if math.prod(shape) != per_slice:
      raise ValueError(f"mesh {dict(zip(AXES, shape))} per slice needs {math.prod(shape)} "
                       f"devices, each slice has {per_slice}")
    return mesh_utils.create_hybrid_device_mesh(shape, (slices, 1, 1), devices)
  shape = _resolve_shape(shape, len(devices), str(dict(zip(AXES, shape))))
  if math.prod(shape) > len(devices) or len(devices) % math.prod(shape):
    raise ValueError(f"mesh {dict(zip(AXES, shape))} needs {math.prod(shape)} devices, "
                     f"there are {len(devices)}")
  if math.prod(shape) < len(devices):
    if jax.process_count() > 1:
      raise ValueError(f"mesh {dict(zip(AXES, shape))} leaves devices of a multi-host run idle")
    devices = devices[:math.prod(shape)]
  try:
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    # A device subset or shape the topology helper cannot place (e.g. part of a TPU slice).
    return np.asarray(devices, dtype=object).reshape(shape)


def make_mesh(mesh_config, devices: Sequence[jax.Device] = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  grid = device_grid(settings_lib.as_dict(mesh_config, "mesh config"), devices)
  return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def data_shard(sharding: NamedSharding, global_batch_size: int) -> Tuple[int, int]:
  """(index, count) of the input shard this process feeds: processes holding the same batch
  rows (replicas across a model-parallel axis) get the same index, so they read identical
  data; a mesh whose processes hold overlapping but different rows is refused."""
  rows = set()
  for (index,) in (i[:1] for i in sharding.addressable_devices_indices_map((global_batch_size,)).values()):
    rows.add((index.start or 0, global_batch_size if index.stop is None else index.stop))
  lo, hi = min(r[0] for r in rows), max(r[1] for r in rows)
  if sum(b - a for a, b in rows) != hi - lo:
    raise ValueError(f"process {jax.process_index()} holds batch rows {sorted(rows)}, not one "
                     "contiguous block: put the data/fsdp axes over processes in order")
  blocks = [(lo, hi)]
  if jax.process_count() > 1:
    gathered = multihost_utils.process_allgather(np.asarray([lo, hi], np.int64))
    blocks = sorted({(int(a), int(b)) for a, b in np.asarray(gathered).reshape(-1, 2)})
  sizes = {b - a for a, b in blocks}
  tiles = all(blocks[i][1] == blocks[i + 1][0] for i in range(len(blocks) - 1))
  if len(sizes) != 1 or not tiles or blocks[0][0] != 0 or blocks[-1][1] != global_batch_size:
    raise ValueError(f"the mesh gives processes overlapping batch rows {blocks}: processes that "
                     "share rows must hold exactly the same ones; change the mesh")
  return blocks.index((lo, hi)), len(blocks)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def spec_for(path: str, shape: Tuple[int, ...], mesh: Mesh, rules=()) -> P:
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


def tree_shardings(abstract_tree, mesh: Mesh, rules=()):
  """NamedShardings for every leaf of an (abstract) pytree, by path."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, spec_for(layout.path_str(path), tuple(leaf.shape), mesh, rules)),
      abstract_tree)


def init_sharded(init_fn: Callable[[], Any], mesh: Mesh, rules=()):
  """Creates the tree `init_fn()` returns directly in its sharded layout (never whole on one device)."""
  abstract = jax.eval_shape(init_fn)
  shardings = tree_shardings(abstract, mesh, rules)
  return jax.jit(init_fn, out_shardings=shardings)(), shardings


def global_batch(local_batch, sharding: NamedSharding, global_batch_size: int = None):
  """Assembles each process's rows into one global array sharded along the batch axis
  (`global_batch_size` makes replicated rows across processes unambiguous)."""
  def make(x):
    x = np.asarray(x)
    shape = None if global_batch_size is None else (global_batch_size,) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, shape)
  return jax.tree.map(make, local_batch)
