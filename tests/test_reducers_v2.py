"""Token-reduction contract v2: multi-stage reducers with carried arrays, float keep policies,
fresh block information after earlier reducers, the embedding-level stage, parameter naming,
the model context, scanned layers, checked gathers, learned tokens, and what reducers declare
to the trainer (sharding rules, layer-decay groups, rng streams).

Every number is checked against an independent numpy computation. Test reducers are
registered here under names starting with "test_v2_" (tests/test_reducers.py registers its own
in the same process).
"""
import re
from typing import Sequence, Tuple

import flax.linen as nn
import jax
from jax.experimental import checkify
import jax.numpy as jnp
from jax.sharding import PartitionSpec as PS
import numpy as np
import pytest

from vitoken.engine import sharding
from vitoken.models import attention, vit
from vitoken.models.reducers import base

IMAGES = jax.random.normal(jax.random.key(11), (2, 32, 32, 3))  # 4x4 grid of 8x8 patches
B, P, WIDTH, HEADS, HEAD_DIM = 2, 16, 192, 3, 64


def _model(**kw):
  return vit.Model(7, variant="Ti/8", depth=4, head_zeroinit=False, **kw)


# Eager: each op compiles once per shape and is reused by every test (token counts are kept
# to a few values: 17, 14, 12), which is cheaper than compiling every model as a whole.
def _init(model, **kw):
  return model.init(jax.random.key(0), IMAGES, **kw)


def _apply(model, variables, images=IMAGES, **kw):
  return model.apply(variables, images, **kw)


def _np(a):
  return np.asarray(a, np.float64)


# ---- test reducers --------------------------------------------------------------------------
@base.register("test_v2_stash")
class StashRestore(base.Reducer):
  """Stashes the tokens before block `stash` and adds them back (times a learned gain) after
  block `restore`: a per-token carry (merge "mean") and a global one ([B, C] mean)."""
  stash_layer: int = 0
  restore_layer: int = 0
  stages = (base.PRE_BLOCK, base.POST_BLOCK)
  changes_shape = False

  @classmethod
  def layer_settings(cls, depth, stash: int = 0, restore: int = 0):
    kw = {"stash_layer": stash, "restore_layer": restore}
    return {stash: dict(kw), restore: dict(kw)}

  @nn.compact
  def __call__(self, state, info, *, train=False):
    if info.stage == base.PRE_BLOCK and self.layer == self.stash_layer:
      glob = state.x.mean(axis=1)
      state = state.put(self.name, "tokens", state.x, per_token=True, merge="mean")
      state = state.put(self.name, "global", glob)
      return state, {"x": state.x, "global": glob, "source": state.source, "size": state.size}
    if info.stage == base.POST_BLOCK and self.layer == self.restore_layer:
      gain = self.param("gain", nn.initializers.constant(0.5), (), jnp.float32)
      stash, state = state.pop(self.name, "tokens")
      glob, state = state.pop(self.name, "global")
      aux = {"stash": stash, "global": glob, "x_before": state.x, "source": state.source,
             "size": state.size}
      return state.replace(x=state.x + gain * stash), aux
    return state, {}


@base.register("test_v2_soft_keep")
class SoftKeep(base.Reducer):
  """DynamicViT-style float keep policy from a learned per-position logit."""
  stages = (base.PRE_BLOCK,)
  changes_shape = False

  @nn.compact
  def __call__(self, state, info, *, train=False):
    logit = self.param("keep_logit", nn.initializers.normal(1.0), (state.num_tokens,), jnp.float32)
    policy = jnp.broadcast_to(jax.nn.sigmoid(logit), state.x.shape[:2])
    return state.replace(policy=policy), {"policy": policy}


@base.register("test_v2_prune")
class Prune(base.Reducer):
  """Keeps tokens `keep` (a fixed index list, prefix first) in the given order."""
  keep: Tuple[int, ...] = ()
  stages = (base.POST_ATTN,)

  @classmethod
  def layer_settings(cls, depth, layers: Sequence[int] = (1,), keep: Sequence[int] = ()):
    return {i: {"keep": tuple(keep)} for i in layers}

  @nn.compact
  def __call__(self, state, info, *, train=False):
    self.check_protected(state, len(self.keep))
    idx = jnp.broadcast_to(jnp.asarray(self.keep, jnp.int32), (state.x.shape[0], len(self.keep)))
    return state.gather(idx), {}


@base.register("test_v2_read_block")
class ReadBlock(base.Reducer):
  """Records the block information it is handed."""
  stages = (base.POST_ATTN,)
  needs = frozenset({base.KEYS_MEAN, base.CLS_ATTN})
  changes_shape = False

  default_layers = (1,)

  @nn.compact
  def __call__(self, state, info, *, train=False):
    return state, {"keys_mean": info.keys_mean, "cls_attn": info.cls_attn, "ids": state.ids}


@base.register("test_v2_read_block_post")
class ReadBlockPost(ReadBlock):
  stages = (base.POST_BLOCK,)


@base.register("test_v2_permute")
class Permute(base.Reducer):
  """Embedding level: reorders the patch tokens by `perm`, keeping the prefix in front."""
  perm: Tuple[int, ...] = ()
  stages = (base.PRE_POSEMB,)

  @classmethod
  def layer_settings(cls, depth, perm: Sequence[int] = ()):
    return {base.EMBED_LAYER: {"perm": tuple(perm)}}

  @nn.compact
  def __call__(self, state, info, *, train=False):
    p = state.num_prefix
    idx = np.concatenate([np.arange(p), p + np.asarray(self.perm)]).astype(np.int32)
    return state.gather(jnp.broadcast_to(idx, (state.x.shape[0], idx.size))), {}


