"""Visual-token compressors (`vitoken.models.reducers.compression`) against torch transcriptions
of their reference code, written here from the repositories:

- FasterVLM (Theia-4869/FasterVLM, llava/model/llava_arch.py `encode_images` and
  multimodal_encoder/clip_encoder.py `feature_select`): top-k patches by class attention
  (mean over heads), kept through a boolean index mask, i.e. in image order.
- VisionZip (dvlab-research/VisionZip, visionzip/clip_encoder.py `forward`, visionzip/main.py
  `visionzip`, which stores `dominant_num=dominant-1`: `dominant` counts the class token).
- LLaVA-PruMerge (42Shawn/LLaVA-PruMerge, llava/model/multimodal_encoder/clip_encoder.py
  `token_prune_merge_advanced`, `outlier_dectection`, `complement_idx`).
- AIM's ToMe merge (LaVi-Lab/AIM, llava/model/token_merge.py `bipartite_soft_matching_merge`,
  called in rounds from llava/model/llava_arch.py) and ToMe's size-weighted average.
- Matryoshka pooling (mu-cai/matryoshka-mm, llava/model/llava_arch.py
  `matryoshka_vis_token_process`).

Indices must match exactly, values within 1e-5 (float32). The registered reducers are checked
inside a small ViT against the functions applied to an unreduced run's block outputs.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitoken.errors import ConfigError
from vitoken.models import vit
from vitoken.models.reducers import compression

ATOL = 1e-5


@functools.lru_cache(maxsize=None)
def _jitted(name, static):
  # Looked up at trace time, jitted: one compile per shape instead of one per eager op.
  return jax.jit(lambda *arrays: getattr(compression, name)(*arrays, **dict(static)))


def _run(name, *arrays, **static):
  """compression.<name>(*arrays, **static) under jit, the static settings as keywords."""
  return _jitted(name, tuple(sorted(static.items())))(*(jnp.asarray(a) for a in arrays))


def _np(a):
  return np.asarray(a)


def _t(a):
  return torch.from_numpy(np.asarray(a, np.float32).copy())


def _close(got, want, atol=ATOL):
  np.testing.assert_allclose(_np(got), _np(want), rtol=1e-5, atol=atol)


def _softmax_rows(rng, shape, scale=2.0):
  """Attention-like rows (softmax over the last axis) with heavy tails."""
  logits = rng.normal(size=shape) * scale
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return (e / e.sum(-1, keepdims=True)).astype(np.float32)


# ---- FasterVLM ------------------------------------------------------------------------------
def ref_fastervlm(image_features, image_attentions, visual_token_num):
  """encode_images + the index-mask gather of prepare_inputs_labels_for_multimodal.

  image_features [B, N, C] (patches), image_attentions [B, H, N] (class row over patches, the
  'patch' feature_select). Returns the kept features (list per example) and the mask."""
  B, N, C = image_features.shape
  image_attentions = image_attentions.mean(dim=1)  # (B, N)
  token_indices = torch.topk(image_attentions, k=visual_token_num, dim=1)[1]  # (B, T)
  index_masks = torch.zeros(B, N, dtype=torch.bool)
  index_masks.scatter_(1, token_indices, True)
  kept = [image_feature[index_mask] for image_feature, index_mask in
          zip(image_features, index_masks)]
  return torch.stack(kept), index_masks


def _fastervlm_inputs(rng, b, p, n, c, heads=3):
  x = rng.normal(size=(b, p + n, c)).astype(np.float32)
  attn = _softmax_rows(rng, (b, heads, p + n))
  # The prefix gets the most attention (as a real class row often does): ranking it would show.
  attn[:, :, :p] += 1.0
  return x, attn


@pytest.mark.parametrize("b,p,n,c,k", [(1, 1, 16, 8, 4), (3, 1, 49, 16, 10), (2, 2, 25, 8, 7),
                                       (2, 1, 7, 4, 1)])
def test_cls_topk_matches_fastervlm(b, p, n, c, k):
  rng = np.random.default_rng(100 + n + k)
  x, attn = _fastervlm_inputs(rng, b, p, n, c)
  want, mask = ref_fastervlm(_t(x[:, p:]), _t(attn[:, :, p:]), k)
  tokens, ids = _run("cls_topk", x, attn.mean(1), num_tokens=k, num_prefix=p)
  assert tokens.shape == (b, k, c) and ids.shape == (b, k)
  assert ids.dtype == jnp.int32
  want_ids = np.stack([np.nonzero(m)[0] for m in mask.numpy()]) + p
  np.testing.assert_array_equal(_np(ids), want_ids)
  _close(tokens, want.numpy())
  # batch members differ (so a batch mix-up would show)
  assert not all(np.array_equal(want_ids[0], w) for w in want_ids[1:]) or b == 1


@pytest.mark.parametrize("p", [1, 2])
def test_cls_topk_all_patches_is_identity(p):
  rng = np.random.default_rng(7)
  x, attn = _fastervlm_inputs(rng, 2, p, 9, 4)
  tokens, ids = _run("cls_topk", x, attn.mean(1), num_tokens=9, num_prefix=p)
  np.testing.assert_array_equal(_np(ids), np.broadcast_to(np.arange(p, p + 9), (2, 9)))
  np.testing.assert_array_equal(_np(tokens), x[:, p:])


def test_cls_topk_too_many_tokens():
  x, attn = _fastervlm_inputs(np.random.default_rng(0), 1, 1, 9, 4)
  with pytest.raises(ConfigError, match="num_tokens"):
    compression.cls_topk(jnp.asarray(x), jnp.asarray(attn.mean(1)), 10)


# ---- VisionZip ------------------------------------------------------------------------------
def ref_visionzip(hidden_states, attn_weights, metric, dominant, contextual):
  """CLIPVisionTower_VisionZip.forward from the layer's outputs on (visionzip(...) stores
  dominant_num = dominant - 1). hidden_states [B, T, C], attn_weights [B, H, T, T],
  metric [B, T, Ck] (raw keys mean over heads). Returns (tokens, ids) where ids are the
  positions the tokens come from (dominant, then the contextual targets)."""
  dominant_num = dominant - 1
  contextual_num = contextual
  ## Dominant Visual Tokens
  cls_idx = 0
  cls_attention = attn_weights[:, :, cls_idx, cls_idx + 1:]
  cls_attention_sum = cls_attention.sum(dim=1)
  topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
  all_indices = torch.cat([torch.zeros((hidden_states.shape[0], 1), dtype=topk_indices.dtype),
                           topk_indices], dim=1)
  mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
  dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(
      hidden_states.shape[0], dominant_num + 1, hidden_states.shape[2])
  ### Filter
  metric_filtered = metric[mask].view(hidden_states.shape[0],
                                      hidden_states.shape[1] - (dominant_num + 1), metric.shape[2])
  hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(
      hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), hidden_states.shape[2])
  metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
  ## Contextual Visual Tokens
  step = max(1, metric_normalized.shape[1] // contextual_num)
  target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
  target_tokens = metric_normalized[:, target_indices, :]
  others = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
  tokens_to_merge = metric_normalized[:, others, :]
  similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
  assign_one_hot = torch.zeros(tokens_to_merge.shape[0], tokens_to_merge.shape[1],
                               contextual_num, dtype=hidden_states_filtered.dtype)
  assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
  counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
  hidden_to_merge = hidden_states_filtered[:, others, :]
  aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
  target_hidden = hidden_states_filtered[:, target_indices, :]
  contextual_tokens = target_hidden + aggregated_hidden
  hidden_states_save = torch.cat([dominant_tokens, contextual_tokens], dim=1)
  # positions (not in the reference's return value, which gives all_indices in topk order)
  dom_pos = torch.stack([torch.nonzero(~m)[:, 0] for m in mask])
  rest_pos = torch.stack([torch.nonzero(m)[:, 0] for m in mask])
  ids = torch.cat([dom_pos, rest_pos[:, target_indices]], dim=1)
  return hidden_states_save, ids, step


def _visionzip_inputs(rng, b, n, c, ck, heads=3):
  t = 1 + n
  x = rng.normal(size=(b, t, c)).astype(np.float32)
  attn = _softmax_rows(rng, (b, heads, t, t))
  # keys with unequal norms: a dot product instead of the cosine would rank differently
  keys = (rng.normal(size=(b, t, ck)) * rng.uniform(0.2, 5.0, size=(b, t, 1))).astype(np.float32)
  return x, attn, keys


# (n, dominant, contextual): R = n + 1 - dominant remaining patches, step = max(1, R // C).
VISIONZIP_CASES = [
    (16, 5, 3),    # R = 12, step 4
    (49, 10, 6),   # R = 40, step 6: targets stop before the end
    (25, 4, 7),    # R = 22, step 3, odd counts
    (15, 6, 7),    # R = 10 < 2C: step 1, the first C remaining are targets
    (15, 6, 10),   # R = C: every remaining patch is a target, no members
    (16, 1, 4),    # only the class token is dominant
    (63, 54, 10),  # the README's 54 + 10 with R = 10
]


@pytest.mark.parametrize("n,dominant,contextual", VISIONZIP_CASES)
def test_visionzip_matches_reference(n, dominant, contextual):
  b, c, ck = 3, 8, 6
  rng = np.random.default_rng(n * 100 + dominant * 10 + contextual)
  x, attn, keys = _visionzip_inputs(rng, b, n, c, ck)
  want, want_ids, _ = ref_visionzip(_t(x), _t(attn), _t(keys), dominant, contextual)
  cls_attn = attn[:, :, 0].mean(1)  # the class row, mean over heads (the reference sums)
  tokens, ids = _run("visionzip", x, cls_attn, keys, dominant=dominant,
                     contextual=contextual)
  assert tokens.shape == (b, dominant + contextual, c)
  np.testing.assert_array_equal(_np(ids), want_ids.numpy())
  _close(tokens, want.numpy())


def test_visionzip_cases_cover_the_strides():
  steps = set()
  for n, d, c in VISIONZIP_CASES:
    r = n + 1 - d
    steps.add(max(1, r // c))
  assert 1 in steps and max(steps) > 1


def test_visionzip_dominant_counts_the_class_token():
  # visionzip(model, dominant=54, contextual=10) -> 64 tokens, the class token among the 54
  rng = np.random.default_rng(3)
  x, attn, keys = _visionzip_inputs(rng, 1, 80, 4, 4)
  tokens, ids = _run("visionzip", x, attn[:, :, 0].mean(1), keys, dominant=54, contextual=10)
  assert tokens.shape[1] == 64
  assert int(ids[0, 0]) == 0 and (_np(ids[0, 1:54]) > 0).all()
  assert (np.diff(_np(ids[0, :54])) > 0).all()
  np.testing.assert_array_equal(_np(tokens[0, 0]), x[0, 0])


@pytest.mark.parametrize("dominant,contextual", [(0, 4), (10, 8), (17, 1)])
def test_visionzip_bad_counts(dominant, contextual):
  x, attn, keys = _visionzip_inputs(np.random.default_rng(0), 1, 16, 4, 4)
  with pytest.raises(ConfigError):
    compression.visionzip(jnp.asarray(x), jnp.asarray(attn[:, :, 0].mean(1)), jnp.asarray(keys),
                          dominant, contextual)


# ---- PruMerge -------------------------------------------------------------------------------
def complement_idx(idx, dim):
  a = torch.arange(dim, device=idx.device)
  ndim = idx.ndim
  dims = idx.shape
  n_idx = dims[-1]
  dims = dims[:-1] + (-1, )
  for i in range(1, ndim):
    a = a.unsqueeze(0)
  a = a.expand(*dims)
  masked = torch.scatter(a, -1, idx, 0)
  compl, _ = torch.sort(masked, dim=-1, descending=False)
  compl = compl.permute(-1, *tuple(range(ndim - 1)))
  compl = compl[n_idx:].permute(*(tuple(range(1, ndim)) + (0,)))
  return compl


def outlier_dectection(attn):
  attn_np = attn.to(dtype=torch.float32).cpu().numpy().flatten()
  Q1 = np.percentile(attn_np, 25)
  Q3 = np.percentile(attn_np, 75)
  IQR = Q3 - Q1
  upper_bound = Q3 + 1.5 * IQR
  outlier_indices = np.where((attn_np > upper_bound))[0]
  ratio = len(outlier_indices) / len(attn_np)
  return ratio


def ref_prumerge(image_features, desired_layer_q, desired_layer_k, *, if_adaptive=True,
                 left=None, neighbours=32):
  """token_prune_merge_advanced from the hooked q/k on: image_features [B, N, C] (patches),
  q/k [B, 1 + N, C]. `left` replaces int(N * reduction_ratio) when not adaptive. Returns
  (tokens [B, left + 1, C], kept patch indices [B, left], ratio or None)."""
  B, N, C = image_features.shape
  attn = (desired_layer_q @ desired_layer_k.transpose(-2, -1)) * C ** -0.5
  attn = F.softmax(attn, dim=-1)
  cls_attn = attn[:, 0, 1:]
  ratio = None
  if if_adaptive:
    ratio = outlier_dectection(cls_attn)
    left = int(N * ratio)
  _, idx = torch.topk(cls_attn, left, dim=1, largest=True)
  index = idx.unsqueeze(-1).expand(-1, -1, C)
  Key_wo_cls = desired_layer_k[:, 1:]
  x_others = torch.gather(image_features, dim=1, index=index)
  x_others_attn = torch.gather(cls_attn, dim=1, index=idx)
  Key_others = torch.gather(Key_wo_cls, dim=1, index=index)
  compl = complement_idx(idx, N)
  non_topk = torch.gather(image_features, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))
  non_topk_Key = torch.gather(Key_wo_cls, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))
  non_topk_attn = torch.gather(cls_attn, dim=1, index=compl)
  Key_others_norm = F.normalize(Key_others, p=2, dim=-1)
  non_topk_Key_norm = F.normalize(non_topk_Key, p=2, dim=-1)
  B, left_tokens, C = x_others.size()
  updated_x_others = torch.zeros_like(x_others)
  for b in range(B):
    for i in range(left_tokens):
      key_others_norm = Key_others_norm[b, i, :].unsqueeze(0).unsqueeze(0)
      before_i_Key = Key_others_norm[b, :i, :].unsqueeze(0)
      after_i_Key = Key_others_norm[b, i + 1:, :].unsqueeze(0)
      before_i_x_others = x_others[b, :i, :].unsqueeze(0)
      after_i_x_others = x_others[b, i + 1:, :].unsqueeze(0)
      rest_x_others = torch.cat([before_i_x_others, after_i_x_others,
                                 non_topk[b, :, :].unsqueeze(0)], dim=1)
      before_i_x_others_attn = x_others_attn[b, :i].unsqueeze(0)
      after_i_x_others_attn = x_others_attn[b, i + 1:].unsqueeze(0)
      rest_x_others_attn = torch.cat([before_i_x_others_attn, after_i_x_others_attn,
                                      non_topk_attn[b, :].unsqueeze(0)], dim=1)
      rest_Keys = torch.cat([before_i_Key, after_i_Key, non_topk_Key_norm[b, :, :].unsqueeze(0)],
                            dim=1)
      cos_sim_matrix = torch.bmm(key_others_norm, rest_Keys.transpose(1, 2))
      _, cluster_indices = torch.topk(cos_sim_matrix, k=int(neighbours), dim=2, largest=True)
      # The reference's `cluster_indices.squeeze()`, written so that k = 1 stays a vector.
      cluster = cluster_indices[0, 0]
      cluster_tokens = rest_x_others[:, cluster, :]
      weights = rest_x_others_attn[:, cluster].unsqueeze(-1)
      weighted_avg = torch.sum(cluster_tokens * weights, dim=1)
      updated_center = weighted_avg + x_others[b, i, :]
      updated_x_others[b, i, :] = updated_center
  extra_one_token = torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1, keepdim=True)
  updated_x_others = torch.cat([updated_x_others, extra_one_token], dim=1)
  return updated_x_others, idx, ratio


def _prumerge(x, q, k, **kw):
  """compression.prumerge's (tokens, ids, mask); it also returns the scores, checked here."""
  tokens, ids, mask, scores = _run("prumerge", x, q, k, **kw)
  _close(scores, _scores_of(q, k), atol=1e-6)
  return tokens, ids, mask


