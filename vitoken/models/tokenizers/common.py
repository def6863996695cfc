"""What every visual tokenizer shares: patches, codebook checks and codebook usage.

A visual tokenizer maps each image patch to one of `codebook_size` discrete codes, the
targets of BEiT-style masked token prediction. Usage is reported two ways so that a
collapsed codebook is visible: the share of codes used at least once over a split, and the
perplexity exp(H) of the code histogram (codebook_size when every code is equally frequent,
1 when one code takes everything).
"""
from typing import Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vitoken.errors import ConfigError
from vitoken.models.masking import patchify
from vitoken.settings import pair


def check_codebook_size(size, what: str = "codebook_size") -> int:
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 2:
    raise ConfigError(f"{what} must be an int >= 2 (one code cannot tell patches apart), "
                      f"got {size!r}")
  return int(size)


def check_patch(tokenizer_patch: Sequence[int], model_patch: Sequence[int], where: str):
  """A tokenizer gives one code per patch of its own size: the model's patches must match."""
  tp, mp = tuple(pair(tokenizer_patch)), tuple(pair(model_patch))
  if tp != mp:
    raise ConfigError(f"the tokenizer at {where} codes {tp[0]}x{tp[1]} patches but the model's "
                      f"patches are {mp[0]}x{mp[1]}: train a tokenizer with the model's patch size")


def normalized_patches(images, patch, eps: float):
  """images [B, H, W, C] -> float32 [B, L, ph*pw*C], each patch less its mean, over
  sqrt(its variance + eps): contrast-normalised as in k-means feature learning."""
  x = patchify(jnp.asarray(images, jnp.float32), patch)
  mean = x.mean(axis=-1, keepdims=True)
  var = x.var(axis=-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps)


def patch_stats(images, patch) -> Tuple[jax.Array, jax.Array]:
  """Each patch's (mean, variance) over its pixels and channels: [B, L, 1] each."""
  x = patchify(jnp.asarray(images, jnp.float32), patch)
  return x.mean(axis=-1, keepdims=True), x.var(axis=-1, keepdims=True)


def code_counts(codes, weight, codebook_size: int):
  """float32 [codebook_size]: how often each code occurs; `weight` [B] picks the examples."""
  w = jnp.broadcast_to(jnp.asarray(weight, jnp.float32)[:, None], codes.shape)
  return jnp.zeros((codebook_size,), jnp.float32).at[codes.reshape(-1)].add(w.reshape(-1))


def usage(counts) -> Dict[str, float]:
  """{"codebook_usage": share of codes used, "perplexity": exp(entropy of the histogram)}."""
  counts = np.asarray(counts, np.float64)
  total = counts.sum()
  if total <= 0:
    return {"codebook_usage": 0.0, "perplexity": 0.0}
  p = counts[counts > 0] / total
  return {"codebook_usage": float((counts > 0).mean()), "perplexity": float(np.exp(-(p * np.log(p)).sum()))}


def summary_with_usage(totals, summarize, prefix: str = "") -> Dict[str, float]:
  """`summarize` (a task's eval_summary) of the summed eval metrics without their
  "code_counts" histogram, plus that histogram's usage and perplexity (names after `prefix`)."""
  out = summarize({k: v for k, v in totals.items() if k != "code_counts"})
  out.update({f"{prefix}{k}": v for k, v in usage(totals["code_counts"]).items()})
  return out
