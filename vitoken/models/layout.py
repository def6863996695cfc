"""Converts ViT parameters between the unscanned layout (`block_NN/...`, one subtree per layer)
and the scanned one (`blocks/...`, every leaf stacked on a leading layer axis)."""
import re
from typing import Any, Dict

import jax
import jax.numpy as jnp

from vitoken.errors import InputError

_BLOCK = re.compile(r"^block_(\d+)$")


def key_name(entry) -> str:
  """The name of one jax key-path entry (dict key, attribute or sequence index)."""
  return path_str((entry,))


def path_str(path) -> str:
  """'/'-joined name of a jax key path: `block_00/attn/qkv/kernel`."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def _plain(tree):
  return {k: _plain(v) if hasattr(v, "items") else v for k, v in tree.items()}


def to_scanned(params: Dict[str, Any]) -> Dict[str, Any]:
  params = _plain(params)
  idx = sorted(int(m.group(1)) for k in params if (m := _BLOCK.match(k)))
  if not idx:
    raise InputError("no block_NN subtrees to stack: are these params already scanned?")
  if idx != list(range(len(idx))):
    raise InputError(f"block indices are not contiguous from 0: {idx}")
  blocks = [params.pop(f"block_{i:02d}") for i in idx]
  params["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return params


def to_unscanned(params: Dict[str, Any]) -> Dict[str, Any]:
  params = _plain(params)
  if "blocks" not in params:
    raise InputError("no scanned 'blocks' subtree: are these params already unscanned?")
  stacked = params.pop("blocks")
  depth = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(depth):
    params[f"block_{i:02d}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params