def _prumerge_inputs(rng, b, n, c, q_scale=1.5):
  x = rng.normal(size=(b, 1 + n, c)).astype(np.float32)
  q = (rng.normal(size=(b, 1 + n, c)) * q_scale).astype(np.float32)
  k = rng.normal(size=(b, 1 + n, c)).astype(np.float32)
  return x, q, k


@pytest.mark.parametrize("b,n,c,keep,neighbours", [(1, 16, 8, 4, 3), (3, 25, 8, 6, 5),
                                                   (2, 49, 16, 10, 32), (2, 9, 4, 1, 8),
                                                   (2, 10, 4, 3, 1)])
def test_prumerge_fixed_matches_reference(b, n, c, keep, neighbours):
  rng = np.random.default_rng(1000 + n * 10 + keep)
  x, q, k = _prumerge_inputs(rng, b, n, c)
  want, idx, _ = ref_prumerge(_t(x[:, 1:]), _t(q), _t(k), if_adaptive=False, left=keep,
                              neighbours=neighbours)
  tokens, ids, mask = _prumerge(x, q, k, neighbours=neighbours, num_tokens=keep)
  assert tokens.shape == (b, keep + 1, c)
  want_ids = np.concatenate([idx.numpy() + 1, np.full((b, 1), -1)], axis=1)
  np.testing.assert_array_equal(_np(ids), want_ids)
  assert _np(mask).all()
  _close(tokens, want.numpy())


