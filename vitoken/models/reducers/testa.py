"""TESTA: temporal-spatial token aggregation (Ren et al., "TESTA: Temporal-Spatial Token
Aggregation for Long-form Video-Language Understanding", EMNLP Findings 2023).

Follows the reference code (RenShuhuai-Andy/TESTA, `testa/merge.py` and
`testa/patch/timesformer.py` with `merging_type="frame&patch"`), per block, after attention:

1. Temporal aggregation. The time slices alternate into set A (even slices) and set B (odd).
   At every spatial position, each A slice finds its most similar B slice on the keys averaged
   over heads (cosine). Each A slice then goes to the B slice most of its positions chose (the
   mode over positions; ties to the lowest index, as torch's `mode`), and its score is the
   mode of its positions' best similarities (for distinct values torch's `mode` gives the
   smallest). The `frames` A slices of highest score merge into their B slice, position by
   position, a size-weighted average; sizes add. The unmerged A slices, in their order, come
   first, then the B slices.
2. Spatial aggregation: ToMe within each remaining slice (`patches` per slice), with the class
   token copied in front of the slice as the reference's divided attention has it, so the
   A/B alternation and the class token's protection are the reference's.

The reference's block is TimeSformer's divided attention, whose temporal and spatial
attentions each give the keys of their step; vitoken's video ViT attends jointly, so both
steps read the block's one set of keys (the frame step's merge moves them, size-weighted, for
the patch step). Defaults are the reference's 32-frame configs (`testa_r` alternates frames
and patches per block: 1 frame, 12 patches per slice) without proportional attention, as its
models apply it. One difference: the reference counts the class token among the slices when
capping the frames merged (at most (T - 1) // 2 with a class token); here at most half of the
slices may merge, and more is an error that names `frames`.
"""
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from vitoken.errors import ConfigError
from vitoken.models.reducers import base, tome

PerLayer = Union[int, Sequence[int]]


def per_layer(depth: int, value: PerLayer, what: str):
  """A constant or a per-layer list (padded with zeros) of non-negative integers."""
  if isinstance(value, (list, tuple)):
    if len(value) > depth:
      raise ConfigError(f"{what} has {len(value)} entries but the ViT has {depth} layers")
    values = list(value) + [0] * (depth - len(value))
  else:
    values = [value] * depth
  if any(isinstance(v, bool) or int(v) != v or v < 0 for v in values):
    raise ConfigError(f"{what} must be non-negative integers, got {value!r}")
  return [int(v) for v in values]


def mode(values, axis: int):
  """torch's `mode` along `axis`: the most frequent value, the smallest among ties."""
  v = jnp.moveaxis(values, axis, -1)
  counts = (v[..., :, None] == v[..., None, :]).sum(axis=-1)
  top = counts.max(axis=-1, keepdims=True)
  return jnp.where(counts == top, v, jnp.array(jnp.inf, v.dtype) if jnp.issubdtype(
      v.dtype, jnp.floating) else jnp.iinfo(v.dtype).max).min(axis=-1)


def frame_matching(metric, r: int) -> tome.Matching:
  """The reference's frame matching over time slices. metric [B, T, L, C] (slices, positions
  within a slice); the matching's tokens are whole slices."""
  b, t = metric.shape[:2]
  metric = tome._normalize(metric)  # pylint: disable=protected-access
  a, bb = metric[:, ::2], metric[:, 1::2]
  scores = jnp.einsum("bilc,bjlc->blij", a, bb)  # per position: A slices x B slices
  node_max, node_idx = scores.max(axis=-1), scores.argmax(axis=-1)  # [B, L, Ta]
  node_max, node_idx = mode(node_max, axis=1), mode(node_idx, axis=1)  # the vote: [B, Ta]
  edge_idx = jnp.argsort(-node_max, axis=-1, stable=True)
  src_idx = edge_idx[:, :r]
  unm_idx = jnp.sort(edge_idx[:, r:], axis=-1)
  dst_idx = jnp.take_along_axis(node_idx, src_idx, axis=-1)
  batch = lambda v: jnp.broadcast_to(v, (b,) + v.shape)
  return tome.Matching(batch(jnp.arange(0, t, 2)), batch(jnp.arange(1, t, 2)), unm_idx, src_idx,
                       dst_idx)


