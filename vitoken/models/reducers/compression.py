"""Compressors of visual tokens for a language model, as pure functions, and the ones that act
inside an encoder as reducers at a block's `post_block` stage (the block has delivered its
class attention and mean keys there).

Each function follows its reference code (read, not copied):
- `cls_topk`: FasterVLM (Theia-4869/FasterVLM, `llava_arch.py`): top K patches by the
  class token's attention, in image order.
- `visionzip`: VisionZip (dvlab-research/VisionZip, `clip_encoder.py`): dominant tokens by
  class attention, contextual tokens by merging the rest into evenly spaced targets on keys.
- `prumerge`: LLaVA-PruMerge (42Shawn/LLaVA-PruMerge, `token_prune_merge_advanced`): an
  adaptive (IQR outlier) count of tokens, each enriched by its nearest neighbours on keys.
- `tome_to_k`: AIM (LaVi-Lab/AIM, `token_merge.py`): ToMe's bipartite matching, repeated on
  the features until K remain, with a plain mean (or vitoken's size-weighted one).
- `pool`: Matryoshka multimodal models (mu-cai/matryoshka-mm): average pooling to K.

Token counts are static; the adaptive PruMerge pads to a maximum and returns a mask.
"""
import math
from typing import ClassVar, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vitoken.errors import ConfigError, InputError
from vitoken.models.reducers import base, tome

_HI = jax.lax.Precision.HIGHEST


def _check_tokens(x, what: str):
  if x.ndim != 3:
    raise InputError(f"{what}: tokens must be [batch, tokens, channels], got shape {tuple(x.shape)}")


def check_count(num_tokens, available: int, what: str, name: str = "num_tokens"):
  """A ConfigError naming `name` unless it is a Python int in [1, available]."""
  if not isinstance(num_tokens, (int, np.integer)) or isinstance(num_tokens, bool):
    raise ConfigError(f"{what}: {name} must be a Python int (a static token count), got "
                      f"{num_tokens!r}")
  if not 1 <= num_tokens <= available:
    raise ConfigError(f"{what}: {name}={num_tokens} but there are {available} tokens to "
                      f"choose from; use 1..{available}")


def _normalize(v):
  v = v.astype(jnp.float32)
  return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def cls_topk(x, cls_attn, num_tokens: int, num_prefix: int = 1):
  """FasterVLM: the `num_tokens` patches the class token attends to most, in image order.

  x [B, P+N, C]; cls_attn [B, P+N] (the class row of the feature block's attention, mean over
  heads). Returns (tokens [B, K, C], ids [B, K]): ids are positions in x (patch j is P+j),
  ascending.
  """
  _check_tokens(x, "cls_topk")
  n = x.shape[1] - num_prefix
  check_count(num_tokens, n, "cls_topk")
  _, top = jax.lax.top_k(cls_attn[:, num_prefix:].astype(jnp.float32), num_tokens)
  ids = (jnp.sort(top, axis=-1) + num_prefix).astype(jnp.int32)
  return base.take_tokens(x, ids), ids


def _visionzip_counts(n: int, num_prefix: int, dominant: int, contextual: int):
  what = "visionzip"
  # Without a class token (a MAP-head encoder, scores given) the dominant tokens are patches.
  if not isinstance(dominant, (int, np.integer)) or dominant < max(num_prefix, 1):
    raise ConfigError(f"{what}: dominant={dominant!r} counts the class token, so it must be at "
                      f"least {max(num_prefix, 1)}")
  if not isinstance(contextual, (int, np.integer)) or contextual < 0:
    raise ConfigError(f"{what}: contextual={contextual!r} must be an int >= 0")
  top = dominant - num_prefix
  rest = n - top
  if top > n or (contextual and contextual > rest):
    raise ConfigError(f"{what}: dominant={dominant} + contextual={contextual} need "
                      f"{top + contextual} of the {n} patches (and {num_prefix} prefix "
                      "tokens); lower them")
  return top, rest