def _adaptive_reference(x, q, k, neighbours, max_tokens=None):
  """The reference run per example (it runs with batch 1), padded as vitoken pads."""
  b, t, c = x.shape
  n = t - 1
  m = n if max_tokens is None else max_tokens
  tokens = np.zeros((b, m + 1, c), np.float32)
  ids = np.full((b, m + 1), -1)
  mask = np.zeros((b, m + 1), bool)
  counts = []
  for e in range(b):
    out, idx, ratio = ref_prumerge(_t(x[e:e + 1, 1:]), _t(q[e:e + 1]), _t(k[e:e + 1]),
                                   neighbours=neighbours)
    left = idx.shape[1]
    assert left == int(n * ratio)
    counts.append(left)
    tokens[e, :left + 1] = out[0].numpy()
    ids[e, :left] = idx[0].numpy() + 1
    mask[e, :left + 1] = True
  return tokens, ids, mask, counts


@pytest.mark.parametrize("b,n,c,neighbours", [(3, 49, 8, 6), (2, 36, 16, 32), (2, 17, 4, 4)])
def test_prumerge_adaptive_matches_reference(b, n, c, neighbours):
  rng = np.random.default_rng(2000 + n)
  x, q, k = _prumerge_inputs(rng, b, n, c, q_scale=2.5)
  want, want_ids, want_mask, counts = _adaptive_reference(x, q, k, neighbours)
  assert len(set(counts)) > 1 or b == 1, counts  # per-example counts differ here
  tokens, ids, mask = _prumerge(x, q, k, neighbours=neighbours)
  assert tokens.shape == (b, n + 1, c)
  np.testing.assert_array_equal(_np(mask), want_mask)
  np.testing.assert_array_equal(_np(ids), want_ids)
  got = np.where(want_mask[..., None], _np(tokens), 0.0)
  _close(got, want)


