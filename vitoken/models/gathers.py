"""Batched token gathers, and the debug switch that makes them check their indices.

Below the reducers: the masking helpers and every reducer gather tokens the same way.
"""
import contextlib
from typing import Callable

import jax
from jax.experimental import checkify
import jax.numpy as jnp

_DEBUG = {"checked_gathers": False}


@contextlib.contextmanager
def checked_gathers(enabled: bool = True):
  """Debug switch: inside it, every token gather checks its indices (checkify user checks).

  Functions traced inside must run under `checkify.checkify(...)` (see `run_checked`); an
  index outside the token axis then raises instead of filling NaN.
  """
  previous = _DEBUG["checked_gathers"]
  _DEBUG["checked_gathers"] = enabled
  try:
    yield
  finally:
    _DEBUG["checked_gathers"] = previous


def run_checked(fn: Callable, *args, **kwargs):
  """Calls `fn` with checked gathers, raising on any out-of-range token index."""
  with checked_gathers():
    err, out = checkify.checkify(fn, errors=checkify.user_checks)(*args, **kwargs)
  err.throw()
  return out


def take_tokens(x: jax.Array, indices: jax.Array) -> jax.Array:
  """Batched gather along the token axis: x [B, T, ...], indices [B, K] -> [B, K, ...].

  Unchecked (see `checked_gathers`), an index >= T fills (NaN for floats) and a negative one
  counts from the end, as numpy's; neither is an error.
  """
  if _DEBUG["checked_gathers"]:
    t = x.shape[1]
    checkify.check(jnp.all((indices >= 0) & (indices < t)),
                   f"token gather index out of range for {t} tokens (shape {tuple(x.shape)})")
  return jnp.take_along_axis(x, indices.reshape(indices.shape + (1,) * (x.ndim - 2)), axis=1)