@base.register("test_v2_mask_token")
class MaskToken(base.Reducer):
  """Embedding level (SimMIM): patches where inputs["mask"] is True become a learned token."""
  stages = (base.PRE_POSEMB,)

  @classmethod
  def layer_settings(cls, depth):
    return {base.EMBED_LAYER: {}}

  @nn.compact
  def __call__(self, state, info, *, train=False):
    tok = self.param("mask_token", nn.initializers.normal(0.5), (1, 1, state.x.shape[-1]),
                     jnp.float32)
    p = state.num_prefix
    patches = jnp.where(info.inputs["mask"][..., None], tok.astype(state.x.dtype), state.x[:, p:])
    return state.replace(x=jnp.concatenate([state.x[:, :p], patches], axis=1)), {}


@base.register("test_v2_record_x")
class RecordX(base.Reducer):
  stages = (base.PRE_BLOCK,)
  changes_shape = False

  default_layers = (0,)

  @nn.compact
  def __call__(self, state, info, *, train=False):
    return state, {"x": state.x, "ids": state.ids}


@base.register("test_v2_dense")
class DenseToy(base.Reducer):
  """A learned, shape-preserving reducer (x + proj(x)) after the attention of `layers`."""
  stages = (base.POST_ATTN,)
  changes_shape = False

  default_layers = (1,)

  @nn.compact
  def __call__(self, state, info, *, train=False):
    return state.replace(x=state.x + self.context.dense(state.x.shape[-1], name="proj")(state.x)), {}


@base.register("test_v2_ctx")
class ContextToy(base.Reducer):
  """Builds its layer from the model context; remembers the contexts it was given."""
  seen = []  # class-level side channel: the ModelContext of every call (static, not an array)
  stages = (base.PRE_BLOCK,)
  changes_shape = False

  default_layers = (1,)

  @nn.compact
  def __call__(self, state, info, *, train=False):
    type(self).seen.append(self.context)
    y = self.context.dense(self.context.width, name="proj")(state.x)
    return state.replace(x=state.x + y), {"y": y}


@base.register("test_v2_layer_loss")
class LayerLoss(base.Reducer):
  """Shape-preserving at every layer: loss = layer index; records layer, progress, step."""
  stages = (base.POST_ATTN,)
  changes_shape = False

  @classmethod
  def layer_settings(cls, depth):
    return {i: {} for i in range(depth)}

  @nn.compact
  def __call__(self, state, info, *, train=False):
    step = jnp.int32(-1) if info.step is None else jnp.asarray(info.step, jnp.int32)
    return state, {"losses": {"layer": jnp.asarray(info.layer, jnp.float32)},
                   "layer": jnp.asarray(info.layer, jnp.int32),
                   "progress": jnp.asarray(info.progress, jnp.float32), "step": step}


@base.register("test_v2_gather")
class GatherToy(base.Reducer):
  """Gathers fixed (possibly bad) token indices after the attention of layer 1."""
  indices: Tuple[int, ...] = ()
  stages = (base.POST_ATTN,)

  @classmethod
  def layer_settings(cls, depth, indices: Sequence[int] = ()):
    return {1: {"indices": tuple(indices)}}

  @nn.compact
  def __call__(self, state, info, *, train=False):
    idx = jnp.broadcast_to(jnp.asarray(self.indices, jnp.int32), (state.x.shape[0], len(self.indices)))
    return state.gather(idx), {}


@base.register("test_v2_embed_proj")
class EmbedProj(base.Reducer):
  """x + proj(x) at the embedding (and in the blocks of `layers`), with declared sharding."""
  stages = (base.PRE_POSEMB, base.PRE_BLOCK)
  changes_shape = False
  sharding_rules = ((r"proj/kernel$", (None, "tensor")),)

  @classmethod
  def layer_settings(cls, depth, layers: Sequence[int] = ()):
    return {base.EMBED_LAYER: {}, **{int(i): {} for i in layers}}

  @nn.compact
  def __call__(self, state, info, *, train=False):
    return state.replace(x=state.x + self.context.dense(state.x.shape[-1], name="proj")(state.x)), {}


@base.register("test_v2_embed_proj_head")
class EmbedProjHead(EmbedProj):
  layer_decay_group = "head"


# ---- numpy references -----------------------------------------------------------------------
def np_softmax_with_policy(logits, policy, query_offset=0, eps=1e-6):
  """DynamicViT's softmax_with_policy. logits [B, H, Nq, Nk], policy [B, Nk]."""
  nq, nk = logits.shape[-2:]
  eye = (np.arange(nq)[:, None] + query_offset == np.arange(nk)[None, :]).astype(np.float64)
  w = policy[:, None, None, :]
  w = w + (1.0 - w) * eye
  a = np.exp(logits - logits.max(-1, keepdims=True)) * w
  return (a + eps / nk) / (a.sum(-1, keepdims=True) + eps)