def test_prumerge_adaptive_max_tokens_pads():
  rng = np.random.default_rng(5)
  b, n, c = 3, 36, 8
  x, q, k = _prumerge_inputs(rng, b, n, c, q_scale=2.5)
  want, want_ids, want_mask, counts = _adaptive_reference(x, q, k, 4)
  m = max(counts) + 2
  tokens, ids, mask = _prumerge(x, q, k, neighbours=4, max_tokens=m)
  assert tokens.shape == (b, m + 1, c)
  np.testing.assert_array_equal(_np(mask), want_mask[:, :m + 1])
  np.testing.assert_array_equal(_np(ids), want_ids[:, :m + 1])
  _close(np.where(want_mask[:, :m + 1, None], _np(tokens), 0.0), want[:, :m + 1])


def _scores_of(q, k):
  c = q.shape[-1]
  logits = np.einsum("bqc,bkc->bqk", q.astype(np.float64), k.astype(np.float64)) * c ** -0.5
  a = np.exp(logits - logits.max(-1, keepdims=True))
  return (a / a.sum(-1, keepdims=True))[:, 0, 1:]


def test_prumerge_extra_token_is_the_pruned_patches_weighted_sum():
  rng = np.random.default_rng(9)
  b, n, c, keep = 2, 20, 6, 5
  x, q, k = _prumerge_inputs(rng, b, n, c)
  tokens, ids, _ = _prumerge(x, q, k, neighbours=4, num_tokens=keep)
  scores = _scores_of(q, k)  # over all 1 + N keys, then the class row's patches
  for e in range(b):
    kept = np.argsort(-scores[e], kind="stable")[:keep]
    np.testing.assert_array_equal(_np(ids[e, :keep]), kept + 1)
    pruned = np.setdiff1d(np.arange(n), kept)
    extra = (scores[e, pruned, None] * x[e, 1 + pruned]).sum(0)
    _close(tokens[e, keep], extra)


