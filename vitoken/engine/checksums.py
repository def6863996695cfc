"""Per-array checksums of a checkpoint's state, written beside it and checked on restore.

A flipped byte in a compressed chunk can decode to a different but valid number (a kernel
entry of 1.8e34), which no reader notices; the checksum of the restored values does. The sum
is over the arrays' bits in integer arithmetic that wraps, so it is exact in any order: the
same for a state sharded over 8 devices when saved and over 1 when restored, computed on the
devices that hold the shards (no gather).

Each element's 32-bit word (16- and 8-bit types widened; 64-bit ones as two words) is mixed
with its row-major position so that swapped or shifted values change the sum, then two sums
of differently mixed words make a 64-bit digest.
"""
from typing import Any, Dict, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vitoken.models import layout

_GOLDEN, _M1, _M2 = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35


def _mix(xp, words, index):
  a = (words ^ (index * xp.uint32(_GOLDEN))) * xp.uint32(_M1)
  a = a ^ (a >> xp.uint32(15))
  b = (a ^ (a >> xp.uint32(13))) * xp.uint32(_M2)
  return a, b ^ (b >> xp.uint32(16))


def _digest(h1, h2) -> str:
  return f"{int(h1):08x}{int(h2):08x}"


def _device_sums(x):
  """Two wrapping uint32 sums of an array's mixed words, computed where its shards live."""
  x = jnp.asarray(x)
  if x.dtype.itemsize == 8:
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
  elif x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  else:
    same = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    words = jax.lax.bitcast_convert_type(x, same).astype(jnp.uint32)
  index = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride)
    stride = (stride * words.shape[axis]) % (1 << 32)
  a, b = _mix(jnp, words, index)
  return jnp.sum(a, dtype=jnp.uint32), jnp.sum(b, dtype=jnp.uint32)


_device_tree_sums = jax.jit(lambda tree: jax.tree.map(_device_sums, tree))


def _first_shard(x):
  # Replicated scalars: every process holds the whole value.
  return np.asarray(x.addressable_data(0))


def of_tree(tree) -> Dict[str, str]:
  """{"params/head/kernel": 16 hex digits, ...}: jax arrays summed on their devices, host
  arrays on the CPU backend (XLA's loops are ~10x faster than numpy's temporaries here)."""
  cpu = jax.devices("cpu")[0]
  groups = {}  # one program per set of devices: a jit takes arrays of one device set only
  for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    x = x if isinstance(x, jax.Array) else jax.device_put(x, cpu)
    groups.setdefault(frozenset(x.sharding.device_set), {})[layout.path_str(p)] = x
  out = {}
  for arrays in groups.values():
    for key, (h1, h2) in _device_tree_sums(arrays).items():
      out[key] = _digest(_first_shard(h1), _first_shard(h2))
  return out


def mismatches(tree, expected: Mapping[str, str], prefix: str = "") -> Dict[str, Any]:
  """Paths (with `prefix` before each of `tree`'s) whose checksum differs from `expected`;
  paths that `expected` does not list are not checked."""
  got = of_tree(tree)
  return {prefix + k: v for k, v in got.items()
          if prefix + k in expected and expected[prefix + k] != v}
