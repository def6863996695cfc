"""TempMe: temporal token merging (Shen et al., "TempMe: Video Temporal Token Merging for
Efficient Text-Video Retrieval", ICLR 2025).

Follows the reference code (LunarShen/TempMe: `tvr/models/modeling.py`, `module_tome_patch.py`,
`module_tome_merge.py`; its LoRA adapters are not part of it):

- the frames run through the image blocks separately: from the first block each time slice is
  a sequence of its own, with a copy of the class token in front (folded into the batch);
- before the first merge block, ToMe merges `r` tokens per frame after attention (the
  reference's `tome_r`);
- at each merge block, runs of `groups[k]` consecutive frame sequences become one sequence, the
  class tokens first and then the patches in frame order; a learned per-frame position
  embedding (zeros at first; one vector per sequence entering the block) is added to every
  token of the frame; `int(N * shares[0])` of the N regrouped tokens merge before attention,
  the similarity being the tokens themselves (before the position embedding), not the keys;
  then `int(N' * shares[1])` merge after attention on the keys;
- after the merge blocks, `int(N * shares[1])` merge after attention at every block (at a merge
  block whose group is one frame nothing merges before attention, and, as the reference counts,
  the share after is of the N tokens less the `int(N * shares[0])` it would have merged);
- every merge is ToMe's bipartite matching with the class tokens protected: with the class
  tokens set aside, A is the even patches when their count is even and the odd ones when it is
  odd (ToMe's alternation over the whole sequence), the unmerged A tokens keep their order,
  sizes add and the merge is size-weighted; every count is capped at half the unprotected
  tokens; proportional attention is on (the reference's `tome_propattn`);
- the class tokens never merge. After the last block the ViT joins each clip's sequences,
  and a class-token-pooled ViT returns the mean of the unit-normalised class embeddings (the
  reference's video feature, at the tokens' mean length; `vit._mean_direction`).

Defaults are the reference script's (`main.py`): merge blocks 8, 9, 10 of 12 with frame groups
2, 2, 3 (12 frames -> 6 -> 3 -> 1), shares 30% and 10%, r = 2. The number of sequences per
example and of class tokens per sequence change, which the reducer declares (`regroups`) and
the token state records (`TokenState.sequences`, `num_prefix`), all static.
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitoken.errors import ConfigError
from vitoken.models.reducers import base, tome


def merge_count(state: base.TokenState, share: float) -> int:
  """The reference's count: `int(tokens * share)` of the sequence's tokens (class tokens
  included), capped at half of the unprotected ones."""
  n, p = state.num_tokens, state.num_prefix
  return min(int(n * share), (n - p) // 2)


def merge_tokens(state: base.TokenState, metric, r: int, impl: str = "scatter"):
  """ToMe's bipartite merge of `r` tokens per sequence, the protected tokens kept in front."""
  if r <= 0:
    return state
  m = tome.bipartite_soft_matching(jax.lax.stop_gradient(metric), r, state.num_prefix)
  return tome.merge_state(m, state, impl).replace(slices=1)


def check_settings(depth: int, merge_layers, groups, shares, r):
  layers_, groups_ = [int(v) for v in merge_layers], [int(v) for v in groups]
  if len(layers_) != len(groups_):
    raise ConfigError(f"tempme: merge_layers {list(merge_layers)} and groups {list(groups)} "
                      "need one frame group per merge layer")
  if any(not 0 <= i < depth for i in layers_) or layers_ != sorted(set(layers_)):
    raise ConfigError(f"tempme: merge_layers must be increasing block indices of the ViT's "
                      f"{depth} layers (0..{depth - 1}), got {list(merge_layers)}")
  if any(g < 1 for g in groups_) or any(int(g) != g for g in groups):
    raise ConfigError(f"tempme: groups must be positive integers, got {list(groups)}")
  if len(shares) != 2 or any(not 0.0 <= float(s) < 1.0 for s in shares):
    raise ConfigError(f"tempme: shares must be two fractions in [0, 1) (merged before attention "
                      f"at a merge layer, merged after attention), got {list(shares)}")
  if isinstance(r, bool) or int(r) != r or r < 0:
    raise ConfigError(f"tempme: r must be a non-negative integer, got {r!r}")
  return layers_, groups_