def _np_upper(s):
  q1, q3 = np.percentile(s, 25), np.percentile(s, 75)
  return q3 + 1.5 * (q3 - q1)


@pytest.mark.parametrize("n", [2, 3, 4, 7, 13, 49, 196])
def test_outlier_share_and_count_match_numpy(n):
  rng = np.random.default_rng(n)
  b = 4
  scores = _softmax_rows(rng, (b, n), scale=2.5)
  scores[1] = scores[1, 0]  # every score tied: IQR 0, nothing above Q3
  scores[2, : n // 2] = scores[2, 0]  # half tied
  scores[3] = np.round(scores[3] * 50) / 50  # coarse values, many ties
  share = _np(compression.outlier_share(jnp.asarray(scores)))
  assert share.shape == (b,)
  for e in range(b):
    want = outlier_dectection(torch.from_numpy(scores[e:e + 1]))
    np.testing.assert_allclose(share[e], want, atol=1e-7)
    # the count of outliers, exactly (the kept count int(N * share) is checked on prumerge)
    outliers = int((scores[e] > _np_upper(scores[e])).sum())
    assert round(float(share[e]) * n) == outliers
    assert int(n * want) == int(n * (outliers / n))


def _planted_qk(scores):
  """q, k [1, 1 + N, N + 1] whose class row of softmax(q k^T * C**-0.5) over the patches is
  proportional to `scores` [N] (k_j = sqrt(C) e_j, q_0 = log scores)."""
  n = scores.shape[0]
  c = n + 1
  k = np.eye(1 + n, c, dtype=np.float32)[None] * np.float32(math.sqrt(c))
  q = np.zeros((1, 1 + n, c), np.float32)
  q[0, 0, 1:] = np.log(scores)
  return q, k


@pytest.mark.parametrize("n,outliers", [(49, 1), (49, 2), (49, 3), (196, 8), (576, 11), (9, 1)])
def test_prumerge_count_with_planted_outliers(n, outliers):
  """Exactly `outliers` scores far above the rest: the reference keeps int(N * share) (in
  Python floats: for N = 49 one outlier gives int(49 * (1 / 49)) = 0)."""
  rng = np.random.default_rng(n + outliers)
  scores = rng.uniform(0.9, 1.1, size=(1, n)).astype(np.float32)
  planted = rng.choice(n, outliers, replace=False)
  scores[0, planted] = 10.0 + np.arange(outliers)  # distinct: torch.topk's ties are unordered
  want = outlier_dectection(torch.from_numpy(scores))
  assert want * n == pytest.approx(outliers)
  share = float(_np(compression.outlier_share(jnp.asarray(scores)))[0])
  assert share == pytest.approx(want, abs=1e-7)
  q, k = _planted_qk(scores[0])
  x = rng.normal(size=(1, 1 + n, 4)).astype(np.float32)
  _, idx, ratio = ref_prumerge(_t(x[:, 1:]), _t(q), _t(k), neighbours=2)
  assert ratio == want
  _, ids, mask = _prumerge(x, q, k, neighbours=2)
  kept = int(_np(mask).sum()) - 1
  assert kept == idx.shape[1] == int(n * want)
  np.testing.assert_array_equal(_np(ids[0, :kept]), idx[0].numpy() + 1)


def test_prumerge_neighbours_must_leave_a_patch():
  x, q, k = _prumerge_inputs(np.random.default_rng(0), 1, 8, 4)
  with pytest.raises(ConfigError, match="neighbours"):
    compression.prumerge(jnp.asarray(x), jnp.asarray(q), jnp.asarray(k), neighbours=8,
                         num_tokens=2)
  with pytest.raises(ConfigError, match="num_tokens"):
    compression.prumerge(jnp.asarray(x), jnp.asarray(q), jnp.asarray(k), neighbours=2,
                         num_tokens=9)


# ---- ToMe to K (AIM) ------------------------------------------------------------------------
def bipartite_soft_matching_merge(metric, r, x, mode="mean"):
  """AIM's token_merge.py, returning the merge as a function so the sizes ride along."""
  protected = 0
  t = metric.shape[1]
  r = min(r, (t - protected) // 2)
  if r <= 0:
    return None
  with torch.no_grad():
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

  def merge(x, mode):
    src, dst = x[..., ::2, :], x[..., 1::2, :]
    n, t1, c = src.shape
    unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
    src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
    dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
    return torch.cat([unm, dst], dim=1)
  return merge


def ref_tome_to_k(x, k, weighted):
  """Rounds of AIM's merge (metric = the current tokens) until k remain; `weighted` swaps the
  scatter "mean" for ToMe's merge_wavg (x * size summed, divided by the summed size)."""
  size = torch.ones_like(x[..., :1])
  while x.shape[1] > k:
    t = x.shape[1]
    merge = bipartite_soft_matching_merge(x, min(t - k, t // 2), x)
    if weighted:
      x = merge(x * size, "sum")
      size = merge(size, "sum")
      x = x / size
    else:
      x = merge(x, "mean")
      size = merge(size, "sum")
  return x, size[..., 0]


# 16 -> 8 -> 4; odd 17 -> 9 -> 5 with unmerged A tokens; odd 9 -> 5 -> 3 -> 2 -> 1 (K = 1);
# 7 -> 6 (one partial round); 25 -> 13 -> 12 (a batch of one)
@pytest.mark.parametrize("b,t,c,k", [(2, 16, 8, 4), (3, 17, 8, 5), (2, 9, 4, 1), (2, 7, 4, 6),
                                     (1, 25, 6, 12)])
@pytest.mark.parametrize("weighted", [False, True])
def test_tome_to_k_matches_aim(b, t, c, k, weighted):
  rng = np.random.default_rng(t * 10 + k)
  # Correlated tokens, so that merges happen between similar ones and sizes grow unevenly.
  base_ = rng.normal(size=(b, 3, c))
  x = (base_[:, rng.integers(0, 3, t)] + 0.5 * rng.normal(size=(b, t, c))).astype(np.float32)
  want, want_size = ref_tome_to_k(_t(x), k, weighted)
  tokens, size = _run("tome_to_k", x, num_tokens=k, weighted=weighted)
  assert tokens.shape == (b, k, c) and size.shape == (b, k)
  _close(tokens, want.numpy())
  _close(size, want_size.numpy())
  np.testing.assert_allclose(_np(size).sum(1), t)


def test_tome_to_k_weighted_differs_from_mean():
  """Guards the pair of tests above: with repeated rounds the two rules give other values."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 17, 8)).astype(np.float32)
  a, _ = _run("tome_to_k", x, num_tokens=5, weighted=False)
  w, _ = _run("tome_to_k", x, num_tokens=5, weighted=True)
  assert np.abs(_np(a) - _np(w)).max() > 1e-3


def test_tome_to_k_too_many_tokens():
  x = jnp.ones((1, 5, 4))
  with pytest.raises(ConfigError, match="num_tokens"):
    compression.tome_to_k(x, 6)


# ---- Matryoshka pooling ---------------------------------------------------------------------
def ref_matryoshka(image_features, matryoshka_vis_token_scale, grid=None):
  """matryoshka_vis_token_process; `grid` generalises its square H = W = sqrt(N)."""
  N, H_W, C = image_features.shape
  H = W = int(H_W ** 0.5)
  if grid is not None:
    H, W = grid
  reshaped_tensor = image_features.view(N, H, W, C)
  reshaped_tensor = reshaped_tensor.permute(0, 3, 1, 2)
  pool_size = stride = int(np.sqrt(H_W / matryoshka_vis_token_scale))
  pooled_tensor = F.avg_pool2d(reshaped_tensor, kernel_size=pool_size, stride=stride)
  image_features = pooled_tensor.permute(0, 2, 3, 1)
  return image_features.reshape(N, -1, C)


@pytest.mark.parametrize("grid,k", [((4, 4), 4), ((4, 4), 1), ((6, 6), 4), ((6, 6), 9),
                                    ((4, 8), 8), ((6, 3), 2), ((24, 24), 36)])
def test_pool_matches_matryoshka(grid, k):
  rng = np.random.default_rng(grid[0] * 31 + grid[1] + k)
  b, c = 2, 5
  x = rng.normal(size=(b, grid[0] * grid[1], c)).astype(np.float32)
  want = ref_matryoshka(_t(x), k, grid)
  assert want.shape[1] == k
  got = _run("pool", x, num_tokens=k, grid=grid)
  assert got.shape == (b, k, c)
  _close(got, want.numpy())


def test_pool_all_tokens_is_identity():
  x = np.random.default_rng(0).normal(size=(2, 12, 3)).astype(np.float32)
  np.testing.assert_array_equal(_np(compression.pool(jnp.asarray(x), 12, (3, 4))), x)


@pytest.mark.parametrize("grid,k", [((4, 4), 2), ((4, 4), 8), ((6, 6), 3)])
def test_pool_needs_an_integer_kernel(grid, k):
  x = jnp.zeros((1, grid[0] * grid[1], 2))
  with pytest.raises(ConfigError):
    compression.pool(x, k, grid)


def test_pool_too_many_tokens():
  with pytest.raises(ConfigError, match="num_tokens"):
    compression.pool(jnp.zeros((1, 16, 2)), 32, (4, 4))


# ---- the registered reducers inside a ViT ---------------------------------------------------
IMAGES = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))  # 4x4 grid of 4x4 patches


def _vit(token_reduction=None, return_attention=False):
  # pool_type="none" has no class token by default (class_token follows pool_type == "tok")
  return vit.VisionTransformer(num_classes=0, patch_size=(4, 4), width=32, depth=3, num_heads=4,
                               pool_type="none", class_token=True,
                               token_reduction=token_reduction, return_attention=return_attention)


@pytest.fixture(scope="module")
def dense_run():
  model = _vit(return_attention=True)
  variables = model.init(jax.random.key(0), IMAGES)
  _, aux = model.apply(variables, IMAGES)
  return variables, aux


def _keys_mean(variables, block_input, block="block_01"):
  """The block's keys averaged over heads: qkv's key slice applied to LN1(block input)."""
  params = variables["params"][block]
  ln = jax.nn.standardize(block_input, axis=-1, epsilon=1e-6)
  ln = ln * params["norm1"]["scale"] + params["norm1"]["bias"]
  kernel, bias = params["attn"]["qkv"]["kernel"], params["attn"]["qkv"]["bias"]
  keys = jnp.einsum("bnc,chd->bnhd", ln, kernel[:, 1]) + bias[1]
  return keys.mean(axis=2)


def _reduced(variables, token_reduction):
  model = _vit(token_reduction)
  # the compressors have no parameters of their own: the dense run's variables fit
  _, aux = model.apply(variables, IMAGES)
  return aux


def test_vit_cls_topk(dense_run):
  variables, dense = dense_run
  x = dense["blocks"]["block_01"]
  cls_attn = dense["attention"]["block_01"][:, :, 0].mean(axis=1)
  tokens, _ = compression.cls_topk(x, cls_attn, 5)
  aux = _reduced(variables, {"method": "cls_topk", "num_tokens": 5, "layers": [1]})
  got = aux["blocks"]["block_01"]
  assert got.shape == (2, 6, 32)
  _close(got, jnp.concatenate([x[:, :1], tokens], axis=1), atol=1e-4)
  assert aux["blocks"]["block_02"].shape == (2, 6, 32)


def test_vit_visionzip(dense_run):
  variables, dense = dense_run
  x = dense["blocks"]["block_01"]
  cls_attn = dense["attention"]["block_01"][:, :, 0].mean(axis=1)
  keys = _keys_mean(variables, dense["blocks"]["block_00"])
  tokens, _ = compression.visionzip(x, cls_attn, keys, 4, 2)
  aux = _reduced(variables, {"method": "visionzip", "dominant": 4, "contextual": 2,
                             "layers": [1]})
  got = aux["blocks"]["block_01"]
  assert got.shape == (2, 6, 32)
  _close(got, tokens, atol=1e-4)


def test_vit_tome_to_k(dense_run):
  variables, dense = dense_run
  x = dense["blocks"]["block_01"]
  tokens, _ = compression.tome_to_k(x[:, 1:], 5)
  aux = _reduced(variables, {"method": "tome_to_k", "num_tokens": 5, "layers": [1]})
  got = aux["blocks"]["block_01"]
  assert got.shape == (2, 6, 32)
  _close(got, jnp.concatenate([x[:, :1], tokens], axis=1), atol=1e-4)


def test_reference_transcriptions_are_sane():
  """The torch transcriptions themselves on hand-made inputs (guards the references)."""
  # FasterVLM keeps image order
  feats = torch.arange(4.0).reshape(1, 4, 1)
  kept, mask = ref_fastervlm(feats, torch.tensor([[[0.1, 0.4, 0.2, 0.3]]]), 2)
  assert kept[0, :, 0].tolist() == [1.0, 3.0]
  # AIM's mean includes the destination
  x = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
  out, size = ref_tome_to_k(x, 2, False)
  assert size.tolist() == [[2.0, 2.0]]
  assert out[0].tolist() == [[2.0, 0.0], [0.5, 1.0]]  # (t0 + t1) / 2, (t2 + t3) / 2
