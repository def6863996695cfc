"""Token pruning: top-k by class attention, EViT and DynamicViT.

- `topk` (training-free): at each chosen block, between the attention and the MLP, keeps the
  k image tokens that receive the most class-token attention (averaged over heads), in
  descending order of attention; k is a count or `ceil(keep_rate * tokens present)`.
- `evit` (Liang et al., ICLR 2022; youweiliang/evit): the same selection with
  `ceil(keep_rate * (N - 1))` tokens kept (no pruning at all when that is every token) and,
  with `fuse_token`, the inattentive tokens summed into one extra token weighted by their
  un-normalised class attention: the sequence becomes [class, kept, fused], then the MLP.
  A fused token is an image token at later pruning blocks. The reference's training schedule
  (keep everything, then a cosine from 1 down to ρ) runs as a few static phases (`shrink`).
- `dynamicvit` (Rao et al., NeurIPS 2021; raoyongming/DynamicViT): before each chosen block a
  predictor scores every image token. Training keeps all tokens and multiplies Gumbel-softmax
  hard keep decisions through the stages into the state's keep `policy` (the attention then
  stops dropped tokens from influencing the others; each still attends to itself), and adds
  the ratio loss; inference keeps the `int(initial tokens * ρ^i)` best-scored tokens with a
  batched gather, so the speedup is real. Its distillation losses come from the
  `distillation` task (a dense teacher; see `configs/token_pruning.py`).

Kept and fused tokens are gathered (static counts per layer), so merging may follow: ToMe
after EViT or top-k merges the survivors, sizes carried. Each pruning layer records the ids
of the tokens it keeps in `aux["reduction"]` (`vitoken.visualize.survivors_image` draws them);
`trace_source=True` also keeps `TokenState.source`, so pictures tell fused patches from pruned.
"""
import math
from typing import Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitoken.errors import ConfigError
from vitoken.models.reducers import base


