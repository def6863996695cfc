"""TESTA and TempMe against torch transcriptions of their reference code, written here:

- TESTA (RenShuhuai-Andy/TESTA): `testa/merge.py` `bipartite_soft_matching` (frame and patch
  merging) and `merge_wavg`, the bookkeeping of `testa/patch/timesformer.py`'s `TESTABlock`;
- TempMe (LunarShen/TempMe): `tvr/models/module_tome_merge.py` `bipartite_soft_matching`
  (its A/B split depends on the class tokens' parity) and `merge_wavg`, the regrouping of
  `tvr/models/module_tome_patch.py` `ToMeBlock.forward`, and the token-count bookkeeping of
  `tvr/models/modeling.py` `get_video_feat`.

Random inputs (odd and even counts), indices compared exactly, values to 1e-5.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vitoken.errors import ConfigError
from vitoken.models import vit
from vitoken.models.patches import PatchGrid
from vitoken.models.reducers import base, tempme, testa, tome

ATOL = 1e-5


def _t(a):
  return torch.from_numpy(np.asarray(a).copy())


def _np(a):
  return np.asarray(a.detach().numpy() if isinstance(a, torch.Tensor) else a)


# ================================ TESTA reference (torch) ===================================
def ref_testa_matching(metric, r, class_token=False, distill_token=False, merging_type="patch"):
  """testa/merge.py `bipartite_soft_matching`, line for line (frame: metric [B, L, T, C],
  patch: [B, T, L, C]); also returns (unm, src, dst) indices [.., n, k]."""
  protected = 0
  if class_token:
    protected += 1
  if distill_token:
    protected += 1
  t = metric.shape[-2]
  r = min(r, (t - protected) // 2)
  if r <= 0:
    return (lambda x, mode=None: x), None
  with torch.no_grad():
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if merging_type == "patch" and class_token:
      scores[..., 0, :] = -math.inf
    if merging_type == "patch" and distill_token:
      scores[..., :, 0] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    if merging_type == "frame":  # aggregate frames based on patch voting
      n = metric.size(-3)
      node_idx, _ = node_idx.mode(dim=-2, keepdim=True)
      node_idx = node_idx.repeat(1, n, 1)
      node_max, _ = node_max.mode(dim=-2, keepdim=True)
      node_max = node_max.repeat(1, n, 1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token or merging_type == "frame":
      unm_idx = unm_idx.sort(dim=-2)[0]

  def merge(x, mode="mean"):
    src, dst = x[..., ::2, :], x[..., 1::2, :]
    B, n, t1, c = src.shape
    unm = src.gather(dim=-2, index=unm_idx.expand(B, n, t1 - r, c))
    src = src.gather(dim=-2, index=src_idx.expand(B, n, r, c))
    dst = dst.scatter_reduce(-2, dst_idx.expand(B, n, r, c), src, reduce=mode)
    if distill_token:
      return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
    return torch.cat([unm, dst], dim=-2)

  return merge, (unm_idx[..., 0], src_idx[..., 0], dst_idx[..., 0])


def ref_merge_wavg(merge, x, size=None):
  """testa/merge.py and tvr/models/module_tome_merge.py `merge_wavg` (identical)."""
  if size is None:
    size = torch.ones_like(x[..., 0, None])
  x = merge(x * size, mode="sum")
  size = merge(size, mode="sum")
  return x / size, size


def ref_testa_counts(slices, patches, frames_r, patches_r, class_token=True):
  """Tokens after each block of timesformer.py's `TESTABlock` (divided attention,
  "frame&patch"): `T = xt.size(1) // L` after the frame merge (r capped in merge.py at
  (T - protected) // 2, protected = 1 with the class token), `L = x.size(1)` after the patch
  merge (capped at (1 + L - 1) // 2); the class token in front."""
  counts = []
  for fr, pr in zip(frames_r, patches_r):
    slices -= max(0, min(fr, (slices - int(class_token)) // 2))
    patches -= max(0, min(pr, patches // 2))
    counts.append(1 + slices * patches)
  return counts


# ---- testa.mode == torch.mode --------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["int", "float"])
@pytest.mark.parametrize("shape,axis", [((4, 6, 5), 1), ((6, 2, 3), 0)])
def test_mode_is_torch_mode(dtype, shape, axis):
  rng = np.random.default_rng(sum(shape) + axis)
  # Few distinct values: ties in frequency are frequent (and some rows all distinct).
  v = rng.integers(0, 3, size=shape)
  v = v.astype(np.int32) if dtype == "int" else (v * 0.25 - 0.1).astype(np.float32)
  flat = np.moveaxis(v, axis, -1).reshape(-1, shape[axis]).copy()
  flat[0] = np.arange(shape[axis])[::-1]  # all distinct: the smallest
  v = np.moveaxis(flat.reshape(np.moveaxis(v, axis, -1).shape), -1, axis)
  want = torch.mode(_t(v), dim=axis).values
  got = testa.mode(jnp.asarray(v), axis)
  np.testing.assert_array_equal(np.asarray(got), _np(want))
  # The tie rule matters in these inputs: the most frequent smallest is not always the max.
  assert not np.array_equal(np.asarray(got), v.max(axis=axis))


# ---- 1. the frame step ---------------------------------------------------------------------
def _frame_case(b, t, n, c, p, seed, unit_sizes=False):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, p + t * n, 6)).astype(np.float32)
  size = rng.uniform(0.5, 3.0, size=(b, p + t * n)).astype(np.float32)
  if unit_sizes:
    size[:] = 1
  metric = rng.normal(size=(b, t, n, c)).astype(np.float32)  # [B, T, L, C]
  grid = PatchGrid((2, 4, 4), (t, 1, n))
  state = base.TokenState.create(jnp.asarray(x), num_prefix=p, grid=grid, track_source=True)
  state = state.replace(size=jnp.asarray(size))
  return x, size, metric, state


def _check_frame_step(x, size, metric, state, r, class_token):
  b, t, n, _ = metric.shape
  p = state.num_prefix
  # The reference's layout: positions-major, x [B, L, T, C] (timesformer.py: "b (l t) d ->
  # b l t d"), metric [B, L, T, C], size [B, L, T, 1] (the class token's removed).
  to_ref = lambda a: _t(a[:, p:].reshape((b, t, n) + a.shape[2:])).transpose(1, 2)
  merge, (unm, src, dst) = ref_testa_matching(_t(metric).transpose(1, 2), r, class_token,
                                              merging_type="frame")
  # The vote is one per slice: every position carries the same choice.
  for idx in (unm, src, dst):
    assert torch.equal(idx, idx[:, :1].expand_as(idx))
  m = testa.frame_matching(jnp.asarray(metric), r)
  np.testing.assert_array_equal(np.asarray(m.unm_idx), _np(unm[:, 0]))
  np.testing.assert_array_equal(np.asarray(m.src_idx), _np(src[:, 0]))
  np.testing.assert_array_equal(np.asarray(m.dst_idx), _np(dst[:, 0]))
  np.testing.assert_array_equal(np.asarray(m.a_idx[0]), np.arange(0, t, 2))
  np.testing.assert_array_equal(np.asarray(m.b_idx[0]), np.arange(1, t, 2))

  got = testa.merge_slices(m, state)
  want_x, want_size = ref_merge_wavg(merge, to_ref(x), to_ref(size)[..., None])
  t2 = t - r
  assert got.slices == t2 and got.num_tokens == p + t2 * n
  from_got = lambda a: np.swapaxes(np.asarray(a)[:, p:].reshape((b, t2, n) + a.shape[2:]), 1, 2)
  dx = np.abs(from_got(got.x) - _np(want_x)).max()
  ds = np.abs(from_got(got.size) - _np(want_size)[..., 0]).max()
  assert dx < ATOL and ds < ATOL, (dx, ds)
  np.testing.assert_array_equal(np.asarray(got.x[:, :p]), x[:, :p])  # prefix untouched
  np.testing.assert_array_equal(np.asarray(got.size[:, :p]), size[:, :p])
  # Token order: the unmerged A (even) slices in order, then every B (odd) slice; ids are
  # the destination's.
  for i in range(b):
    order = [2 * int(u) for u in _np(unm[i, 0])] + list(range(1, t, 2))
    assert order == sorted(order[:len(order) - t // 2]) + list(range(1, t, 2))
    ids = np.concatenate([np.arange(p)] + [p + s * n + np.arange(n) for s in order])
    np.testing.assert_array_equal(np.asarray(got.ids[i]), ids)
  # Sources: the reference merge ("amax", as merge.py's `merge_source`) of one-hot rows over
  # the initial tokens, in its own layout.
  eye = np.eye(p + t * n, dtype=np.float32)[None].repeat(b, 0)
  want_src = merge(to_ref(eye), mode="amax")
  np.testing.assert_array_equal(from_got(got.source), _np(want_src))
  np.testing.assert_array_equal(np.asarray(got.source[:, :p]), eye[:, :p])
  return dx, ds


@pytest.mark.parametrize("b,t,n,c,p,r,class_token", [
    (2, 4, 6, 8, 1, 1, True),
    (2, 5, 7, 8, 1, 2, True),
    (1, 7, 5, 4, 0, 3, False),
    (3, 6, 9, 8, 2, 2, False),
    (2, 8, 3, 5, 1, 1, True),  # several unmerged slices: their order matters
    (2, 7, 4, 6, 0, 1, False),
])
def test_testa_frame_step_is_the_reference(b, t, n, c, p, r, class_token):
  x, size, metric, state = _frame_case(b, t, n, c, p, seed=t * 10 + n)
  _check_frame_step(x, size, metric, state, r, class_token)
  x, size, metric, state = _frame_case(b, t, n, c, p, seed=t * 10 + n + 1, unit_sizes=True)
  _check_frame_step(x, size, metric, state, r, class_token)


def _tie_metric():
  """T=4 slices (A = 0, 2; B = 1, 3), L=6 positions, C=4, cosines exact in float32: the B
  slices are e0 (slice 1) and e1 (slice 3) everywhere. Slice 0's positions vote 0,0,1,1,0,1
  (a 3:3 tie: the mode takes B 0) with best similarities .8,.8,.8,.8,.6,.6 (mode .8, min .6);
  slice 2's vote 1,1,1,1,0,0 with 1,1,1,1,0,0 (mode 1, min 0)."""
  m = np.zeros((4, 6, 4), np.float32)
  m[1, :, 0] = 1
  m[3, :, 1] = 1
  m[0] = [[4, 3, 0, 0], [4, 3, 0, 0], [3, 4, 0, 0], [3, 4, 0, 0], [3, 0, 4, 0], [0, 3, 4, 0]]
  m[2, :4, 1] = 1
  m[2, 4:, 2] = 1
  rng = np.random.default_rng(0)
  other = rng.normal(size=(4, 6, 4)).astype(np.float32)  # a second clip: random
  return np.stack([m, other])


@pytest.mark.parametrize("r,src,dst,unm", [(1, [1], [1], [0]), (2, [1, 0], [1, 0], [])])
def test_testa_frame_vote_ties_follow_torch_mode(r, src, dst, unm):
  metric = _tie_metric()
  x, size, _, state = _frame_case(2, 4, 6, 4, 1, seed=5)
  m = testa.frame_matching(jnp.asarray(metric), r)
  # Hand-derived: slice 2 (score 1) merges first, into slice 3; slice 0 (score .8, the mode
  # of its similarities, not their min .6) into slice 1 (the 3:3 vote goes to the lower).
  assert np.asarray(m.src_idx[0]).tolist() == src
  assert np.asarray(m.dst_idx[0]).tolist() == dst
  assert np.asarray(m.unm_idx[0]).tolist() == unm
  _check_frame_step(x, size, metric, state, r, class_token=False)


# ---- 2. the patch step ---------------------------------------------------------------------
@pytest.mark.parametrize("b,t,n,c,r,cls", [
    (2, 3, 8, 8, 3, True),
    (2, 4, 7, 8, 3, True),
    (1, 2, 9, 8, 4, False),
    (2, 5, 11, 6, 5, False),
])
def test_testa_patch_step_is_the_reference(b, t, n, c, r, cls):
  rng = np.random.default_rng(b * 100 + t * 10 + n)
  p = int(cls)
  x = rng.normal(size=(b, p + t * n, 6)).astype(np.float32)
  size = rng.uniform(0.5, 3.0, size=(b, p + t * n)).astype(np.float32)
  keys = rng.normal(size=(b, p + t * n, c)).astype(np.float32)
  state = base.TokenState.create(jnp.asarray(x), num_prefix=p, grid=PatchGrid((1, 2, 2), (t, 1, n)))
  state = state.replace(size=jnp.asarray(size))
  got = testa.merge_within_slices(state, jnp.asarray(keys), r)

  # The reference (timesformer.py): each slice is [cls, its patches] ("b (l t) d -> (b t) l d"
  # then the class token in front), merged as "b t l d" with the class token protected, and
  # the class token dropped again ([:, 1:]).
  def per_slice(a):
    tail = a[:, p:].reshape((b, t, n) + a.shape[2:])
    head = np.broadcast_to(a[:, None, :p], (b, t, p) + a.shape[2:])
    return _t(np.concatenate([head, tail], axis=2))

  merge, (unm, src, dst) = ref_testa_matching(per_slice(keys), r, class_token=cls)
  want_x, want_size = ref_merge_wavg(merge, per_slice(x), per_slice(size)[..., None])
  n2 = n - r
  assert got.num_tokens == p + t * n2 and got.slices == t and got.num_prefix == p
  tails = lambda a: np.asarray(a)[:, p:].reshape((b, t, n2) + a.shape[2:])
  dx = np.abs(tails(got.x) - _np(want_x)[:, :, p:]).max()
  ds = np.abs(tails(got.size) - _np(want_size)[:, :, p:, 0]).max()
  assert dx < ATOL and ds < ATOL, (dx, ds)
  np.testing.assert_array_equal(np.asarray(got.x[:, :p]), x[:, :p])
  # Order and ids: per slice the unmerged A tokens (sorted with a class token, by score
  # without, as merge.py), then the B tokens.
  for i in range(b):
    for s in range(t):
      pos = np.arange(p + n)
      a_pos, b_pos = pos[::2], pos[1::2]
      out = np.concatenate([a_pos[_np(unm[i, s])], b_pos])[p:]
      np.testing.assert_array_equal(tails(got.ids)[i, s], p + s * n + out - p)
      if cls:
        assert _np(unm[i, s])[0] == 0  # the class token stays, first


@pytest.mark.parametrize("frames,patches,t,n,cls", [(2, 3, 5, 7, True), (1, 3, 3, 9, False)])
def test_testa_reducer_is_frame_then_patch_step(frames, patches, t, n, cls):
  """The reducer at a block: the frame step on the block's keys, the keys merged like the
  tokens (size-weighted), then the patch step on them (the reference recomputes its keys in
  the spatial attention; vitoken's joint attention has one set)."""
  b, c, p = 2, 8, int(cls)
  rng = np.random.default_rng(t + n)
  x = rng.normal(size=(b, p + t * n, 6)).astype(np.float32)
  keys = rng.normal(size=(b, p + t * n, c)).astype(np.float32)
  state = base.TokenState.create(jnp.asarray(x), num_prefix=p, grid=PatchGrid((1, 2, 2), (t, 1, n)))
  info = base.BlockInfo(layer=1, stage=base.POST_ATTN, keys_mean=jnp.asarray(keys))
  got, _ = testa.TESTA(layer=1, frames=frames, patches=patches).apply({}, state, info)

  to_ref = lambda a: _t(a[:, p:].reshape((b, t, n) + a.shape[2:])).transpose(1, 2)
  merge, _ = ref_testa_matching(to_ref(keys), frames, cls, merging_type="frame")
  fx, fsize = ref_merge_wavg(merge, to_ref(x))
  fkeys, _ = ref_merge_wavg(merge, to_ref(keys))
  t2 = t - frames
  # Patch step: slices [cls, patches] ("b l t d -> b t l d").
  def per_slice(tail, head):
    tail = tail.transpose(1, 2)
    return torch.cat([head[:, None].expand(b, t2, p, tail.shape[-1]), tail], dim=2)

  size2 = torch.cat([torch.ones(b, t2, p, 1), fsize.transpose(1, 2)], dim=2)
  merge, _ = ref_testa_matching(per_slice(fkeys, _t(keys[:, :p])), patches, class_token=cls)
  want_x, _ = ref_merge_wavg(merge, per_slice(fx, _t(x[:, :p])), size2)
  n2 = n - min(patches, n // 2)
  assert got.slices == t2 and got.num_tokens == p + t2 * n2
  np.testing.assert_allclose(np.asarray(got.x[:, p:]).reshape(b, t2, n2, 6),
                             _np(want_x[:, :, p:]), atol=ATOL)
  assert not got.carry and not got.per_token  # its carried keys are gone


# ---- 3. TESTA in the ViT ---------------------------------------------------------------------
def _testa_vit(**settings):
  return vit.VisionTransformer(num_classes=5, patch_size=(2, 8, 8), width=32, depth=4, num_heads=2,
                               mlp_dim=64, token_reduction={"method": "testa", **settings})


CLIPS = np.random.default_rng(0).normal(size=(2, 8, 32, 32, 3)).astype(np.float32)


def _block_counts(model, clips):
  """Tokens per sequence after each block, and sequences per example (shapes only)."""
  variables = jax.eval_shape(model.init, jax.random.key(0), clips)
  _, aux = jax.eval_shape(model.apply, variables, clips)
  blocks = [aux["blocks"][k] for k in sorted(aux["blocks"])]
  return [a.shape[1] for a in blocks], [a.shape[0] // clips.shape[0] for a in blocks], aux


@pytest.mark.parametrize("frames,patches,want", [
    (1, 4, [37, 17, 5, 3]),
    ([1, 0, 1, 0], [2, 3, 0, 1], [43, 34, 23, 21]),
    (2, 0, [33, 17, 17, 17]),
    ([0, 0, 2], 5, [45, 25, 7, 5]),
])
def test_testa_token_counts_in_a_video_vit(frames, patches, want):
  counts, seqs, aux = _block_counts(_testa_vit(frames=frames, patches=patches), CLIPS)
  assert counts == want and seqs == [1] * 4  # 4 slices x 16 patches + the class token: 65
  f = frames if isinstance(frames, list) else [frames] * 4
  q = patches if isinstance(patches, list) else [patches] * 4
  f, q = f + [0] * (4 - len(f)), q + [0] * (4 - len(q))
  # The reference's bookkeeping with the frame cap at half the slices (T // 2); the reference
  # itself counts its class token there ((T - 1) // 2: no frame merges with 2 slices left).
  assert ref_testa_counts(4, 16, f, q, class_token=False) == want
  if frames == 1:
    assert ref_testa_counts(4, 16, f, q, class_token=True) == [37, 17, 9, 5]
  assert aux["state"].num_prefix == 1


@pytest.mark.parametrize("settings,match", [
    ({"frames": 3}, r"frames=3 but 4 time slices"),
    ({"frames": [1, 2]}, r"frames=2 but 3 time slices"),
    ({"frames": -1}, r"testa frames must be non-negative"),
    ({"patches": -2}, r"testa patches must be non-negative"),
    ({"patches": [1, 1, 1, 1, 1]}, r"testa patches has 5 entries"),
    ({"layers": [1, 4]}, r"testa layers \[4\] are outside"),
    ({"merge_impl": "dense"}, r"merge_impl"),
])
def test_testa_errors_name_the_setting(settings, match):
  with pytest.raises(ConfigError, match=match):
    _block_counts(_testa_vit(**settings), CLIPS)


# ================================ TempMe reference (torch) ==================================
def ref_tempme_matching(metric, r, cls_num, r_f):
  """tvr/models/module_tome_merge.py `bipartite_soft_matching`, line for line (metric [n, t, C]);
  also returns (unm, src, dst) indices into its A/B sets of the patches."""
  metric = metric[:, cls_num:, :]
  if r <= 0:
    return (lambda x, mode=None: x), None
  with torch.no_grad():
    metric = metric / metric.norm(dim=-1, keepdim=True)
    if cls_num % 2 == 0:
      a, b = metric[..., ::2, :], metric[..., 1::2, :]
    else:
      a, b = metric[..., 1::2, :], metric[..., ::2, :]
    scores = a @ b.transpose(-1, -2)
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    unm_idx = unm_idx.sort(dim=1)[0]

  def merge(x, mode="mean"):
    x_cls = x[..., :cls_num, :]
    x_patch = x[..., cls_num:, :]
    if cls_num % 2 == 0:
      src, dst = x_patch[..., ::2, :], x_patch[..., 1::2, :]
    else:
      dst, src = x_patch[..., ::2, :], x_patch[..., 1::2, :]
    n, t1, c = src.shape
    unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
    src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
    dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
    return torch.cat([x_cls, unm, dst], dim=1)

  return merge, (unm_idx[..., 0], src_idx[..., 0], dst_idx[..., 0])


def ref_tempme_positions(cls_num, patches, idx):
  """Whole-sequence positions of the reference's merge output, its merged sources and their
  destinations (the A set is the odd patches when cls_num is odd)."""
  unm, src, dst = (_np(i) for i in idx)
  pos = cls_num + np.arange(patches)
  a_pos, b_pos = (pos[::2], pos[1::2]) if cls_num % 2 == 0 else (pos[1::2], pos[::2])
  out = np.concatenate([np.broadcast_to(np.arange(cls_num), (unm.shape[0], cls_num)),
                        a_pos[unm], np.broadcast_to(b_pos, (unm.shape[0], len(b_pos)))], axis=1)
  return out, a_pos[src], b_pos[dst]


def ref_tempme_regroup(x, size, r_f, r, cls_num, frame_num, pos_embed=None):
  """module_tome_patch.py `ToMeBlock.forward`, the `if r_f > 1` branch (before attention):
  the metric is x before the frame position embedding; returns x, size, the new cls_num and
  the matching's indices."""
  metric = x.detach()
  bsz, token_num, embed_dim = x.shape
  if size is None:
    size = torch.ones_like(x[..., 0, None])
  x = x.reshape(bsz // r_f, r_f, token_num, embed_dim)
  metric = metric.reshape(bsz // r_f, r_f, token_num, embed_dim)
  info_size = size.reshape(bsz // r_f, r_f, token_num, 1)
  x_cls = x[:, :, :cls_num, :].reshape(bsz // r_f, -1, embed_dim)
  x_patch = x[:, :, cls_num:, :].reshape(bsz // r_f, -1, embed_dim)
  x = torch.cat([x_cls, x_patch], dim=1)
  metric_cls = metric[:, :, :cls_num, :].reshape(bsz // r_f, -1, embed_dim)
  metric_patch = metric[:, :, cls_num:, :].reshape(bsz // r_f, -1, embed_dim)
  metric = torch.cat([metric_cls, metric_patch], dim=1)
  info_size_cls = info_size[:, :, :cls_num, :].reshape(bsz // r_f, -1, 1)
  info_size_patch = info_size[:, :, cls_num:, :].reshape(bsz // r_f, -1, 1)
  size = torch.cat([info_size_cls, info_size_patch], dim=1)
  if pos_embed is not None:  # frame_pos == 1; the parameter is [1, frame_num, 1, D]
    Position_Embed = pos_embed.reshape(1, frame_num // r_f, r_f, 1, embed_dim)
    Position_Embed = Position_Embed.expand(bsz // frame_num, -1, -1, token_num, -1).reshape(
        bsz // r_f, r_f, token_num, embed_dim)
    Position_Embed_cls = Position_Embed[:, :, :cls_num, :].reshape(bsz // r_f, -1, embed_dim)
    Position_Embed_patch = Position_Embed[:, :, cls_num:, :].reshape(bsz // r_f, -1, embed_dim)
    Position_Embed = torch.cat([Position_Embed_cls, Position_Embed_patch], dim=1)
  cls_num = cls_num * r_f
  idx = None
  if r > 0:
    merge, idx = ref_tempme_matching(metric, r, cls_num=cls_num, r_f=r_f)
    if pos_embed is not None:
      x = x + Position_Embed
    x, size = ref_merge_wavg(merge, x, size)
  return x, size, cls_num, idx


def ref_tempme_counts(depth, frames, token_num, merge_layer, merge_frame_num, proportion, tome_r):
  """(frame_num, token_num, cls_num) after each block: modeling.py `get_video_feat`'s loop
  (M_token_num_0, M_token_num_1, the later layers' share, tome_r before the first merge layer)
  with `ToMeBlock.forward`'s updates of `_tome_info`."""
  info = {"cls_num": 1, "frame_num": frames, "token_num": token_num}
  merge_frame_num = list(merge_frame_num)
  out = []
  for res_i in range(depth):
    M_frame_num = 1
    if res_i not in merge_layer:
      if res_i < merge_layer[0]:
        M = [tome_r]
      else:
        M_token_num = int(info["token_num"] * proportion[1])
        M_token_num = min((info["token_num"] - info["cls_num"]) // 2, M_token_num)
        M = [M_token_num]
    else:
      M_frame_num = merge_frame_num.pop(0)
      M_token_num_0 = int(info["token_num"] * M_frame_num * proportion[0])
      M_token_num_0 = min((info["token_num"] - info["cls_num"]) * M_frame_num // 2, M_token_num_0)
      M_token_num_1 = int((info["token_num"] * M_frame_num - M_token_num_0) * proportion[1])
      M_token_num_1 = min(
          ((info["token_num"] - info["cls_num"]) * M_frame_num - M_token_num_0) // 2,
          M_token_num_1)
      M = [M_token_num_0, M_token_num_1]
    # ToMeBlock.forward
    r_f = M_frame_num
    if r_f > 1:
      info["cls_num"] *= r_f
      info["token_num"] *= r_f
      info["frame_num"] //= r_f
      if M[0] > 0:
        info["token_num"] -= M[0]
    if M[-1] > 0:
      info["token_num"] -= M[-1]
    out.append((info["frame_num"], info["token_num"], info["cls_num"]))
  return out


# ---- 4. TempMe -------------------------------------------------------------------------------
@pytest.mark.parametrize("cls_num", [1, 2, 3, 4])
@pytest.mark.parametrize("patches,r", [(9, 4), (12, 3)])
def test_tempme_matching_is_the_reference(cls_num, patches, r):
  rng = np.random.default_rng(cls_num * 100 + patches)
  n, c = 3, 8
  t = cls_num + patches
  metric = rng.normal(size=(n, t, c)).astype(np.float32)
  x = rng.normal(size=(n, t, 5)).astype(np.float32)
  size = rng.uniform(0.5, 3.0, size=(n, t)).astype(np.float32)
  merge, idx = ref_tempme_matching(_t(metric), r, cls_num, r_f=1)
  want_x, want_size = ref_merge_wavg(merge, _t(x), _t(size)[..., None])
  out_pos, src_pos, dst_pos = ref_tempme_positions(cls_num, patches, idx)

  m = tome.bipartite_soft_matching(jnp.asarray(metric), r, num_protected=cls_num)
  # Merged tokens and their destinations as whole-sequence positions, in the same order.
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(m.a_idx), np.asarray(m.src_idx), 1),
                                src_pos)
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(m.b_idx), np.asarray(m.dst_idx), 1),
                                dst_pos)
  state = base.TokenState(x=jnp.asarray(x), size=jnp.asarray(size),
                          ids=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, t)),
                          num_prefix=cls_num)
  for got in (tome.merge_state(m, state),
              tempme.merge_tokens(state, jnp.asarray(metric), r)):
    dx = np.abs(np.asarray(got.x) - _np(want_x)).max()
    ds = np.abs(np.asarray(got.size) - _np(want_size)[..., 0]).max()
    assert dx < ATOL and ds < ATOL, (dx, ds)
    np.testing.assert_array_equal(np.asarray(got.ids), out_pos)


def _sequences_state(rows, tokens, cls_num, sequences, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(rows, tokens, 8)).astype(np.float32)
  size = rng.uniform(0.5, 3.0, size=(rows, tokens)).astype(np.float32)
  ids = rng.permutation(rows * tokens).reshape(rows, tokens).astype(np.int32)
  state = base.TokenState(x=jnp.asarray(x), size=jnp.asarray(size), ids=jnp.asarray(ids),
                          num_prefix=cls_num, grid=PatchGrid((4, 4), (1, tokens - cls_num)),
                          sequences=sequences)
  return x, size, ids, state


@pytest.mark.parametrize("b,frames,group,tokens,cls_num", [
    (2, 4, 2, 9, 1), (1, 6, 3, 10, 1), (1, 6, 2, 8, 3), (2, 2, 2, 7, 2)])
def test_tempme_regrouping_is_the_reference(b, frames, group, tokens, cls_num):
  rows = b * frames
  x, size, ids, state = _sequences_state(rows, tokens, cls_num, frames, seed=rows + tokens)
  got = state.group_sequences(group)
  want_x, want_size, new_cls, _ = ref_tempme_regroup(_t(x), _t(size)[..., None], group, 0,
                                                     cls_num, frames)
  np.testing.assert_array_equal(np.asarray(got.x), _np(want_x))
  np.testing.assert_array_equal(np.asarray(got.size), _np(want_size)[..., 0])
  want_ids, _, _, _ = ref_tempme_regroup(_t(ids[..., None]), None, group, 0, cls_num, frames)
  np.testing.assert_array_equal(np.asarray(got.ids), _np(want_ids)[..., 0])
  assert (got.num_prefix, got.sequences, got.slices) == (new_cls, frames // group, group)
  assert got.join_sequences().x.shape == (b, frames * tokens, 8)


def _context(width=8):
  return base.ModelContext(width=width, num_heads=2, mlp_dim=2 * width, depth=4, num_prefix=1,
                           class_token=True)


@pytest.mark.parametrize("b,frames,group,tokens,cls_num,share", [
    (2, 4, 2, 9, 1, 0.3), (1, 6, 3, 10, 1, 0.3), (1, 6, 2, 8, 3, 0.45), (2, 2, 2, 12, 2, 0.9)])
def test_tempme_pre_block_is_the_reference(b, frames, group, tokens, cls_num, share):
  rows = b * frames
  x, size, ids, state = _sequences_state(rows, tokens, cls_num, frames, seed=2 * rows + tokens)
  reducer = tempme.TempMe(layer=1, group=group, share_before=share, frame_pos=True,
                          context=_context())
  info = base.BlockInfo(layer=1, stage=base.PRE_BLOCK)
  variables = reducer.init(jax.random.key(0), state, info)
  assert variables["params"]["frame_pos"].shape == (frames, 8)
  pos = np.random.default_rng(1).normal(size=(frames, 8)).astype(np.float32)
  got, _ = reducer.apply({"params": {"frame_pos": jnp.asarray(pos)}}, state, info)
  # modeling.py: M_token_num_0 for this block (token_num, cls_num: per sequence before it).
  r = min((tokens - cls_num) * group // 2, int(tokens * group * share))
  want_x, want_size, new_cls, idx = ref_tempme_regroup(
      _t(x), _t(size)[..., None], group, r, cls_num, frames, _t(pos).reshape(1, frames, 1, 8))
  assert got.num_tokens == tokens * group - r and got.num_prefix == new_cls
  assert (got.sequences, got.slices) == (frames // group, 1)
  dx = np.abs(np.asarray(got.x) - _np(want_x)).max()
  ds = np.abs(np.asarray(got.size) - _np(want_size)[..., 0]).max()
  assert dx < ATOL and ds < ATOL, (dx, ds)
  # ids: the regrouped ids taken at the reference's output positions.
  regrouped_ids, _, _, _ = ref_tempme_regroup(_t(ids[..., None]), None, group, 0, cls_num, frames)
  out_pos, _, _ = ref_tempme_positions(new_cls, tokens * group - new_cls, idx)
  np.testing.assert_array_equal(np.asarray(got.ids),
                                np.take_along_axis(_np(regrouped_ids)[..., 0], out_pos, 1))
  assert not got.carry and not got.per_token
  # The matching reads x before the embedding: with the embedding in the metric it differs.
  _, _, _, idx_pos = ref_tempme_regroup(
      _t(x) + _t(np.repeat(pos[None], b, 0).reshape(rows, 1, 8)), _t(size)[..., None], group,
      r, cls_num, frames)
  if frames == 4 and tokens == 9:
    assert not all(torch.equal(i, j) for i, j in zip(idx, idx_pos))


def _tempme_vit(depth=4, patch=(1, 8, 8), width=16, **settings):
  return vit.VisionTransformer(num_classes=5, patch_size=patch, width=width, depth=depth,
                               num_heads=2, mlp_dim=2 * width,
                               token_reduction={"method": "tempme", **settings})


def _random_variables(model, clips, seed=1, scale=0.2):
  """Random parameters of the model's shapes (no eager init: it is slow on 2 cores)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), clips)
  leaves, tree = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [jnp.asarray(scale * rng.normal(size=a.shape), a.dtype)
                                   for a in leaves])


@pytest.mark.parametrize("settings", [
    {"merge_layers": (1, 2), "groups": (2, 2), "r": 2},
    {"merge_layers": (0, 2), "groups": (4, 1), "r": 2, "shares": (0.5, 0.2)},
    {"merge_layers": (0, 2), "groups": (2, 2), "r": 2, "shares": (0.5, 0.2)},
    {"merge_layers": (2,), "groups": (2,), "r": 3, "shares": (0.25, 0.15)},
])
def test_tempme_token_counts_follow_the_reference_bookkeeping(settings):
  clips = np.zeros((2, 4, 32, 32, 3), np.float32)  # 4 frames of 16 patches: 17 tokens each
  counts, seqs, aux = _block_counts(_tempme_vit(**settings), clips)
  want = ref_tempme_counts(4, 4, 17, list(settings["merge_layers"]), list(settings["groups"]),
                           settings.get("shares", (0.3, 0.1)), settings["r"])
  # With a merge layer of group 1 the reference merges nothing before attention there, yet
  # takes M_token_num_1 of the tokens less M_token_num_0; vitoken counts alike.
  assert list(zip(seqs, counts)) == [(f, n) for f, n, _ in want]
  assert aux["state"].num_prefix == want[-1][2] * want[-1][0]


def test_tempme_defaults_follow_the_reference_bookkeeping():
  """The defaults (merge layers 8-10, groups 2, 2, 3, shares 30%/10%, r 2) on a depth-12 tiny
  video ViT: 12 frames of 5x5 patches (26 tokens per frame, enough for the 8 early blocks'
  r = 2; the reference does not cap tome_r). Shapes only."""
  model = _tempme_vit(depth=12, patch=(1, 4, 4), width=16)
  clips = np.zeros((2, 12, 20, 20, 3), np.float32)
  counts, seqs, aux = _block_counts(model, clips)
  want = ref_tempme_counts(12, 12, 26, [8, 9, 10], [2, 2, 3], (0.3, 0.1), 2)
  assert list(zip(seqs, counts)) == [(f, n) for f, n, _ in want]
  assert aux["state"].num_prefix == 12 == want[-1][2]
  # frame_pos tables: one vector per sequence entering each merge block.
  params = jax.eval_shape(model.init, jax.random.key(0), clips)["params"]
  tables = [params[f"block_{i:02d}"]["tempme"]["frame_pos"].shape[0] for i in (8, 9, 10)]
  assert tables == [12, 6, 3]
  assert not any("tempme" in params[f"block_{i:02d}"] for i in range(8))


def test_tempme_class_tokens_never_merge_and_pool_to_their_mean_direction():
  model = _tempme_vit(depth=4, merge_layers=(1, 2), groups=(2, 2), r=2)
  clips = np.random.default_rng(3).normal(size=(2, 4, 32, 32, 3)).astype(np.float32)
  variables = _random_variables(model, clips)
  logits, aux = jax.jit(model.apply)(variables, clips)
  want = ref_tempme_counts(4, 4, 17, [1, 2], [2, 2], (0.3, 0.1), 2)
  assert [(a.shape[0] // 2, a.shape[1]) for a in aux["blocks"].values()] == [
      (f, n) for f, n, _ in want]
  state = aux["state"]
  assert state.num_prefix == 4 and state.sequences == 1
  # The class tokens never merged: 4 copies, id 0, size 1; no other token holds id 0, and
  # the patches' sizes add up to the clip's patches.
  ids, size = np.asarray(state.ids), np.asarray(state.size)
  assert np.all(ids[:, :4] == 0) and np.all(size[:, :4] == 1)
  assert np.all(ids[:, 4:] > 0)
  np.testing.assert_allclose(size[:, 4:].sum(axis=1), 4 * 16, rtol=1e-6)
  # The pooled feature: the mean of the unit-normalised per-frame class embeddings (the
  # reference's video feature; `encoded` is after the final LayerNorm), up to a positive scale.
  cls = np.asarray(aux["encoded"])[:, :4]
  mean_dir = (cls / np.linalg.norm(cls, axis=-1, keepdims=True)).mean(axis=1)
  pooled = np.asarray(aux["pre_logits"])
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  assert np.abs(unit(pooled) - unit(mean_dir)).max() < ATOL
  assert np.all(np.sum(pooled * mean_dir, axis=-1) > 0)
  # The class tokens differ per frame (else the check above would be trivial).
  assert np.abs(cls[:, 0] - cls[:, 1]).max() > 1e-2
  assert np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.parametrize("settings,match", [
    ({"merge_layers": (1, 2), "groups": (3, 2)}, r"groups=3 does not divide the 4 frames"),
    ({"merge_layers": (1, 2), "groups": (2, 4)}, r"groups=4 does not divide the 2 frames"),
    ({"merge_layers": (1, 2), "groups": (2, 0)}, r"groups must be positive"),
    ({"merge_layers": (1, 2), "groups": (2, 2), "shares": (1.0, 0.1)}, r"shares must be"),
    ({"merge_layers": (1, 2), "groups": (2, 2), "shares": (0.3, -0.1)}, r"shares must be"),
    ({"merge_layers": (1, 2), "groups": (2, 2), "shares": (0.3,)}, r"shares must be"),
    ({"merge_layers": (2, 1), "groups": (2, 2)}, r"merge_layers must be increasing"),
    ({"merge_layers": (1, 4), "groups": (2, 2)}, r"merge_layers must be increasing"),
    ({"merge_layers": (1, 2), "groups": (2,)}, r"merge_layers \[1, 2\] and groups \[2\]"),
    ({"merge_layers": (1,), "groups": (2,), "r": -1}, r"r must be a non-negative"),
])
def test_tempme_errors_name_the_setting(settings, match):
  with pytest.raises(ConfigError, match=match):
    _block_counts(_tempme_vit(**settings), np.zeros((1, 4, 32, 32, 3), np.float32))


# ---- 5. invariants ---------------------------------------------------------------------------
def test_testa_without_merges_is_the_dense_model():
  """frames=0, patches=0 (constant or per layer) places nothing: exactly the dense model."""
  clips = CLIPS[:1]
  dense = vit.VisionTransformer(num_classes=5, patch_size=(2, 8, 8), width=32, depth=4,
                                num_heads=2, mlp_dim=64)
  variables = _random_variables(dense, clips)
  want = np.asarray(jax.jit(dense.apply)(variables, clips)[0])
  for settings in ({"frames": 0, "patches": 0}, {"frames": [0, 0], "patches": [0, 0, 0, 0]}):
    model = _testa_vit(**settings)
    assert model.plan().empty
    np.testing.assert_array_equal(np.asarray(jax.jit(model.apply)(variables, clips)[0]), want)


def test_tempme_without_merges_is_the_dense_model_per_frame():
  """groups 1, shares 0, r 0 still run every frame as its own sequence (with its own class
  token copy): exactly the dense video model on each frame as a one-frame clip (its position
  table that frame's rows), and the pooled feature the mean direction of the frames' class
  tokens. (It is not the dense model on the clip, whose attention is joint over frames.)"""
  t, hw = 3, 4
  clips = np.random.default_rng(4).normal(size=(2, t, 16, 16, 3)).astype(np.float32)
  model = _tempme_vit(depth=2, merge_layers=(1,), groups=(1,), shares=(0.0, 0.0), r=0)
  variables = _random_variables(model, clips)
  assert "tempme" not in str(jax.tree_util.tree_structure(variables))  # no frame_pos param
  logits, aux = jax.jit(model.apply)(variables, clips)
  assert [a.shape for a in aux["blocks"].values()] == [(2 * t, 1 + hw, 16)] * 2
  dense = vit.VisionTransformer(num_classes=5, patch_size=(1, 8, 8), width=16, depth=2,
                                num_heads=2, mlp_dim=32)
  params = variables["params"]
  table = params["pos_embedding"]
  run = jax.jit(dense.apply)
  cls, patches = [], []
  for f in range(t):
    frame = {"params": {**params, "pos_embedding": table[:, f * hw:(f + 1) * hw]}}
    _, faux = run(frame, clips[:, f:f + 1])
    cls.append(np.asarray(faux["encoded"])[:, 0])
    patches.append(np.asarray(faux["encoded"])[:, 1:])
  encoded = np.asarray(aux["encoded"])
  d_tokens = max(np.abs(encoded[:, :t] - np.stack(cls, 1)).max(),
                 np.abs(encoded[:, t:] - np.concatenate(patches, 1)).max())
  assert d_tokens < ATOL, d_tokens
  cls = np.stack(cls, 1)
  norm = np.linalg.norm(cls, axis=-1, keepdims=True)
  pooled = (cls / norm).mean(axis=1) * norm.mean(axis=1)
  head = params["head"]
  want = pooled @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
  np.testing.assert_allclose(np.asarray(logits), want, atol=ATOL)


@pytest.mark.parametrize("which", ["testa", "tempme"])
def test_jit_and_gradients_flow(which):
  clips = np.random.default_rng(5).normal(size=(1, 4, 16, 16, 3)).astype(np.float32)
  if which == "testa":
    model = vit.VisionTransformer(num_classes=5, patch_size=(1, 8, 8), width=16, depth=2,
                                  num_heads=2, mlp_dim=32,
                                  token_reduction={"method": "testa", "frames": 1, "patches": 1})
  else:
    model = _tempme_vit(depth=2, merge_layers=(1,), groups=(2,), r=1, shares=(0.3, 0.1))
  variables = _random_variables(model, clips)

  def loss(v):
    logits, aux = model.apply(v, clips)
    return jnp.sum(logits ** 2), aux["blocks"]

  (value, blocks), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables)
  # Tokens were merged in both (4 slices of 4 patches: 17 tokens at the start).
  assert [a.shape[1] for a in blocks.values()] == (
      [10, 5] if which == "testa" else [4, 6])
  flat = jax.tree_util.tree_leaves_with_path(grads)
  assert np.isfinite(float(value))
  assert all(np.all(np.isfinite(np.asarray(g))) for _, g in flat)
  for path, g in flat:
    name = jax.tree_util.keystr(path)
    if "embedding" in name or "frame_pos" in name or "block_00" in name:
      assert np.abs(np.asarray(g)).max() > 0, name
  assert (which == "tempme") == any("frame_pos" in jax.tree_util.keystr(p) for p, _ in flat)