def np_layer_norm(x, scale, bias, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def np_tome_bipartite(metric, r):
  """Reference bipartite matching with one protected (class) token. metric [T, C].
  Returns (unm, src, dst, node_max) over the A (even) / B (odd) sets."""
  m = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
  a, b = m[::2], m[1::2]
  scores = a @ b.T
  scores[0, :] = -np.inf
  node_max, node_idx = scores.max(-1), scores.argmax(-1)
  edge = np.argsort(-node_max, kind="stable")
  return np.sort(edge[r:]), edge[:r], node_idx[edge[:r]], node_max


def np_patch_embed(images, kernel, bias, patch=8):
  b, h, w, c = images.shape
  gh, gw = h // patch, w // patch
  x = images.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * gw, patch * patch * c) @ kernel.reshape(-1, kernel.shape[-1]) + bias


# ---- 1. a two-stage reducer with carried arrays around ToMe ---------------------------------
@pytest.mark.parametrize("stash,restore,r", [
    (1, 1, [3, 2, 0, 0]),  # same layer: ToMe merges in between (at post_attn), sizes already != 1
    (0, 2, [0, 3, 0, 0]),  # stash, ToMe one layer later, restore after that
    (0, 3, [0, 3, 2, 0]),  # two merges between stash and restore (means must compose by size)
], ids=["same_layer", "across_layers", "two_merges"])
def test_stash_restore_carries_follow_tome_merges(stash, restore, r):
  model = _model(token_reduction=[
      {"method": "tome", "r": r, "trace_source": True},
      {"method": "test_v2_stash", "name": "stash", "stash": stash, "restore": restore}])
  variables = _init(model)
  logits, aux = _apply(model, variables, IMAGES)
  assert np.isfinite(logits).all()

  put = aux["reduction"][f"block_{stash:02d}/stash/pre_block"]
  got = aux["reduction"][f"block_{restore:02d}/stash/post_block"]
  s1, v, size1 = _np(put["source"]), _np(put["x"]), _np(put["size"])
  s2, size2 = _np(got["source"]), _np(got["size"])
  n_stash, n_restore = v.shape[1], s2.shape[1]
  assert n_restore == 17 - sum(r[:restore + 1]) and n_stash == 17 - sum(r[:stash])
  # Sources are 0/1 partitions of the 17 initial tokens; sizes are group sizes.
  for s, size in ((s1, size1), (s2, size2)):
    assert set(np.unique(s)) <= {0.0, 1.0}
    np.testing.assert_array_equal(s.sum(axis=1), 1.0)
    np.testing.assert_array_equal(s.sum(axis=2), size)
  # Expected: spread each stashed token over the initial tokens it held, then average over
  # each restore-time group = the size-weighted mean of the stashed tokens merged together.
  spread = np.einsum("bjm,bjc->bmc", s1, v)
  want = np.einsum("bfm,bmc->bfc", s2, spread) / s2.sum(-1, keepdims=True)
  np.testing.assert_allclose(_np(got["stash"]), want, rtol=1e-5, atol=1e-5)
  if stash == restore:  # sizes at stash time were not all 1, so the weighting mattered
    assert size1.max() > 1
  # The global carry is untouched, bit for bit.
  np.testing.assert_array_equal(np.asarray(got["global"]), np.asarray(put["global"]))
  np.testing.assert_allclose(_np(put["global"]), v.mean(axis=1), rtol=1e-5, atol=1e-6)
  # The restore added gain * stash to the block output.
  gain = variables["params"][f"block_{restore:02d}"]["stash"]["gain"]
  assert float(gain) == 0.5
  np.testing.assert_allclose(_np(aux["blocks"][f"block_{restore:02d}"]),
                             _np(got["x_before"]) + 0.5 * _np(got["stash"]), rtol=1e-6, atol=1e-6)
  # The restore popped both carries; nothing else is left over either.
  state = aux["state"]
  assert state.carry == {} and state.per_token == ()
  if stash != restore:
    assert "stash" not in variables["params"][f"block_{stash:02d}"]


# ---- 2. float keep policy -------------------------------------------------------------------
def test_float_policy_reaches_attention_and_has_a_gradient():
  model = _model(token_reduction={"method": "test_v2_soft_keep", "layers": [1]},
                 return_attention=True)
  variables = _init(model)
  logits, aux = _apply(model, variables, IMAGES)
  params = variables["params"]
  policy = _np(aux["reduction"]["block_01/test_v2_soft_keep"]["policy"])
  np.testing.assert_allclose(
      policy, np.broadcast_to(1 / (1 + np.exp(-_np(params["block_01"]["test_v2_soft_keep"]["keep_logit"]))),
                              (B, 17)), rtol=1e-6)
  np.testing.assert_array_equal(aux["state"].policy, policy.astype(np.float32))
  # Layer 1's attention probabilities equal numpy's softmax_with_policy from its input.
  blk = params["block_01"]
  y = np_layer_norm(_np(aux["blocks"]["block_00"]), _np(blk["norm1"]["scale"]), _np(blk["norm1"]["bias"]))
  qkv = np.einsum("bnc,cthd->bnthd", y, _np(blk["attn"]["qkv"]["kernel"])) + _np(blk["attn"]["qkv"]["bias"])
  q, k = qkv[:, :, 0], qkv[:, :, 1]
  logits_np = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HEAD_DIM)
  np.testing.assert_allclose(_np(aux["attention"]["block_01"]), np_softmax_with_policy(logits_np, policy),
                             rtol=1e-4, atol=1e-6)
  # Layer 0 has no policy: plain softmax (rows sum to one exactly, up to float).
  np.testing.assert_allclose(_np(aux["attention"]["block_00"]).sum(-1), 1.0, rtol=1e-5)

  def loss(p):
    return model.apply({"params": p}, IMAGES)[0].sum()
  grad = jax.jit(jax.grad(loss))(params)["block_01"]["test_v2_soft_keep"]["keep_logit"]
  grad = np.asarray(grad)
  assert grad.shape == (17,) and np.isfinite(grad).all()
  assert np.count_nonzero(grad) == 17 and np.abs(grad).max() > 1e-6, grad


