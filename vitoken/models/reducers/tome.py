"""Token Merging (ToMe; Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023).

Follows the reference code (facebookresearch/ToMe) exactly:
- the similarity metric is the block's keys averaged over heads, cosine-normalised;
- bipartite soft matching: tokens alternate into set A (even positions) and set B (odd);
  each A token finds its most similar B token, and the r A tokens with the highest
  similarity merge into their match (class and distillation tokens never merge);
- r is capped at half of the unprotected tokens;
- the output is the unmerged A tokens then the B tokens, with the unmerged A tokens sorted
  back into their original order when there is a class token;
- merging is a size-weighted average and sizes add up; sources merge by max;
- it runs between the attention and the MLP of a block, and proportional attention adds
  log(size) to the attention logits.

After pruning (EViT, top-k, DynamicViT at inference) ToMe merges the survivors: pruned tokens
are gathered away first, and sizes carry over (an EViT fused token's size is the attention
mass it pools). A state with a mask or a soft keep policy is refused, naming the fix.

Every shape is static: r per layer is fixed by the config, and matching and merging are
batched gathers and scatters. Register tokens are protected like the class token (the
reference predates them). The kth-element and random-split matchings of the reference
are there too (`matching="kth"` / `"random"`); they run on the unprotected tokens.
"""
from typing import List, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from vitoken.errors import ConfigError
from vitoken.models.reducers import base

MATCHINGS = ("bipartite", "kth", "random")


def parse_r(depth: int, r: Union[int, Sequence[int]], inflection: Optional[float] = None) -> List[int]:
  """Tokens to merge at each layer, as the reference's `parse_r`.

  `r` an int: constant, or with `inflection` in [-1, 1] a linear trend (-1 is the paper's
  "decreasing schedule"). `r` a sequence: one value per layer, padded with zeros.
  """
  if isinstance(r, (list, tuple)):
    if inflection is not None:
      raise ConfigError("tome: give either a per-layer r list or r with an inflection, not both")
    if len(r) > depth:
      raise ConfigError(f"tome: the r schedule has {len(r)} entries but the ViT has {depth} layers")
    if any(int(v) != v or v < 0 for v in r):
      raise ConfigError(f"tome: per-layer r must be non-negative integers, got {list(r)}")
    return [int(v) for v in r] + [0] * (depth - len(r))
  if int(r) != r or r < 0:
    raise ConfigError(f"tome: r must be a non-negative integer, got {r!r}")
  inflect = 0.0 if inflection is None else float(inflection)
  if not -1.0 <= inflect <= 1.0:
    raise ConfigError(f"tome: inflection must be in [-1, 1], got {inflection}")
  min_val = int(r * (1.0 - inflect))
  max_val = 2 * r - min_val
  step = (max_val - min_val) / (depth - 1) if depth > 1 else 0.0
  return [int(min_val + step * i) for i in range(depth)]


class Matching(NamedTuple):
  """Who merges into whom, as indices (all [B, n]); what `merge` needs, nothing else.

  The sequence splits into A (`a_idx`) and B (`b_idx`). A tokens `src_idx` merge into B
  tokens `dst_idx`; A tokens `unm_idx` stay. `num_prefix` protected tokens come first in
  the output, in their original order (static).
  """
  a_idx: jax.Array
  b_idx: jax.Array
  unm_idx: jax.Array
  src_idx: jax.Array
  dst_idx: jax.Array
  num_prefix_a: int = 0
  num_prefix_b: int = 0
  prefix_order: tuple = ()  # for each protected output slot: ("a" | "b", position)


def _normalize(metric):
  metric = jax.lax.stop_gradient(metric).astype(jnp.float32)
  return metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)


def _best_match(a, b):
  """For each row of a, the index of the most similar row of b."""
  return jnp.einsum("bic,bjc->bij", a, b).argmax(axis=-1)