@base.register("tempme")
class TempMe(base.Reducer):
  """One block's part of TempMe (see the module docstring)."""
  split: bool = False  # frames become sequences of their own before this block (the first)
  group: int = 1  # frame sequences joined into one before this block
  share_before: float = 0.0  # share of the joined tokens merged before attention
  frame_pos: bool = True  # add the learned per-frame position embedding when joining
  r: int = 0  # tokens per sequence merged after attention (blocks before the first join)
  share_after: float = 0.0  # share merged after attention (from the first join on)
  merge_impl: str = "scatter"

  stages = (base.PRE_BLOCK, base.POST_ATTN)
  needs = frozenset({base.KEYS_MEAN})
  regroups = True
  keeps_slices = True  # it sets the slices itself

  @classmethod
  def layer_settings(cls, depth: int, merge_layers: Sequence[int] = (8, 9, 10),
                     groups: Sequence[int] = (2, 2, 3), shares: Sequence[float] = (0.3, 0.1),
                     r: int = 2, frame_pos: bool = True, prop_attn: bool = True,
                     trace_source: bool = False, merge_impl: str = "scatter"):
    layers_, groups_ = check_settings(depth, merge_layers, groups, shares, r)
    if merge_impl not in tome.MERGE_IMPLS:
      raise ConfigError(f"tempme: merge_impl must be one of {tome.MERGE_IMPLS}, got {merge_impl!r}")
    out = {}
    for i in range(depth):
      kw = {"merge_impl": merge_impl}
      if i == 0:
        kw["split"] = True
      if i in layers_:
        kw.update(group=groups_[layers_.index(i)], share_before=float(shares[0]),
                  frame_pos=bool(frame_pos), share_after=float(shares[1]))
      elif not layers_ or i < layers_[0]:
        kw["r"] = int(r)
      else:
        kw["share_after"] = float(shares[1])
      out[i] = kw
    return out

  @classmethod
  def plan_flags(cls, settings):
    return {"proportional_attention": bool(settings.get("prop_attn", True)),
            "track_source": bool(settings.get("trace_source", False)),
            "rng_streams": frozenset()}

  @nn.compact
  def __call__(self, state, info, *, train=False):
    if info.stage == base.PRE_BLOCK:
      return self._before_attention(state), {}
    n, p = state.num_tokens, state.num_prefix
    if self.r:
      r = self.r
    elif self.group == 1 and self.share_before:
      # A merge layer whose group is one frame: the reference counts the share it would have
      # merged before attention (but merges none) and takes the share after of the rest.
      before = merge_count(state, self.share_before)
      r = min(int((n - before) * self.share_after), (n - p - before) // 2)
    else:
      r = merge_count(state, self.share_after)
    r = min(r, (n - p) // 2)
    return merge_tokens(state, info.keys_mean, r, self.merge_impl), {}

  def _before_attention(self, state):
    if self.split:
      ctx = self.context
      if ctx is not None and ctx.class_token is not None and ctx.num_prefix > int(ctx.class_token):
        raise ConfigError(f"{self.where}: tempme copies the class token into every frame; a ViT "
                          "with register tokens is not supported")
      state = state.split_slices()
    if self.group == 1:
      return state
    s = state.sequences
    if s % self.group:
      raise ConfigError(f"{self.where}: tempme groups={self.group} does not divide the {s} frames "
                        "(sequences) per clip that reach this block; the frame groups must "
                        "divide the time slices")
    metric = jax.lax.stop_gradient(state.x)
    state = state.put(self.name, "metric", metric, per_token=True, merge="keep")
    grouped = state.group_sequences(self.group)
    r = merge_count(grouped, self.share_before)
    if r > 0 and self.frame_pos:
      pos = self.param("frame_pos", nn.initializers.zeros, (s, state.x.shape[-1]),
                       self.context.param_dtype if self.context else jnp.float32)
      rows = state.x.shape[0]
      per_row = jnp.tile(pos, (rows // s, 1)).astype(state.x.dtype)  # example-major rows
      state = state.replace(x=state.x + per_row[:, None, :])
      grouped = state.group_sequences(self.group)
    metric, grouped = grouped.pop(self.name, "metric")
    return merge_tokens(grouped, metric, r, self.merge_impl) if r > 0 else grouped