def default_layers(depth: int) -> Tuple[int, ...]:
  """Blocks 3, 6 and 9 of 12 (the papers' setting), scaled to other depths."""
  return tuple(sorted({depth // 4, depth // 2, (3 * depth) // 4}))


def check_keep_rate(rate, method: str) -> float:
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < rate <= 1.0:
    raise ConfigError(f"{method}: keep_rate must be in (0, 1], got {rate!r}")
  return float(rate)


def _layers(depth: int, layers: Optional[Sequence[int]], method: str) -> Tuple[int, ...]:
  chosen = default_layers(depth) if layers is None else tuple(int(i) for i in layers)
  if len(set(chosen)) != len(chosen):
    raise ConfigError(f"{method}: layers {list(chosen)} repeat a block")
  return chosen


def keep_rate_at(progress: float, rate: float, start: float, end: float) -> float:
  """EViT's `adjust_keep_rate` in fractions of training: 1 before `start`, then a cosine from
  1 down to `rate` at `end`, then `rate`."""
  if progress < start:
    return 1.0
  if progress >= end:
    return rate
  return rate + (1.0 - rate) * (math.cos((progress - start) / (end - start) * math.pi) + 1) * 0.5


def select_by_score(score, k: int):
  """The k highest-scoring tokens, in descending order of score: indices [B, k]."""
  return jax.lax.top_k(jax.lax.stop_gradient(score).astype(jnp.float32), k)[1]


def prune(state: base.TokenState, idx, *, fuse_weights=None) -> base.TokenState:
  """Keeps the protected tokens and the unprotected tokens `idx` [B, K] (indices among the
  unprotected ones, in that order); with `fuse_weights` [B, T] over all unprotected tokens,
  appends one token that is their weighted sum over the tokens not kept."""
  p, b = state.num_prefix, state.x.shape[0]
  keep = jnp.concatenate([jnp.broadcast_to(jnp.arange(p, dtype=idx.dtype), (b, p)), idx + p], axis=1)
  if fuse_weights is None:
    return state.gather(keep)
  rows = jnp.arange(b)[:, None]
  dropped = jnp.ones(fuse_weights.shape, fuse_weights.dtype).at[rows, idx].set(0)
  w = fuse_weights * dropped
  fused = jnp.einsum("bt,btc->bc", w.astype(state.x.dtype), state.x[:, p:])[:, None]
  return state.combine(w[:, None, :], fused, keep=keep)


@base.register("topk")
class TopK(base.Reducer):
  """Keeps the tokens with the most class attention (see the module docstring)."""
  keep_rate: Optional[float] = None
  k: Optional[int] = None
  fuse_token: bool = False

  stages = (base.POST_ATTN,)
  needs = frozenset({base.CLS_ATTN})

  @classmethod
  def layer_settings(cls, depth: int, keep_rate: Optional[float] = None,
                     k: Union[None, int, Sequence[int]] = None,
                     layers: Optional[Sequence[int]] = None, trace_source: bool = False):
    chosen = _layers(depth, layers, "topk")
    if (keep_rate is None) == (k is None):
      raise ConfigError("topk: give exactly one of keep_rate (a fraction of the tokens present) "
                        "and k (a token count)")
    if keep_rate is not None:
      return {i: {"keep_rate": check_keep_rate(keep_rate, "topk")} for i in chosen}
    counts = list(k) if isinstance(k, (list, tuple)) else [k] * len(chosen)
    if len(counts) != len(chosen):
      raise ConfigError(f"topk: {len(counts)} counts k for {len(chosen)} layers {list(chosen)}")
    if any(isinstance(c, bool) or int(c) != c or c < 1 for c in counts):
      raise ConfigError(f"topk: k must be positive integers, got {k!r}")
    return {i: {"k": int(c)} for i, c in zip(chosen, counts)}

  def check_class_token(self):
    if self.context is not None and self.context.class_token is False:
      raise ConfigError(
          f"{self.where}: {self.method_name()} ranks tokens by the class token's attention, but "
          "this ViT has no class token; use dynamicvit (a learned score) or tome (merging), "
          "or give the ViT a class token (class_token=True)")

  def rate(self, train: bool, phase: Optional[float] = None) -> float:
    return self.keep_rate

  def keep_count(self, n: int, train: bool, phase: Optional[float] = None) -> int:
    if self.k is None:
      return math.ceil(self.rate(train, phase) * n)  # the reference's ceil(keep_rate * (N - 1))
    if self.k > n:
      raise ConfigError(f"{self.where}: {self.method_name()} k={self.k} but only {n} image "
                        "tokens reach this layer")
    return self.k

  def __call__(self, state, info, *, train=False):
    self.check_class_token()
    p = state.num_prefix
    n = state.num_tokens - p
    k = self.keep_count(n, train, info.phase)
    if k >= n:
      return state, {}  # every token stays: no reordering and no fused token (the reference)
    attn = info.cls_attn[:, p:]
    idx = select_by_score(attn, k)
    state = prune(state, idx, fuse_weights=attn.astype(jnp.float32) if self.fuse_token else None)
    return state, {"ids": state.ids}


@base.register("evit")
class EViT(TopK):
  """EViT: top-k by class attention with the inattentive tokens fused (module docstring).

  `shrink=(start, end)`: in training, keep every token until `start` (a fraction of training),
  then a cosine from 1 down to `keep_rate` at `end`, as the reference's `adjust_keep_rate`
  (its ImageNet setting: epochs 10 to 110 of 300, so (1/30, 11/30)). Token counts are static
  per compiled program, so the cosine runs in `shrink_levels` equal phases at its mid-phase
  values, one train-step compile each; evaluation always uses `keep_rate`.
  """
  keep_rate: Optional[float] = 0.7
  fuse_token: bool = True
  shrink: Optional[Tuple[float, float]] = None
  shrink_levels: int = 4

  @classmethod
  def layer_settings(cls, depth: int, keep_rate: float = 0.7, layers: Optional[Sequence[int]] = None,
                     fuse_token: bool = True, shrink: Optional[Sequence[float]] = None,
                     shrink_levels: int = 4, trace_source: bool = False):
    settings = {"keep_rate": check_keep_rate(keep_rate, "evit"), "fuse_token": bool(fuse_token)}
    if shrink is not None:
      start, end = (float(v) for v in shrink)
      if not 0.0 <= start < end <= 1.0:
        raise ConfigError(f"evit: shrink must be (start, end) fractions of training with "
                          f"0 <= start < end <= 1, got {tuple(shrink)}")
      if isinstance(shrink_levels, bool) or int(shrink_levels) != shrink_levels or shrink_levels < 1:
        raise ConfigError(f"evit: shrink_levels must be a positive integer, got {shrink_levels!r}")
      settings.update(shrink=(start, end), shrink_levels=int(shrink_levels))
    return {i: dict(settings) for i in _layers(depth, layers, "evit")}

  @classmethod
  def phase_starts(cls, kwargs):
    if kwargs.get("shrink") is None:
      return ()
    (start, end), levels = kwargs["shrink"], kwargs.get("shrink_levels", 4)
    return tuple(start + (end - start) * i / levels for i in range(levels + 1))

  def rate(self, train: bool, phase: Optional[float] = None) -> float:
    """The keep rate in the schedule phase starting at `phase` (`BlockInfo.phase`, None:
    the final one)."""
    if not train or self.shrink is None or phase is None:
      return self.keep_rate
    start, end = self.shrink
    if phase < start or phase >= end:
      return keep_rate_at(phase, self.keep_rate, start, end)
    width = (end - start) / self.shrink_levels
    # Rounded so float noise (0.7500000000000001) never adds a token through the ceil.
    return round(keep_rate_at(phase + width / 2, self.keep_rate, start, end), 9)


class KeepPredictor(nn.Module):
  """DynamicViT's PredictorLG: LayerNorm, Linear, GELU; the first half of the channels kept
  per token and the second half replaced by its policy-weighted mean over the tokens; then
  an MLP (C/2, C/4, 2) to keep/drop log-probabilities [B, T, 2] (index 0: keep)."""
  dtype: Optional[jnp.dtype] = None
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, policy):
    c = x.shape[-1]
    dense = lambda features, name: nn.Dense(
        features, kernel_init=nn.initializers.truncated_normal(0.02), dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)
    gelu = lambda v: nn.gelu(v, approximate=False)  # torch's nn.GELU
    # torch's LayerNorm default eps (the reference's predictor), not the ViT's 1e-6.
    x = nn.LayerNorm(1e-5, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
    x = gelu(dense(c, "in_proj")(x))
    w = policy.astype(x.dtype)[..., None]
    local, glob = x[..., :c // 2], x[..., c // 2:]
    glob = (glob * w).sum(axis=1, keepdims=True) / w.sum(axis=1, keepdims=True)
    x = jnp.concatenate([local, jnp.broadcast_to(glob, local.shape[:2] + glob.shape[2:])], axis=-1)
    x = gelu(dense(c // 2, "out_1")(x))
    x = gelu(dense(c // 4, "out_2")(x))
    return jax.nn.log_softmax(dense(2, "out_3")(x).astype(jnp.float32), axis=-1)


def gumbel_keep(log_probs, rng, tau: float = 1.0):
  """torch's `F.gumbel_softmax(log_probs, hard=True)[..., 0]`: a hard 0/1 keep decision whose
  gradient is the soft sample's (straight-through)."""
  g = jax.random.gumbel(rng, log_probs.shape, jnp.float32)
  soft = jax.nn.softmax((log_probs + g) / tau, axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), soft.shape[-1], dtype=soft.dtype)
  return (hard - jax.lax.stop_gradient(soft) + soft)[..., 0]


@base.register("dynamicvit")
class DynamicViT(base.Reducer):
  """DynamicViT's prediction module before one block (see the module docstring)."""
  keep: float = 0.7  # this stage's target: the kept fraction of the initial image tokens
  ratio_weight: float = 2.0 / 3  # this stage's share of the ratio loss weight

  stages = (base.PRE_BLOCK,)

  @classmethod
  def layer_settings(cls, depth: int, keep_rate: float = 0.7, layers: Optional[Sequence[int]] = None,
                     ratio_weight: float = 2.0, trace_source: bool = False):
    rate = check_keep_rate(keep_rate, "dynamicvit")
    chosen = sorted(_layers(depth, layers, "dynamicvit"))  # ρ, ρ², ... in block order
    if ratio_weight < 0:
      raise ConfigError(f"dynamicvit: ratio_weight must be >= 0, got {ratio_weight}")
    # Hierarchical targets ρ, ρ², ρ³, ...; the ratio loss is averaged over the stages.
    return {layer: {"keep": rate ** (i + 1), "ratio_weight": float(ratio_weight) / len(chosen)}
            for i, layer in enumerate(chosen)}

  @nn.compact
  def __call__(self, state, info, *, train=False):
    p = state.num_prefix
    b, n = state.x.shape[0], state.num_tokens - p
    prev = jnp.ones((b, n), jnp.float32) if state.policy is None else state.policy[:, p:]
    ctx = self.context or base.ModelContext(width=state.x.shape[-1], num_heads=1, mlp_dim=1, depth=1)
    log_probs = KeepPredictor(ctx.dtype, ctx.param_dtype, name="predictor")(state.x[:, p:], prev)
    if train:
      decision = gumbel_keep(log_probs, self.make_rng("reduction")) * prev
      prefix = jnp.ones((b, p), decision.dtype)
      state = state.replace(policy=jnp.concatenate([prefix, decision], axis=1))
      kept = decision.mean(axis=1)
      ratio = self.ratio_weight * jnp.mean(jnp.square(kept - self.keep))
      return state, {"losses": {"ratio": ratio}, "keep_fraction": kept}
    initial = state.grid.num_patches
    k = int(initial * self.keep)  # the reference's int(init_n * token_ratio[i])
    if k > n:
      raise ConfigError(f"{self.where}: dynamicvit keeps int({initial} x {self.keep:.4g}) = {k} "
                        f"tokens but only {n} reach this layer; an earlier reducer removed more")
    if k < 1:
      raise ConfigError(f"{self.where}: dynamicvit would keep no token (int({initial} x "
                        f"{self.keep:.4g}) = 0); raise keep_rate or use fewer stages")
    state = prune(state, select_by_score(log_probs[..., 0], k))
    return state, {"ids": state.ids}