def bipartite_soft_matching(metric, r: int, num_protected: int = 0) -> Matching:
  """The reference's matching. metric [B, T, C]; protected tokens lead the sequence."""
  b, t, _ = metric.shape
  r = min(r, (t - num_protected) // 2)
  pa, pb = (num_protected + 1) // 2, num_protected // 2  # protected tokens in A and in B
  metric = _normalize(metric)
  a, bb = metric[:, ::2], metric[:, 1::2]
  scores = jnp.einsum("bic,bjc->bij", a, bb)
  # Protected A tokens never merge; nothing merges into a protected B token.
  scores = scores.at[:, :pa, :].set(-jnp.inf).at[:, :, :pb].set(-jnp.inf)
  node_max, node_idx = scores.max(axis=-1), scores.argmax(axis=-1)
  edge_idx = jnp.argsort(-node_max, axis=-1, stable=True)
  unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
  dst_idx = jnp.take_along_axis(node_idx, src_idx, axis=-1)
  if num_protected:
    unm_idx = jnp.sort(unm_idx, axis=-1)  # protected A tokens (lowest indices) come first
  batch = lambda v: jnp.broadcast_to(v, (b,) + v.shape)
  order = tuple(("a", i // 2) if i % 2 == 0 else ("b", i // 2) for i in range(num_protected))
  return Matching(batch(jnp.arange(0, t, 2)), batch(jnp.arange(1, t, 2)), unm_idx, src_idx,
                  dst_idx, pa, pb, order)


def kth_bipartite_soft_matching(metric, k: int, num_protected: int = 0) -> Matching:
  """Reference's kth-element matching on the unprotected tokens: B is every kth token, all
  of A merges into B (tokens past a multiple of k are dropped, as in the reference)."""
  b, t, _ = metric.shape
  n = ((t - num_protected) // k) * k
  pos = jnp.arange(num_protected, num_protected + n).reshape(-1, k)
  a_pos, b_pos = pos[:, :k - 1].reshape(-1), pos[:, k - 1]
  metric = _normalize(metric)
  dst = _best_match(metric[:, a_pos], metric[:, b_pos])
  batch = lambda v: jnp.broadcast_to(v, (b,) + v.shape)
  return _all_merge(batch(a_pos), batch(b_pos), dst, num_protected)


def random_bipartite_soft_matching(metric, r: int, rng, num_protected: int = 0) -> Matching:
  """Reference's random-split matching on the unprotected tokens: A is r random tokens, all
  of which merge into their best match in B (the rest, in random order)."""
  b, t, _ = metric.shape
  n = t - num_protected
  perm = jnp.argsort(jax.random.uniform(rng, (b, n)), axis=1) + num_protected
  a_idx, b_idx = perm[:, :r], perm[:, r:]
  metric = _normalize(metric)
  dst = _best_match(base.take_tokens(metric, a_idx), base.take_tokens(metric, b_idx))
  return _all_merge(a_idx, b_idx, dst, num_protected)


def _all_merge(a_idx, b_idx, dst_idx, num_protected) -> Matching:
  b = a_idx.shape[0]
  src = jnp.broadcast_to(jnp.arange(a_idx.shape[1]), a_idx.shape)
  prefix = jnp.broadcast_to(jnp.arange(num_protected), (b, num_protected))
  # Protected tokens ride along as unmerged "A" tokens in front.
  a_idx = jnp.concatenate([prefix, a_idx], axis=1)
  return Matching(a_idx, b_idx, prefix, src + num_protected, dst_idx, num_protected, 0,
                  tuple(("a", i) for i in range(num_protected)))


MERGE_IMPLS = ("scatter", "onehot")


def merge(m: Matching, x, mode: str = "sum", impl: str = "scatter"):
  """Applies a matching to x [B, T, ...]: "sum" and "max" reduce merged tokens into their
  destination, "keep" leaves destinations as they are (e.g. for token ids). `impl` is how a
  "sum" reaches its destinations: a scatter-add, or a one-hot [r, T_b] matmul (the same sums;
  which is faster depends on the device)."""
  if impl not in MERGE_IMPLS:
    raise ConfigError(f"tome merge impl must be one of {MERGE_IMPLS}, got {impl!r}")
  a, bb = base.take_tokens(x, m.a_idx), base.take_tokens(x, m.b_idx)
  unm, src = base.take_tokens(a, m.unm_idx), base.take_tokens(a, m.src_idx)
  if mode == "sum" and impl == "onehot":
    onehot = jax.nn.one_hot(m.dst_idx, bb.shape[1], dtype=src.dtype)  # [B, r, T_b]
    bb = bb + jnp.einsum("brt,br...->bt...", onehot, src,
                         precision=jax.lax.Precision.HIGHEST).astype(bb.dtype)
  elif mode != "keep":
    rows = jnp.arange(x.shape[0])[:, None]
    at = bb.at[rows, m.dst_idx]
    bb = at.add(src) if mode == "sum" else at.max(src)
  if not m.prefix_order:
    return jnp.concatenate([unm, bb], axis=1)
  sets = {"a": unm, "b": bb}
  prefix = [sets[s][:, i:i + 1] for s, i in m.prefix_order]
  return jnp.concatenate(prefix + [unm[:, m.num_prefix_a:], bb[:, m.num_prefix_b:]], axis=1)


def check_mergeable(state: base.TokenState, method: str = "tome"):
  """Merging needs every token present and unweighted: refuses a keep policy or a mask."""
  if state.policy is not None:
    raise ConfigError(
        f"{method}: the token state carries a keep policy (DynamicViT in training keeps every token "
        "and weights attention by its keep decisions), which merging cannot follow. Merge "
        "before DynamicViT, or prune with evit or topk, which gather in training too "
        "(DynamicViT gathers at inference, where ToMe may follow it)")
  if state.mask is not None:
    raise ConfigError(f"{method}: the token state has a mask (tokens dropped or padded per example), "
                      "which merging cannot follow; merging needs tokens gathered away first")


def merge_state(m: Matching, state: base.TokenState, impl: str = "scatter") -> base.TokenState:
  """Size-weighted average of tokens, summed sizes, max-merged sources, kept ids; per-token
  carried arrays merge by their own mode ("mean" is size-weighted like the tokens)."""
  check_mergeable(state)
  size = state.size[..., None]
  new_size = merge(m, size, "sum", impl)

  def mean(v):
    fit = lambda a: a[..., 0].reshape(a.shape[:2] + (1,) * (v.ndim - 2)).astype(v.dtype)
    return merge(m, v * fit(size), "sum", impl) / fit(new_size)

  x = mean(state.x)
  source = None if state.source is None else merge(m, state.source, "max")
  carry = dict(state.carry)
  for key, (value, mode) in state.carried_per_token().items():
    carry[key] = mean(value) if mode == "mean" else merge(m, value, mode)
  return state.replace(x=x, size=new_size[..., 0], ids=merge(m, state.ids, "keep"),
                       source=source, carry=carry)


def unmerge(tokens, source):
  """Spreads merged tokens [B, N, C] back over the N0 original positions: [B, N0, C]."""
  return jnp.einsum("bnm,bnc->bmc", source.astype(tokens.dtype), tokens)


@base.register("tome")
class ToMe(base.Reducer):
  """Merges `r` tokens at this layer (see the module docstring)."""
  r: int = 0
  matching: str = "bipartite"
  k: int = 2
  # When r exceeds what the layer allows: "cap" it (the reference; trending schedules),
  # "error" (an explicit per-layer list means exactly that), or "error_beyond_full" (a
  # constant r: capped in late layers, but more than the whole sequence allows is a mistake).
  excess: str = "cap"
  merge_impl: str = "scatter"  # or "onehot" (see `merge`)

  stages = (base.POST_ATTN,)
  needs = frozenset({base.KEYS_MEAN})

  @classmethod
  def layer_settings(cls, depth: int, r: Union[int, Sequence[int]] = 0,
                     inflection: Optional[float] = None, matching: str = "bipartite", k: int = 2,
                     prop_attn: bool = True, trace_source: bool = False,
                     layers: Optional[Sequence[int]] = None, merge_impl: str = "scatter"):
    if matching not in MATCHINGS:
      raise ConfigError(f"tome: matching must be one of {MATCHINGS}, got {matching!r}")
    if merge_impl not in MERGE_IMPLS:
      raise ConfigError(f"tome: merge_impl must be one of {MERGE_IMPLS}, got {merge_impl!r}")
    if matching == "kth":
      if int(k) != k or k < 2:
        raise ConfigError(f"tome: kth matching needs an integer k >= 2, got {k!r}")
      chosen = range(depth) if layers is None else layers
      return {int(i): {"matching": "kth", "k": int(k), "merge_impl": merge_impl} for i in chosen}
    if layers is not None:
      raise ConfigError("tome: `layers` is for kth matching; give r per layer as a list instead")
    schedule = parse_r(depth, r, inflection)
    excess = ("error" if isinstance(r, (list, tuple))
              else "cap" if inflection is not None else "error_beyond_full")
    return {i: {"r": v, "matching": matching, "excess": excess, "merge_impl": merge_impl}
            for i, v in enumerate(schedule) if v > 0}

  @classmethod
  def plan_flags(cls, settings):
    return {"proportional_attention": bool(settings.get("prop_attn", True)),
            "track_source": bool(settings.get("trace_source", False)),
            "rng_streams": frozenset({"reduction"} if settings.get("matching") == "random" else ())}

  def __call__(self, state, info, *, train=False):
    t, p = state.num_tokens, state.num_prefix
    if self.matching == "kth":
      m = kth_bipartite_soft_matching(info.keys_mean, self.k, p)
      return merge_state(m, state, self.merge_impl), {}
    cap = (t - p) // 2
    full = state.grid.num_patches // 2
    if self.r > cap and (self.excess == "error" or (self.excess == "error_beyond_full" and self.r > full)):
      raise ConfigError(
          f"{self.where}: tome r={self.r} but {t} tokens reach this layer ({p} protected), "
          f"so at most {cap} can merge")
    r = min(self.r, cap)
    if r <= 0:
      return state, {}  # the reference does nothing (no reordering either)
    if self.matching == "random":
      m = random_bipartite_soft_matching(info.keys_mean, r, self.make_rng("reduction"), p)
    else:
      m = bipartite_soft_matching(info.keys_mean, r, p)
    return merge_state(m, state, self.merge_impl), {}