def merge_slices(m: tome.Matching, state: base.TokenState, impl: str = "scatter"):
  """Applies a matching of whole time slices: each merged slice joins its destination position
  by position, a size-weighted average; sizes add, sources merge by max, ids stay the
  destination's; per-token carries by their mode. `slices` becomes the slices left."""
  tome.check_mergeable(state, "testa")
  p, t = state.num_prefix, state.slices

  def slices(a):
    return a[:, p:].reshape((a.shape[0], t, -1) + a.shape[2:])

  def joined(head, merged):
    return jnp.concatenate([head[:, :p].astype(merged.dtype),
                            merged.reshape((merged.shape[0], -1) + merged.shape[3:])], axis=1)

  size = slices(state.size)
  new_size = tome.merge(m, size, "sum", impl)

  def mean(v):
    vs = slices(v)
    fit = lambda s: s.reshape(s.shape + (1,) * (vs.ndim - 3)).astype(vs.dtype)
    return joined(v, tome.merge(m, vs * fit(size), "sum", impl) / fit(new_size))

  carry = dict(state.carry)
  for key, (value, how) in state.carried_per_token().items():
    carry[key] = mean(value) if how == "mean" else joined(value, tome.merge(m, slices(value), how))
  source = None if state.source is None else joined(state.source,
                                                    tome.merge(m, slices(state.source), "max"))
  return state.replace(x=mean(state.x), size=joined(state.size, new_size),
                       ids=joined(state.ids, tome.merge(m, slices(state.ids), "keep")),
                       source=source, carry=carry, slices=t - m.src_idx.shape[1])


def merge_within_slices(state: base.TokenState, keys_mean, r: int, impl: str = "scatter"):
  """ToMe with `r` per time slice, each slice preceded by a copy of the protected tokens."""
  p = state.num_prefix
  split = state.split_slices()
  metric = state.split_array(keys_mean)
  merged = tome.merge_state(tome.bipartite_soft_matching(metric, r, p), split, impl)
  tails = merged.map_tokens(lambda a: a[:, p:]).replace(num_prefix=0)
  return state.unfold_slices(tails, state.map_tokens(lambda a: a[:, :p]))


@base.register("testa")
class TESTA(base.Reducer):
  """Merges `frames` time slices, then `patches` tokens within each slice, at this block."""
  frames: int = 0
  patches: int = 0
  # A per-layer list means exactly that many; a constant is capped where fewer slices are
  # left (as the reference caps), but more than half of the clip's slices is an error.
  exact: bool = False
  merge_impl: str = "scatter"

  stages = (base.POST_ATTN,)
  needs = frozenset({base.KEYS_MEAN})
  keeps_slices = True  # it sets the slices left itself

  @classmethod
  def layer_settings(cls, depth: int, frames: PerLayer = 1, patches: PerLayer = 12,
                     prop_attn: bool = False, trace_source: bool = False,
                     layers: Optional[Sequence[int]] = None, merge_impl: str = "scatter"):
    if merge_impl not in tome.MERGE_IMPLS:
      raise ConfigError(f"testa: merge_impl must be one of {tome.MERGE_IMPLS}, got {merge_impl!r}")
    f = per_layer(depth, frames, "testa frames")
    q = per_layer(depth, patches, "testa patches")
    chosen = range(depth) if layers is None else [int(i) for i in layers]
    bad = [i for i in chosen if not 0 <= i < depth]
    if bad:
      raise ConfigError(f"testa layers {bad} are outside the ViT's {depth} layers (0..{depth - 1})")
    exact = isinstance(frames, (list, tuple))
    return {i: {"frames": f[i], "patches": q[i], "exact": exact, "merge_impl": merge_impl}
            for i in chosen
            if f[i] or q[i]}

  @classmethod
  def plan_flags(cls, settings):
    return {"proportional_attention": bool(settings.get("prop_attn", False)),
            "track_source": bool(settings.get("trace_source", False)),
            "rng_streams": frozenset()}

  def __call__(self, state, info, *, train=False):
    keys = info.keys_mean
    t = state.slices
    frames = min(self.frames, t // 2)
    if self.frames > t // 2 and (self.exact or self.frames > state.grid.frames // 2):
      raise ConfigError(
          f"{self.where}: testa frames={self.frames} but {t} time slices reach this block, so at "
          f"most {t // 2} (half) can merge" + ("" if t > 1 else " (an image model, or an earlier "
                                                "reducer mixed tokens across slices)"))
    if frames:
      p = state.num_prefix
      metric = keys[:, p:].reshape((keys.shape[0], t, -1) + keys.shape[2:])
      m = frame_matching(metric, frames)
      state = state.put(self.name, "keys", keys, per_token=True, merge="mean")
      state = merge_slices(m, state, self.merge_impl)
      keys, state = state.pop(self.name, "keys")
    if self.patches:
      n = (state.num_tokens - state.num_prefix) // state.slices
      r = min(self.patches, n // 2)
      if r > 0:
        state = merge_within_slices(state, jax.lax.stop_gradient(keys), r, self.merge_impl)
    return state, {}