def visionzip_plan(n: int, num_prefix: int, dominant: int, contextual: int):
  """The static part of VisionZip's contextual merge over the R patches left after the dominant
  ones (position order): (target positions, member positions) among those R."""
  _, rest = _visionzip_counts(n, num_prefix, dominant, contextual)
  if not contextual:
    return np.zeros((0,), np.int64), np.arange(rest)
  step = max(1, rest // contextual)
  targets = np.arange(0, rest, step)[:contextual]
  members = np.setdiff1d(np.arange(rest), targets)
  return targets, members


def visionzip(x, cls_attn, keys_mean, dominant: int, contextual: int, num_prefix: int = 1):
  """VisionZip: `dominant` tokens (the class token and the top dominant-1 patches by class
  attention, in position order) then `contextual` ones: of the remaining patches, evenly spaced
  targets, each plus the mean of the others whose keys are closest to its own (cosine).

  x [B, P+N, C]; cls_attn [B, P+N]; keys_mean [B, P+N, Ck] (keys averaged over heads).
  Returns (tokens [B, dominant + contextual, C], ids [B, dominant + contextual]): the dominant
  tokens' positions, then the targets'. With P > 1 prefix tokens, all of them lead.
  """
  tokens, ids, _, _ = visionzip_merge(x, cls_attn, keys_mean, dominant, contextual, num_prefix)
  return tokens, ids


def visionzip_merge(x, cls_attn, keys_mean, dominant: int, contextual: int, num_prefix: int = 1):
  """`visionzip` plus the one-hot assignment [B, M, contextual] of the M merged tokens and their
  positions [B, M] (None, None without contextual tokens)."""
  _check_tokens(x, "visionzip")
  b, t, _ = x.shape
  n = t - num_prefix
  top, rest = _visionzip_counts(n, num_prefix, dominant, contextual)
  rows = jnp.arange(b)[:, None]
  if top:
    _, top_idx = jax.lax.top_k(cls_attn[:, num_prefix:].astype(jnp.float32), top)
    chosen = jnp.zeros((b, n), bool).at[rows, top_idx].set(True)
  else:
    chosen = jnp.zeros((b, n), bool)
  # Stable: the chosen patches last, each group in position order.
  order = jnp.argsort(chosen, axis=1, stable=True)
  left, picked = order[:, :rest] + num_prefix, order[:, rest:] + num_prefix
  prefix = jnp.broadcast_to(jnp.arange(num_prefix), (b, num_prefix))
  dominant_ids = jnp.concatenate([prefix, picked], axis=1).astype(jnp.int32)
  out, ids = [base.take_tokens(x, dominant_ids)], [dominant_ids]
  assign = member_ids = None
  if contextual:
    targets, members = visionzip_plan(n, num_prefix, dominant, contextual)
    target_ids, member_ids = left[:, targets].astype(jnp.int32), left[:, members]
    keys = _normalize(keys_mean)
    sim = jnp.einsum("bmc,btc->bmt", base.take_tokens(keys, member_ids),
                     base.take_tokens(keys, target_ids), precision=_HI)
    assign = jax.nn.one_hot(sim.argmax(axis=-1), contextual, dtype=jnp.float32)
    counts = jnp.maximum(assign.sum(axis=1), 1.0)[..., None]
    members_x = base.take_tokens(x, member_ids).astype(jnp.float32)
    merged = jnp.einsum("bmt,bmc->btc", assign, members_x, precision=_HI) / counts
    out.append((base.take_tokens(x, target_ids).astype(jnp.float32) + merged).astype(x.dtype))
    ids.append(target_ids)
  return jnp.concatenate(out, axis=1), jnp.concatenate(ids, axis=1), assign, member_ids


def outlier_share(scores):
  """PruMerge's adaptive ratio per example: the share of scores [B, N] above Q3 + 1.5 IQR
  (numpy's linear percentiles). The reference pools the whole batch, which it runs at 1."""
  s = scores.astype(jnp.float32)
  q1, q3 = jnp.percentile(s, 25, axis=-1), jnp.percentile(s, 75, axis=-1)
  upper = q3 + 1.5 * (q3 - q1)
  return (s > upper[:, None]).astype(jnp.float32).mean(axis=-1)


def _kept_count_table(n: int) -> np.ndarray:
  """int(N * (count / N)) as the reference computes it in float64, for every count: the
  product rounds below `count` for some (count, N), and those counts keep one token less."""
  return np.array([int(n * (c / n)) for c in range(n + 1)], np.int32)


def prumerge_attention(q, k):
  """PruMerge's one-head attention over the full width, scaled by C**-0.5: [B, T, T]."""
  c = q.shape[-1]
  logits = jnp.einsum("bic,bjc->bij", q.astype(jnp.float32), k.astype(jnp.float32),
                      precision=_HI) * c ** -0.5
  return jax.nn.softmax(logits, axis=-1)


def prumerge(x, q, k, *, num_prefix: int = 1, neighbours: int = 32,
             num_tokens: Optional[int] = None, max_tokens: Optional[int] = None):
  """LLaVA-PruMerge (`token_prune_merge_advanced`).

  x [B, P+N, C] features; q, k [B, P+N, Cq]: the NEXT block's query and key projections of
  LN(x), one head over the full width. Scores are the class row of softmax(q k^T Cq^-1/2) over
  the patches. Keeps int(N * ratio) patches (ratio: `outlier_share`), or `num_tokens` (the
  fixed variant), in descending score order; each becomes itself plus the score-weighted sum
  of its `neighbours` nearest other patches on normalised keys (kept or pruned); then one
  token: the score-weighted sum of the pruned patches.

  Returns (tokens [B, M+1, C], ids [B, M+1], mask [B, M+1], scores [B, N]), M = `num_tokens`,
  else `max_tokens` (default N): the n kept tokens, the extra one, then padding (mask False).
  Kept tokens' ids are positions in x; the extra token and padding have id -1.
  """
  _check_tokens(x, "prumerge")
  b, t, c = x.shape
  n = t - num_prefix
  if num_prefix < 1:
    raise ConfigError("prumerge scores patches by the class token's attention; this encoder has "
                      "no class token")
  if not isinstance(neighbours, (int, np.integer)) or not 1 <= neighbours <= n - 1:
    raise ConfigError(f"prumerge: neighbours={neighbours!r}, but each patch has {n - 1} others; "
                      f"use 1..{n - 1}")
  attn = prumerge_attention(q, k)
  scores = attn[:, 0, num_prefix:]
  if num_tokens is not None:
    if num_tokens != 0:  # 0: only the extra token, the whole image's weighted sum
      check_count(num_tokens, n, "prumerge")
    slots = int(num_tokens)
    kept = jnp.full((b,), num_tokens, jnp.int32)
  else:
    slots = n if max_tokens is None else max_tokens
    check_count(slots, n, "prumerge", "max_tokens")
    counts = jnp.round(outlier_share(scores) * n).astype(jnp.int32)
    kept = jnp.minimum(jnp.asarray(_kept_count_table(n))[counts], slots)
  order = jnp.argsort(-scores, axis=-1, stable=True)  # torch.topk: descending scores
  top = order[:, :slots]
  slot_kept = jnp.arange(slots)[None] < kept[:, None]  # [B, M]
  xs = x[:, num_prefix:].astype(jnp.float32)
  weighted = xs * scores[..., None]
  if slots:
    keys = _normalize(k[:, num_prefix:])
    sim = jnp.einsum("bmc,bnc->bmn", base.take_tokens(keys, top), keys, precision=_HI)
    self_hit = top[..., None] == jnp.arange(n)[None, None]
    _, near = jax.lax.top_k(jnp.where(self_hit, -jnp.inf, sim), neighbours)  # [B, M, nb]
    added = jnp.take_along_axis(weighted[:, None], near[..., None], axis=2).sum(axis=2)
    centres = base.take_tokens(xs, top) + added
  else:
    centres = jnp.zeros((b, 0, c), jnp.float32)
  rank = jnp.argsort(order, axis=-1)  # each patch's place in the descending order
  pruned = (rank >= kept[:, None]).astype(jnp.float32)
  extra = jnp.einsum("bn,bnc->bc", pruned, weighted, precision=_HI)
  # The extra token goes right after the n kept ones; padding after it.
  slot = jnp.arange(slots + 1)[None]
  tokens = jnp.concatenate([centres, jnp.zeros((b, 1, c), centres.dtype)], axis=1)
  tokens = jnp.where((slot == kept[:, None])[..., None], extra[:, None], tokens)
  ids = jnp.concatenate([top + num_prefix, jnp.full((b, 1), base.LEARNED_ID)], axis=1)
  valid_kept = jnp.concatenate([slot_kept, jnp.zeros((b, 1), bool)], axis=1)
  ids = jnp.where(valid_kept, ids, base.LEARNED_ID).astype(jnp.int32)
  mask = slot <= kept[:, None]
  tokens = jnp.where(mask[..., None], tokens, 0.0)
  return tokens.astype(x.dtype), ids, mask, scores


def tome_to_k(x, num_tokens: int, *, metric=None, weighted: bool = False, size=None):
  """AIM: ToMe's bipartite matching, repeated until `num_tokens` remain, each round merging at
  most half (r = min(T - K, T // 2)), on `metric` (default: the tokens themselves, re-read
  every round; a given metric merges along with them). `weighted=False` is AIM's plain mean
  of a destination and its sources; True is vitoken's size-weighted mean.

  Returns (tokens [B, K, C], size [B, K]): each round's order is the reference's, the unmerged
  A tokens by descending match score, then the B tokens.
  """
  _check_tokens(x, "tome_to_k")
  check_count(num_tokens, x.shape[1], "tome_to_k")
  size = jnp.ones(x.shape[:2], jnp.float32) if size is None else size.astype(jnp.float32)
  dtype = x.dtype
  x = x.astype(jnp.float32)
  own_metric = metric is None
  while x.shape[1] > num_tokens:
    t = x.shape[1]
    m = tome.bipartite_soft_matching(x if own_metric else metric, min(t - num_tokens, t // 2))
    weight = size if weighted else jnp.ones_like(size)
    total = tome.merge(m, weight[..., None], "sum")
    x = tome.merge(m, x * weight[..., None], "sum") / total
    if not own_metric:
      metric = tome.merge(m, metric * weight[..., None], "sum") / total
    size = tome.merge(m, size[..., None], "sum")[..., 0]
  return x.astype(dtype), size


def pool_stride(num_patches: int, num_tokens: int, grid: Sequence[int], what: str = "pool") -> int:
  """The kernel (= stride) sqrt(N/K) of pooling N patches on `grid` to K (an error if none)."""
  check_count(num_tokens, num_patches, what)
  side = math.isqrt(num_patches // num_tokens)
  h, w = grid
  if side * side * num_tokens != num_patches or h % side or w % side:
    raise ConfigError(f"{what}: num_tokens={num_tokens} needs a square window of sqrt(N/K) "
                      f"patches that tiles the {h}x{w} grid (N={num_patches}); use K = N / s^2 "
                      "for an s that divides both sides, e.g. "
                      f"{[num_patches // (s * s) for s in range(1, min(h, w) + 1) if not h % s and not w % s]}")
  return side


def pool(x, num_tokens: int, grid: Sequence[int]):
  """M3: average pooling of patches x [B, N, C] (row-major on `grid` (h, w)) with kernel =
  stride = sqrt(N/K): [B, K, C]. K = N gives x back."""
  _check_tokens(x, "pool")
  b, n, c = x.shape
  h, w = grid
  if h * w != n:
    raise InputError(f"pool: {n} tokens do not fill a {h}x{w} grid")
  s = pool_stride(n, num_tokens, grid)
  y = x.astype(jnp.float32).reshape(b, h // s, s, w // s, s, c).mean(axis=(2, 4))
  return y.reshape(b, num_tokens, c).astype(x.dtype)


# ---- the compressors that act inside the encoder, as reducers ------------------------------
class _EncoderCompressor(base.Reducer):
  """A compressor at a block's `post_block` stage, over one sequence of plain tokens."""
  stages: ClassVar[Tuple[str, ...]] = (base.POST_BLOCK,)

  def check_state(self, state):
    tome.check_mergeable(state, self.method_name())
    if state.sequences != 1:
      raise ConfigError(f"{self.where}: {self.method_name()} needs one sequence per example")


class _ScoredCompressor(_EncoderCompressor):
  """Ranks patches by the class token's attention; an encoder without a class token (SigLIP's
  MAP head) passes its own scores as `inputs["token_scores"]` [B, N] over the patches
  (vlm.VisualTokenizer does)."""
  needs = frozenset({base.CLS_ATTN})

  def scores(self, state, info):
    given = info.inputs.get("token_scores")
    if given is not None:
      want = (state.x.shape[0], state.num_tokens - state.num_prefix)
      if tuple(given.shape) != want:
        raise InputError(f"{self.where}: token_scores has shape {tuple(given.shape)}, the "
                         f"patches are {want}")
      pad = jnp.zeros((given.shape[0], state.num_prefix), given.dtype)
      return jnp.concatenate([pad, given], axis=1)
    if state.num_prefix == 0 or (self.context is not None and self.context.class_token is False):
      raise ConfigError(f"{self.where}: {self.method_name()} ranks patches by the class token's "
                        "attention, and this encoder has no class token; use "
                        "vitoken.vlm.VisualTokenizer, which scores them with the MAP head")
    return info.cls_attn


def _with_prefix(state, ids):
  b, p = ids.shape[0], state.num_prefix
  return jnp.concatenate([jnp.broadcast_to(jnp.arange(p), (b, p)), ids], axis=1)


@base.register("cls_topk")
class ClsTopK(_ScoredCompressor):
  """FasterVLM: keeps the protected tokens and the `num_tokens` patches the class token attends
  to most, in image order."""
  num_tokens: int = 64

  def __call__(self, state, info, *, train=False):
    self.check_state(state)
    scores = self.scores(state, info)
    _, ids = cls_topk(state.x, scores, self.num_tokens, state.num_prefix)
    return state.gather(_with_prefix(state, ids)), {"scores": scores[:, state.num_prefix:]}


@base.register("visionzip")
class VisionZip(_ScoredCompressor):
  """VisionZip: `dominant` tokens (counting the class token) and `contextual` merged ones, each
  standing for its target and members (`size`, `source`)."""
  dominant: int = 54
  contextual: int = 10
  num_tokens: Optional[int] = None  # if given, it must be dominant + contextual
  needs = frozenset({base.CLS_ATTN, base.KEYS_MEAN})

  def __call__(self, state, info, *, train=False):
    self.check_state(state)
    if self.num_tokens is not None and self.num_tokens != self.dominant + self.contextual:
      raise ConfigError(f"{self.where}: visionzip num_tokens={self.num_tokens} but dominant="
                        f"{self.dominant} + contextual={self.contextual} = "
                        f"{self.dominant + self.contextual}; the dominant tokens count the "
                        "class token (VisionZip's 54 + 10 = 64)")
    scores = self.scores(state, info)
    tokens, ids, assign, member_ids = visionzip_merge(
        state.x, scores, info.keys_mean, self.dominant, self.contextual, state.num_prefix)
    new = state.gather(ids).replace(x=tokens)
    record = {"scores": scores[:, state.num_prefix:]}
    if assign is None:
      return new, record
    d = self.dominant
    members = base.take_tokens(state.size, member_ids)
    new = new.replace(size=new.size.at[:, d:].add(jnp.einsum("bmt,bm->bt", assign, members)))
    if new.source is not None:
      src = jnp.einsum("bmt,bmn->btn", assign,
                       base.take_tokens(state.source, member_ids).astype(jnp.float32))
      new = new.replace(source=new.source.at[:, d:].max(src.astype(new.source.dtype)))
    return new, record


@base.register("tome_to_k")
class ToMeToK(_EncoderCompressor):
  """AIM: bipartite merging of the patches (the prefix kept in front) until `num_tokens`
  remain; `weighted` False is AIM's plain mean, True the size-weighted one. Ids are the
  destinations', sizes and sources add up."""
  num_tokens: int = 64
  weighted: bool = False

  def __call__(self, state, info, *, train=False):
    self.check_state(state)
    p = state.num_prefix
    check_count(self.num_tokens, state.num_tokens - p, f"{self.where}: tome_to_k")
    head = lambda a: a[:, :p]
    while state.num_tokens - p > self.num_tokens:
      t = state.num_tokens - p
      m = tome.bipartite_soft_matching(state.x[:, p:], min(t - self.num_tokens, t // 2))
      size = state.size[:, p:, None]
      weight = size if self.weighted else jnp.ones_like(size)
      total = tome.merge(m, weight, "sum")

      def mean(v):
        w = weight.reshape(weight.shape[:2] + (1,) * (v.ndim - 2)).astype(v.dtype)
        tot = total.reshape(total.shape[:2] + (1,) * (v.ndim - 2)).astype(v.dtype)
        return tome.merge(m, v * w, "sum") / tot

      def fields(a, mode):
        rest = mean(a[:, p:]) if mode == "mean" else tome.merge(m, a[:, p:], mode)
        return jnp.concatenate([head(a), rest], axis=1)

      carry = dict(state.carry)
      for key, (value, mode) in state.carried_per_token().items():
        carry[key] = fields(value, mode)
      state = state.replace(
          x=fields(state.x, "mean"), ids=fields(state.ids, "keep"), carry=carry,
          size=jnp.concatenate([head(state.size), tome.merge(m, size, "sum")[..., 0]], axis=1),
          source=None if state.source is None else fields(state.source, "max"))
    return state, {}