@pytest.mark.parametrize("nq,query_offset", [(6, 0), (1, 0), (2, 3)])
def test_attention_probs_with_policy_matches_numpy(nq, query_offset):
  rng = np.random.RandomState(0)
  nk = 6
  q = rng.randn(2, nq, 2, 4).astype(np.float32)
  k = rng.randn(2, nk, 2, 4).astype(np.float32)
  policy = rng.rand(2, nk).astype(np.float32)
  policy[:, 2] = 0.0
  got = attention.attention_probs(jnp.asarray(q), jnp.asarray(k), policy=jnp.asarray(policy),
                                  query_offset=query_offset)
  logits = np.einsum("bqhd,bkhd->bhqk", _np(q), _np(k)) / 2.0
  want = np_softmax_with_policy(logits, _np(policy), query_offset)
  np.testing.assert_allclose(_np(got), want, rtol=1e-5, atol=1e-8)
  # Key 2 has policy 0: every other query gives it only eps/N over its normaliser (tiny);
  # its own query (if any) still attends to it with full weight.
  others = [i for i in range(nq) if i + query_offset != 2]
  assert np.all(_np(got)[:, :, others, 2] < 1e-5)
  if 0 <= 2 - query_offset < nq:
    assert np.all(_np(got)[:, :, 2 - query_offset, 2] > 1e-3)


def test_dropped_token_still_attends_to_itself():
  rng = np.random.RandomState(1)
  n = 5
  q = jnp.asarray(rng.randn(1, n, 1, 8), jnp.float32)
  k = jnp.asarray(rng.randn(1, n, 1, 8), jnp.float32)
  probs = _np(attention.attention_probs(q, k, policy=jnp.zeros((1, n))))[0, 0]
  # Every key dropped: each query keeps only itself, a = exp(l_ii - max_k l_ik) (the max runs
  # over all keys, as in DynamicViT), and every other key gets (eps/N) / (a + eps).
  logits = np.einsum("qd,kd->qk", _np(q)[0, :, 0], _np(k)[0, :, 0]) / np.sqrt(8)
  a = np.exp(np.diag(logits) - logits.max(-1))
  eps = attention.POLICY_EPS
  np.testing.assert_allclose(np.diag(probs), (a + eps / n) / (a + eps), rtol=1e-6)
  assert np.diag(probs).min() > 1 - 1e-5
  off = probs * (1 - np.eye(n))
  np.testing.assert_allclose(off, (eps / n / (a + eps))[:, None] * (1 - np.eye(n)), rtol=1e-4)
  assert off.max() < 1e-5


def test_gap_pooling_weights_tokens_by_policy_and_size():
  model = _model(pool_type="gap", class_token=True,
                 token_reduction={"method": "test_v2_soft_keep", "layers": [2]})
  variables = _init(model)
  _, aux = _apply(model, variables, IMAGES)
  state = aux["state"]
  assert state.num_prefix == 1  # gap pooling skips the class token
  w = (_np(state.size) * _np(state.policy))[:, 1:]
  want = (_np(aux["encoded"])[:, 1:] * w[..., None]).sum(1) / w.sum(1, keepdims=True)
  np.testing.assert_allclose(_np(aux["pre_logits"]), want, rtol=1e-5, atol=1e-6)


# ---- 3. fresh block information after an earlier reducer ------------------------------------
KEEP = (0, 16, 14, 12, 10, 8, 6, 4, 2, 1, 3, 5, 7, 9)  # class token, evens reversed, some odds


@pytest.mark.parametrize("reader", ["test_v2_read_block", "test_v2_read_block_post"])
def test_second_reducer_reads_block_info_for_its_own_tokens(reader):
  alone = _model(token_reduction={"method": reader, "layers": [1]})
  after = _model(token_reduction=[{"method": "test_v2_prune", "layers": [1], "keep": KEEP},
                                  {"method": reader, "layers": [1]}])
  variables = _init(alone)
  _, aux_alone = _apply(alone, variables, IMAGES)
  _, aux_after = _apply(after, variables, IMAGES)
  ref, got = aux_alone["reduction"][f"block_01/{reader}"], aux_after["reduction"][f"block_01/{reader}"]
  assert ref["keys_mean"].shape == (B, 17, HEAD_DIM) and got["keys_mean"].shape == (B, len(KEEP), HEAD_DIM)
  np.testing.assert_array_equal(got["ids"], np.broadcast_to(KEEP, (B, len(KEEP))))
  np.testing.assert_allclose(_np(got["keys_mean"]), _np(ref["keys_mean"])[:, list(KEEP)], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(_np(got["cls_attn"]), _np(ref["cls_attn"])[:, list(KEEP)], rtol=1e-6, atol=1e-9)
  # The block's info carries are gone once the block is done.
  assert aux_after["state"].carry == {}


def test_tome_after_a_pruning_reducer_merges_the_pruned_tokens():
  """ToMe straight after a pruner at the same stage: it matches on the keys of the tokens it
  is given (the pruned ones, in their new order) and its token count follows."""
  reader = _model(token_reduction={"method": "test_v2_read_block", "layers": [1]})
  model = _model(token_reduction=[{"method": "test_v2_prune", "layers": [1], "keep": KEEP},
                                  {"method": "tome", "r": [0, 2, 0, 0]}])
  variables = _init(reader)  # neither the pruner nor ToMe has parameters
  _, aux = _apply(model, variables)
  assert [aux["blocks"][f"block_{i:02d}"].shape[1] for i in range(4)] == [17, 12, 12, 12]
  keys = _np(_apply(reader, variables)[1]["reduction"]["block_01/test_v2_read_block"]["keys_mean"])
  keys = keys[:, list(KEEP)]
  state = aux["state"]
  ids_in = np.asarray(KEEP)
  for b in range(B):
    unm, _, dst, node_max = np_tome_bipartite(keys[b], 2)
    ranked = np.sort(node_max)[::-1]
    assert ranked[1] - ranked[2] > 1e-4  # no near-tie at the cut (the matching is well defined)
    a_ids, b_ids = ids_in[::2], ids_in[1::2]
    want_ids = np.concatenate([a_ids[unm], b_ids])
    want_size = np.concatenate([np.ones(len(unm)), 1 + np.bincount(dst, minlength=len(b_ids))])
    np.testing.assert_array_equal(state.ids[b], want_ids)
    np.testing.assert_array_equal(state.size[b], want_size)
  assert state.carry == {}


# ---- 4. the stage between patch embedding and position embedding ----------------------------
PERM = (5, 0, 15, 3, 9, 12, 1, 7, 14, 2, 11, 8, 4, 13, 6, 10)


@pytest.mark.parametrize("class_token", [False, True])
@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
def test_permuting_patches_before_posemb_keeps_positions_with_ids(class_token, posemb):
  kw = dict(pool_type="gap", class_token=class_token, posemb=posemb)
  plain = _model(**kw)
  permuted = _model(**kw, token_reduction={"method": "test_v2_permute", "perm": PERM})
  variables = _init(plain)
  logits, _ = _apply(plain, variables, IMAGES)
  logits_p, aux = _apply(permuted, variables, IMAGES)
  p = int(class_token)
  np.testing.assert_array_equal(aux["state"].ids,
                                np.broadcast_to(np.r_[np.arange(p), p + np.asarray(PERM)], (B, P + p)))
  np.testing.assert_allclose(logits_p, logits, rtol=1e-4, atol=2e-5)
  # What a model that added positions by slot would compute: the plain model on an image
  # whose patches are permuted. It differs, so the equality above is not vacuous.
  patches = IMAGES.reshape(B, 4, 8, 4, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(B, P, 8, 8, 3)
  shuffled = patches[:, np.asarray(PERM)].reshape(B, 4, 4, 8, 8, 3).transpose(0, 1, 3, 2, 4, 5)
  wrong, _ = _apply(plain, variables, shuffled.reshape(IMAGES.shape))
  assert np.abs(np.asarray(wrong) - np.asarray(logits)).max() > 1e-3


def test_mask_token_replaces_masked_patches_before_posemb():
  mask = np.random.RandomState(3).rand(B, P) < 0.4
  assert mask.any() and not mask.all()
  model = _model(token_reduction=[{"method": "test_v2_mask_token", "name": "simmim"},
                                  {"method": "test_v2_record_x", "layers": [0]}])
  variables = _init(model, inputs={"mask": jnp.asarray(mask)})
  params = variables["params"]
  assert set(params["simmim"]) == {"mask_token"}  # top level, named by the entry
  _, aux = _apply(model, variables, IMAGES, inputs={"mask": jnp.asarray(mask)})
  x0 = _np(aux["reduction"]["block_00/test_v2_record_x"]["x"])
  emb = np_patch_embed(_np(IMAGES), _np(params["embedding"]["kernel"]), _np(params["embedding"]["bias"]))
  tok = _np(params["simmim"]["mask_token"])[0]
  pos = _np(params["pos_embedding"])[0]
  want_patches = np.where(mask[..., None], tok, emb) + pos
  np.testing.assert_allclose(x0[:, 1:], want_patches, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(x0[:, 0], np.broadcast_to(_np(params["cls"])[0, 0], (B, WIDTH)))
  # Masked tokens no longer depend on the image.
  _, aux2 = _apply(model, variables, IMAGES * 3.0 + 1.0, inputs={"mask": jnp.asarray(mask)})
  x0b = _np(aux2["reduction"]["block_00/test_v2_record_x"]["x"])
  np.testing.assert_allclose(x0b[:, 1:][mask], x0[:, 1:][mask], rtol=1e-6, atol=1e-6)
  assert np.abs(x0b[:, 1:][~mask] - x0[:, 1:][~mask]).max() > 1e-2


# ---- 5. parameter names follow the config entry ---------------------------------------------
def test_reducer_params_are_named_by_entry_not_position():
  toy = {"method": "test_v2_dense"}
  configs = [[toy], [{"method": "identity"}, toy], [{"method": "tome", "r": [0, 3, 0, 0]}, toy]]
  found = []
  for spec in configs:
    params = _init(_model(token_reduction=spec))["params"]
    assert set(params["block_01"]["test_v2_dense"]) == {"proj"}
    assert not any("test_v2_dense" in params[f"block_{i:02d}"] for i in (0, 2, 3))
    found.append(params["block_01"]["test_v2_dense"]["proj"])
  for other in found[1:]:  # same path -> same initialisation, bit for bit
    jax.tree.map(np.testing.assert_array_equal, other, found[0])
  named = _init(_model(token_reduction=[{"method": "identity"}, {**toy, "name": "gate"}]))["params"]
  assert "gate" in named["block_01"] and "test_v2_dense" not in named["block_01"]


def test_same_method_twice_at_a_layer_needs_distinct_names():
  toy = {"method": "test_v2_dense"}
  with pytest.raises(ValueError, match="two token_reduction entries named 'test_v2_dense' act at layer 1"):
    base.build_plan([toy, toy], 4)
  with pytest.raises(ValueError, match="two token_reduction entries named 'g' act at layer 1"):
    base.build_plan([{**toy, "name": "g"}, {**toy, "name": "g", "layers": [2, 1]}], 4)
  params = _init(_model(token_reduction=[{**toy, "name": "g1"}, {**toy, "name": "g2"}]))["params"]
  k1, k2 = params["block_01"]["g1"]["proj"]["kernel"], params["block_01"]["g2"]["proj"]["kernel"]
  assert k1.shape == k2.shape and not np.array_equal(k1, k2)
  with pytest.raises(ValueError, match="two token_reduction entries named 'test_v2_permute' act at the embedding"):
    base.build_plan([{"method": "test_v2_permute"}, {"method": "test_v2_permute"}], 4)


@pytest.mark.parametrize("spec,pattern", [
    ({"method": "test_v2_dense", "name": "attn"}, "entry name 'attn' is taken by the block"),
    ({"method": "test_v2_dense", "name": "mlp"}, "entry name 'mlp' is taken by the block"),
    ({"method": "test_v2_embed_proj", "name": "head"}, "entry name 'head' is taken by the ViT"),
    ({"method": "test_v2_embed_proj", "name": "block_02"}, "entry name 'block_02' is taken by the ViT"),
    ({"method": "test_v2_dense", "name": "a/b"}, "entry name 'a/b' must be an identifier"),
    ({"method": "test_v2_dense", "name": "block"}, "entry name 'block' is taken by the block"),
    ({"method": "test_v2_dense", "name": "Dropout_0"}, "entry name 'Dropout_0' is taken by the block"),
    ({"method": "test_v2_embed_proj", "name": "Dense_1"}, "entry name 'Dense_1' is taken by the ViT"),
])
def test_entry_names_may_not_collide_with_model_names(spec, pattern):
  with pytest.raises(ValueError, match=pattern):
    _init(_model(token_reduction=spec))


# ---- 6. the model context -------------------------------------------------------------------
def test_context_builds_layers_in_the_model_dtypes():
  ContextToy.seen.clear()
  model = _model(dtype=jnp.bfloat16, layer_norm_eps=1e-5, gelu_approximate=True, num_registers=1,
                 token_reduction={"method": "test_v2_ctx"})
  variables = _init(model)
  _, aux = _apply(model, variables, IMAGES)
  assert aux["reduction"]["block_01/test_v2_ctx"]["y"].dtype == jnp.bfloat16
  proj = variables["params"]["block_01"]["test_v2_ctx"]["proj"]
  assert proj["kernel"].dtype == jnp.float32 and proj["bias"].dtype == jnp.float32
  assert proj["kernel"].shape == (WIDTH, WIDTH)
  assert ContextToy.seen and all(c == model.context() for c in ContextToy.seen)
  ctx = ContextToy.seen[-1]
  assert (ctx.width, ctx.num_heads, ctx.mlp_dim, ctx.depth) == (WIDTH, HEADS, 768, 4)
  assert ctx.layer_norm_eps == 1e-5 and ctx.gelu_approximate is True and ctx.num_prefix == 2
  assert ctx.dtype == jnp.bfloat16 and ctx.param_dtype == jnp.float32


# ---- 7. scanned layers ----------------------------------------------------------------------
def test_layer_index_losses_and_progress_under_scan():
  name = "test_v2_layer_loss"
  scanned, unscanned = (_model(scan=s, token_reduction={"method": name}) for s in (True, False))
  v_scan, v_plain = _init(scanned), _init(unscanned)
  _, aux = _apply(scanned, v_scan, IMAGES, step=7, progress=0.25)
  assert set(aux["losses"]) == {f"blocks/{name}/layer"}
  np.testing.assert_allclose(aux["losses"][f"blocks/{name}/layer"], float(sum(range(4))))
  rec = aux["reduction"][f"blocks/{name}"]
  np.testing.assert_array_equal(rec["layer"], np.arange(4))
  np.testing.assert_array_equal(rec["progress"], np.full(4, 0.25, np.float32))
  np.testing.assert_array_equal(rec["step"], np.full(4, 7))

  _, aux_u = _apply(unscanned, v_plain, IMAGES, step=7, progress=0.25)
  assert set(aux_u["losses"]) == {f"block_{i:02d}/{name}/layer" for i in range(4)}
  for i in range(4):
    assert float(aux_u["losses"][f"block_{i:02d}/{name}/layer"]) == i
    rec_u = aux_u["reduction"][f"block_{i:02d}/{name}"]
    assert int(rec_u["layer"]) == i and float(rec_u["progress"]) == 0.25 and int(rec_u["step"]) == 7

  # Defaults: progress 1.0, no step.
  _, aux_d = _apply(scanned, v_scan, IMAGES)
  np.testing.assert_array_equal(aux_d["reduction"][f"blocks/{name}"]["progress"], np.ones(4, np.float32))
  np.testing.assert_array_equal(aux_d["reduction"][f"blocks/{name}"]["step"], np.full(4, -1))
  _, aux_ud = _apply(unscanned, v_plain, IMAGES)
  assert float(aux_ud["reduction"][f"block_02/{name}"]["progress"]) == 1.0


@base.register("test_v2_two_stage_loss")
class TwoStageLoss(base.Reducer):
  """Reports a loss of the same name at both of its stages: 1 before the block, 2 after."""
  stages = (base.PRE_BLOCK, base.POST_BLOCK)
  changes_shape = False

  default_layers = (1,)

  def __call__(self, state, info, *, train=False):
    return state, {"losses": {"l": jnp.float32(1.0 if info.stage == base.PRE_BLOCK else 2.0)}}


def test_losses_of_every_stage_of_a_reducer_reach_the_trainer():
  model = _model(token_reduction={"method": "test_v2_two_stage_loss"})
  _, aux = _apply(model, _init(model))
  total = sum(float(v) for k, v in aux["losses"].items() if k.startswith("block_01/test_v2_two_stage_loss/"))
  assert total == 3.0, aux["losses"]
  assert set(aux["losses"]) == {"block_01/test_v2_two_stage_loss/pre_block/l",
                                "block_01/test_v2_two_stage_loss/post_block/l"}


# ---- 8. checked gathers ---------------------------------------------------------------------
GOOD = tuple(range(13)) + (16,)  # 14 tokens; the last slot gets the bad index below


def _gather_model(last):
  return _model(token_reduction={"method": "test_v2_gather", "indices": GOOD[:-1] + (last,)})


@pytest.fixture(scope="module")
def gather_variables():
  return _init(_gather_model(16))


@pytest.mark.parametrize("bad", [17, -1, 100])
def test_run_checked_raises_on_out_of_range_token_gathers(gather_variables, bad):
  with pytest.raises(checkify.JaxRuntimeError, match="token gather index out of range for 17 tokens"):
    base.run_checked(_gather_model(bad).apply, gather_variables, IMAGES)
  assert not base._DEBUG["checked_gathers"]  # the switch is restored after an error too


def test_run_checked_passes_good_gathers_unchanged(gather_variables):
  model = _gather_model(16)
  logits, aux = base.run_checked(model.apply, gather_variables, IMAGES)
  logits_u, _ = _apply(model, gather_variables)
  np.testing.assert_allclose(logits, logits_u, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(aux["state"].ids, np.broadcast_to(GOOD, (B, 14)))
  assert not base._DEBUG["checked_gathers"]


def test_unchecked_gathers_are_silent(gather_variables):
  """Documents the unchecked behaviour: index == T fills NaN (floats) and INT32_MIN (ids);
  a negative index wraps around numpy-style (here -1 silently takes the last token)."""
  logits, aux = _apply(_gather_model(17), gather_variables)
  x = np.asarray(aux["blocks"]["block_01"])
  assert np.isnan(x[:, 13]).all() and np.isfinite(x[:, :13]).all()
  np.testing.assert_array_equal(aux["state"].ids[:, 13], np.iinfo(np.int32).min)
  assert np.isnan(np.asarray(logits)).all()  # the class token attends to the NaN token
  _, aux_neg = _apply(_gather_model(-1), gather_variables)
  _, aux_good = _apply(_gather_model(16), gather_variables)
  np.testing.assert_array_equal(aux_neg["state"].ids, aux_good["state"].ids)
  np.testing.assert_array_equal(aux_neg["state"].x, aux_good["state"].x)


# ---- 9. learned tokens (combine) ------------------------------------------------------------
def _combine_state(rng, carries=(("avg", "mean"), ("tot", "sum"))):
  x = jnp.asarray(rng.randn(2, 6, 4), jnp.float32)
  state = base.TokenState.create(x, num_prefix=1, grid=(1, 5), track_source=True)
  state = state.replace(size=jnp.asarray(rng.rand(2, 6) * 3 + 0.5, jnp.float32))
  values = {"avg": rng.randn(2, 6, 3), "tot": rng.randn(2, 6), "mx": rng.randn(2, 6),
            "kp": rng.randn(2, 6)}
  for key, mode in carries:
    state = state.put("m", key, jnp.asarray(values[key], jnp.float32), per_token=True, merge=mode)
  return state.put("m", "glob", jnp.asarray(rng.randn(2, 5), jnp.float32))


def test_combine_makes_learned_tokens():
  rng = np.random.RandomState(0)
  state = _combine_state(rng)
  w = rng.rand(2, 3, 5).astype(np.float32)
  new_x = rng.randn(2, 3, 4).astype(np.float32)
  out = state.combine(jnp.asarray(w), jnp.asarray(new_x))
  size, src = _np(state.size), _np(state.source)
  new_size = np.einsum("bst,bt->bs", w, size[:, 1:])
  np.testing.assert_array_equal(out.x, np.concatenate([np.asarray(state.x)[:, :1], new_x], 1))
  np.testing.assert_array_equal(out.ids, np.broadcast_to([0, -1, -1, -1], (2, 4)))
  assert base.LEARNED_ID == -1 and out.num_prefix == 1
  np.testing.assert_allclose(out.size, np.concatenate([size[:, :1], new_size], 1), rtol=1e-6)
  np.testing.assert_allclose(out.source, np.concatenate([src[:, :1], np.einsum("bst,btm->bsm", w, src[:, 1:])], 1),
                             rtol=1e-6)
  avg, tot = _np(state.get("m", "avg")), _np(state.get("m", "tot"))
  want_avg = np.einsum("bst,bt,btc->bsc", w, size[:, 1:], avg[:, 1:]) / new_size[..., None]
  np.testing.assert_allclose(out.get("m", "avg"), np.concatenate([avg[:, :1], want_avg], 1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.get("m", "tot"), np.concatenate([tot[:, :1], np.einsum("bst,bt->bs", w, tot[:, 1:])], 1),
                             rtol=1e-5, atol=1e-6)
  assert out.get("m", "glob") is state.get("m", "glob")  # global carries untouched
  assert dict(out.per_token) == {"m/avg": "mean", "m/tot": "sum"}


@pytest.mark.parametrize("mode,key", [("keep", "kp"), ("max", "mx")])
def test_combine_refuses_carries_it_cannot_follow(mode, key):
  rng = np.random.RandomState(1)
  state = _combine_state(rng, carries=(("avg", "mean"), (key, mode)))
  w, x = jnp.ones((2, 2, 5)), jnp.zeros((2, 2, 4))
  with pytest.raises(ValueError, match=f"carry 'm/{key}' merges by '{mode}'"):
    state.combine(w, x)
  _, popped = state.pop("m", key)
  assert popped.combine(w, x).num_tokens == 3
  with pytest.raises(ValueError, match="mask or a keep policy"):
    popped.replace(policy=jnp.ones((2, 6))).combine(w, x)


# ---- 10. declared sharding rules and layer-decay groups ------------------------------------
@pytest.mark.parametrize("method,group", [("test_v2_embed_proj", "stem"), ("test_v2_embed_proj_head", "head")])
def test_reducer_sharding_rules_and_layer_decay_groups(method, group):
  model = _model(token_reduction={"method": method, "name": "adapter", "layers": [1]})
  rules = model.sharding_rules()  # the reducer's, then the ViT's own
  assert rules[1:] == vit.SHARDING_RULES and tuple(rules[0][1]) == (None, "tensor")
  pattern = rules[0][0]
  params = _init(model)["params"]
  paths = ["/".join(str(getattr(k, "key", k)) for k in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  assert {p for p in paths if re.search(pattern, p)} == {"adapter/proj/kernel", "block_01/adapter/proj/kernel"}
  for other in ("block_00/mlp/fc1/kernel", "adapter/proj/bias", "other_adapter/proj/kernel",
                "block_01/other/proj/kernel", "block_01/adapter/proj/kernel_x"):
    assert not re.search(pattern, other), other
  # The trainer's rule matching (sharding.spec_for: first rule found by re.search) places it,
  # with the reducer's rules ahead of the ViT's own.
  mesh = sharding.make_mesh({"data": 4, "tensor": 2})
  all_rules = tuple(rules)
  assert sharding.spec_for("adapter/proj/kernel", (WIDTH, WIDTH), mesh, all_rules) == PS(None, "tensor")
  assert sharding.spec_for("opt_state/0/mu/block_01/adapter/proj/kernel", (WIDTH, WIDTH), mesh,
                           all_rules) == PS(None, "tensor")
  assert sharding.spec_for("blocks/adapter/proj/kernel", (4, WIDTH, WIDTH), mesh,
                           all_rules) == PS(None, None, "tensor")
  assert sharding.spec_for("adapter/proj/bias", (WIDTH,), mesh, all_rules) == PS(None)
  groups = model.layer_decay_groups()
  assert groups["adapter"] == group and groups["embedding"] == "stem" and groups["head"] == "head"
  assert set(params) - set(groups) == {f"block_{i:02d}" for i in range(4)}


# ---- 11. rng streams ------------------------------------------------------------------------
def test_rng_streams_are_declared_by_the_configured_reducers():
  rand = _model(token_reduction={"method": "tome", "r": [0, 3, 0, 0], "matching": "random"})
  assert rand.rng_streams() == frozenset({"reduction"})
  assert _model(token_reduction={"method": "tome", "r": [0, 3, 0, 0]}).rng_streams() == frozenset()
  assert _model(token_reduction={"method": "tome", "matching": "kth"}).rng_streams() == frozenset()
  assert _model().rng_streams() == frozenset()
  variables = _init(rand)  # init draws "reduction" from the params key
  ids = [np.asarray(_apply(rand, variables, IMAGES, rngs={"reduction": jax.random.key(s)})[1]["state"].ids)
         for s in (0, 1)]
  assert ids[0].shape == (B, 14) and not np.array_equal(ids[0], ids[1])
  with pytest.raises(Exception, match="reduction"):
    _apply(rand, variables, IMAGES)


@base.register("test_v2_anchored_rule")
class AnchoredRule(base.Reducer):
  """Declares one rule anchored at its own top (^) and one that may match at any depth."""
  stages = (base.POST_BLOCK,)
  changes_shape = False
  sharding_rules = ((r"^proj/kernel$", ("fsdp", None)), (r"bias$", ("tensor",)))

  default_layers = (0,)

  def __call__(self, state, info, *, train=False):
    return state, {}


def test_reducer_rules_anchored_with_a_caret_mean_the_reducers_top():
  (top, top_spec), (anywhere, _) = base.build_plan({"method": "test_v2_anchored_rule", "name": "ad"},
                                                   4).sharding_rules()
  assert top_spec == ("fsdp", None)
  assert re.search(top, "params/block_00/ad/proj/kernel")
  assert not re.search(top, "params/block_00/ad/sub/proj/kernel")
  assert re.search(anywhere, "opt_state/0/mu/block_00/ad/sub/bias")
  assert not re.search(anywhere, "params/block_00/bad/bias")
