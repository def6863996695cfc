"""Token pruning (top-k by class attention, EViT, DynamicViT) against independent references
written here from the papers' code (youweiliang/evit, raoyongming/DynamicViT): numpy for the
selection and fusion, torch forwards over timm ViT weights for whole models (EViT and top-k
between attention and MLP, DynamicViT's PredictorLG before a block, softmax_with_policy in
training), EViT's keep-rate schedule, the Gumbel keep decision, bad configurations, and pruning
followed by ToMe merging.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vitoken.convert import from_timm
from vitoken.convert.torch_reference import import_timm
from vitoken.models import vit
from vitoken.models.reducers import base, pruning

timm = import_timm()

IMG = 128  # timm vit_tiny_patch16 at 128 px: an 8x8 grid, 64 patch tokens plus the class token
DEPTH = 10  # the papers' blocks 3, 6, 9 need 10 blocks
LAYERS = [3, 6, 9]
SHORT, SHORT_LAYERS = 4, [1, 2, 3]  # cheaper to compile: most whole-model checks use this


def _np(a):
  return np.asarray(a, np.float64)


def _rel_err(got, want):
  got, want = _np(got), _np(want)
  return float(np.abs(got - want).max() / np.abs(want).max())


# ---- torch references (the papers' code, re-implemented) -----------------------------------
def torch_softmax_with_policy(attn, policy, eps=1e-6):
  """DynamicViT's Attention.softmax_with_policy; attn [B, H, N, N], policy [B, N, 1]."""
  b, n, _ = policy.size()
  attn_policy = policy.reshape(b, 1, 1, n)
  eye = torch.eye(n, dtype=attn_policy.dtype).view(1, 1, n, n)
  attn_policy = attn_policy + (1.0 - attn_policy) * eye
  max_att = torch.max(attn, dim=-1, keepdim=True)[0]
  attn = (attn - max_att).exp() * attn_policy
  return (attn + eps / n) / (attn.sum(dim=-1, keepdim=True) + eps)


class TorchPredictorLG(torch.nn.Module):
  """DynamicViT's PredictorLG (vit.py)."""

  def __init__(self, c):
    super().__init__()
    self.in_conv = torch.nn.Sequential(torch.nn.LayerNorm(c), torch.nn.Linear(c, c), torch.nn.GELU())
    self.out_conv = torch.nn.Sequential(
        torch.nn.Linear(c, c // 2), torch.nn.GELU(), torch.nn.Linear(c // 2, c // 4), torch.nn.GELU(),
        torch.nn.Linear(c // 4, 2), torch.nn.LogSoftmax(dim=-1))

  def forward(self, x, policy):
    x = self.in_conv(x)
    b, n, c = x.size()
    local_x = x[:, :, :c // 2]
    global_x = (x[:, :, c // 2:] * policy).sum(dim=1, keepdim=True) / torch.sum(policy, dim=1, keepdim=True)
    x = torch.cat([local_x, global_x.expand(b, n, c // 2)], dim=-1)
    return self.out_conv(x)


def batch_index_select(x, idx):
  """DynamicViT's batch_index_select for [B, N] and [B, N, C]."""
  if x.dim() == 3:
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))
  return torch.gather(x, 1, idx)


def complement_idx(idx, dim):
  """EViT's complement_idx for [B, K] indices: the other indices of range(dim), ascending."""
  a = torch.arange(dim).expand(idx.shape[0], -1)
  masked = torch.scatter(a, -1, idx, 0)
  compl, _ = torch.sort(masked, dim=-1)
  return compl[:, idx.shape[1]:]


def ref_attention(blk, x, size=None, policy=None):
  """timm Attention with an explicit softmax: (output, probs [B, H, N, N], keys [B, H, N, D])."""
  attn = blk.attn
  y = blk.norm1(x)
  b, n, c = y.shape
  qkv = attn.qkv(y).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
  q, k, v = qkv[0], qkv[1], qkv[2]
  logits = (q @ k.transpose(-2, -1)) * attn.scale
  if size is not None:  # ToMe's proportional attention
    logits = logits + size.log()[:, None, None, :]
  probs = logits.softmax(-1) if policy is None else torch_softmax_with_policy(logits, policy)
  out = attn.proj(attn.norm((probs @ v).transpose(1, 2).reshape(b, n, c)))
  return out, probs, k


def ref_forward(model, images, pre=None, post=None, prop_attn=False, train_policy=False,
                prop_from=0):
  """A timm ViT forward with hooks before a block (`pre`: {i: fn(s)}) and between attention and
  MLP (`post`: {i: fn(s, probs, keys)}); `s` holds x, size, ids (and policy, prev)."""
  x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
  b, n = x.shape[:2]
  s = {"x": x, "size": torch.ones(b, n), "ids": torch.arange(n).expand(b, n),
       "prev": torch.ones(b, n - 1, 1)}
  if train_policy:  # DynamicViT in training: the policy starts as all ones
    s["policy"] = torch.ones(b, n, 1)
  counts = []
  for i, blk in enumerate(model.blocks):
    if pre and i in pre:
      s = pre[i](s)
    size = s["size"] if prop_attn and i >= prop_from else None
    out, probs, keys = ref_attention(blk, s["x"], size, s.get("policy"))
    s["x"] = s["x"] + out
    if post and i in post:
      s = post[i](s, probs, keys)
    s["x"] = s["x"] + blk.mlp(blk.norm2(s["x"]))
    counts.append(s["x"].shape[1])
  return model.forward_head(model.norm(s["x"])), counts, s


def ref_evit_step(keep_rate=None, fuse=True, k=None, log=None):
  """EViT's Block (attention's top-k by class attention, then gather and fuse), or top-k with a
  count `k`. Logs the kept ids and the class-attention gap at the cut."""
  def step(s, probs, keys):
    x, size, ids = s["x"], s["size"], s["ids"]
    b, n_all, c = x.shape
    n = n_all - 1
    left = math.ceil(keep_rate * n) if k is None else k
    if left == n:
      return s
    cls_attn = probs[:, :, 0, 1:].mean(dim=1)
    top, idx = torch.topk(cls_attn, left, dim=1, largest=True, sorted=True)
    nxt = torch.topk(cls_attn, left + 1, dim=1).values[:, -1]
    xs, sizes, idss = [x[:, :1], batch_index_select(x[:, 1:], idx)], [size[:, :1], batch_index_select(size[:, 1:], idx)], \
        [ids[:, :1], batch_index_select(ids[:, 1:], idx)]
    if fuse:
      compl = complement_idx(idx, n)
      w = batch_index_select(cls_attn, compl)
      xs.append(torch.sum(batch_index_select(x[:, 1:], compl) * w[..., None], dim=1, keepdim=True))
      sizes.append(torch.sum(batch_index_select(size[:, 1:], compl) * w, dim=1, keepdim=True))
      idss.append(torch.full((b, 1), -1, dtype=ids.dtype))
    s = dict(s, x=torch.cat(xs, 1), size=torch.cat(sizes, 1), ids=torch.cat(idss, 1))
    if log is not None:
      log.append({"ids": s["ids"].numpy(), "gap": float((top[:, -1] - nxt).min())})
    return s
  return step


def ref_bipartite(metric, r):
  """ToMe's bipartite_soft_matching with a class token (facebookresearch/ToMe merge.py)."""
  t = metric.shape[1]
  r = min(r, (t - 1) // 2)
  metric = metric / metric.norm(dim=-1, keepdim=True)
  a, b = metric[..., ::2, :], metric[..., 1::2, :]
  scores = a @ b.transpose(-1, -2)
  scores[..., 0, :] = -math.inf
  node_max, node_idx = scores.max(dim=-1)
  edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
  unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
  dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
  unm_idx = unm_idx.sort(dim=1)[0]

  def merge(x):
    src, dst = x[..., ::2, :], x[..., 1::2, :]
    n, t1, c = src.shape
    unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
    src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
    dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
    return torch.cat([unm, dst], dim=1)
  return merge


def ref_tome_step(r):
  def step(s, probs, keys):
    merge = ref_bipartite(keys.mean(1), r)
    size = s["size"][..., None]
    x = merge(s["x"] * size)
    size = merge(size)
    return dict(s, x=x / size, size=size[..., 0], ids=None)
  return step


def ref_dynamicvit_step(predictor, ratio, init_n, decisions=None, log=None):
  """DynamicViT before a pruning block: inference keeps int(init_n * ratio) best-scored tokens;
  training (given the stage's hard decisions [B, init_n]) multiplies them into the policy."""
  def step(s):
    x, prev = s["x"], s["prev"]
    pred = predictor(x[:, 1:], prev)
    if log is not None:
      log.append(pred)
    if decisions is not None:
      hard = decisions[..., None] * prev
      cls_policy = torch.ones(x.shape[0], 1, 1)
      return dict(s, policy=torch.cat([cls_policy, hard], dim=1), prev=hard)
    score = pred[:, :, 0]
    keep = torch.argsort(score, dim=1, descending=True)[:, :int(init_n * ratio)]
    now = torch.cat([torch.zeros(x.shape[0], 1, dtype=keep.dtype), keep + 1], dim=1)
    return dict(s, x=batch_index_select(x, now), ids=batch_index_select(s["ids"], now),
                prev=batch_index_select(prev, keep))
  return step


# ---- shared models -------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _timm_model(depth=DEPTH, seed=0):
  torch.manual_seed(seed)
  model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, depth=depth,
                            num_classes=10).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model


@functools.lru_cache(maxsize=None)
def _dense(depth=DEPTH):
  return from_timm(_timm_model(depth))


def _images(b=2, seed=1):
  images = np.random.RandomState(seed).randn(b, 3, IMG, IMG).astype(np.float32)
  return images, images.transpose(0, 2, 3, 1)


def _counts(aux, depth):
  return [aux["blocks"][f"block_{i:02d}"].shape[1] for i in range(depth)]


def _predictor_params(c, seed):
  """Random KeepPredictor params with O(1) activations (the init's are tiny, so scores nearly
  tie), as a flax tree."""
  rng = np.random.RandomState(seed)
  dense = lambda i, o: {"kernel": (rng.randn(i, o) / np.sqrt(i)).astype(np.float32),
                        "bias": (0.1 * rng.randn(o)).astype(np.float32)}
  return {"norm": {"scale": (1 + 0.1 * rng.randn(c)).astype(np.float32),
                   "bias": (0.1 * rng.randn(c)).astype(np.float32)},
          "in_proj": dense(c, c), "out_1": dense(c, c // 2), "out_2": dense(c // 2, c // 4),
          "out_3": dense(c // 4, 2)}


def _torch_predictor(p):
  c = p["norm"]["scale"].shape[0]
  m = TorchPredictorLG(c).eval()
  t = lambda a: torch.from_numpy(np.array(a, np.float32))
  with torch.no_grad():
    m.in_conv[0].weight.copy_(t(p["norm"]["scale"]))
    m.in_conv[0].bias.copy_(t(p["norm"]["bias"]))
    for layer, name in ((m.in_conv[1], "in_proj"), (m.out_conv[0], "out_1"), (m.out_conv[2], "out_2"),
                        (m.out_conv[4], "out_3")):
      layer.weight.copy_(t(p[name]["kernel"]).T)
      layer.bias.copy_(t(p[name]["bias"]))
  return m


def _dynamicvit(rho, layers=tuple(SHORT_LAYERS), depth=SHORT):
  """The converted timm model with DynamicViT stages whose predictors have random params,
  and the torch predictors holding the same weights."""
  module, params = _dense(depth)
  module = module.clone(token_reduction={"method": "dynamicvit", "keep_rate": rho, "layers": list(layers)})
  params = dict(params)
  torch_preds = []
  for j, layer in enumerate(layers):
    pp = _predictor_params(module.width, seed=100 + j)
    params[f"block_{layer:02d}"] = {**params[f"block_{layer:02d}"], "dynamicvit": {"predictor": pp}}
    torch_preds.append(_torch_predictor(pp))
  params = jax.tree.map(jnp.asarray, params)
  return module, params, torch_preds


# ---- 1. selection and fusion on random tokens -----------------------------------------------
@pytest.mark.parametrize("p", [0, 1, 3], ids=lambda p: f"prefix{p}")
@pytest.mark.parametrize("fuse", [False, True], ids=["gather", "fuse"])
def test_prune_and_select_by_score_equal_numpy(p, fuse):
  rng = np.random.RandomState(10 * p + fuse)
  b, t, c, k = 3, 13, 5, 6
  n = p + t
  x = rng.randn(b, n, c).astype(np.float32)
  size = rng.randint(1, 4, (b, n)).astype(np.float32)
  score = rng.rand(b, t).astype(np.float32)
  state = base.TokenState.create(jnp.asarray(x), num_prefix=p, grid=(1, t), track_source=True)
  state = state.replace(size=jnp.asarray(size))
  idx = pruning.select_by_score(jnp.asarray(score), k)
  want_idx = np.argsort(-score, axis=1, kind="stable")[:, :k]
  np.testing.assert_array_equal(idx, want_idx)
  out = pruning.prune(state, idx, fuse_weights=jnp.asarray(score) if fuse else None)
  assert out.num_tokens == p + k + int(fuse)
  eye = np.eye(n, dtype=np.float64)
  for i in range(b):
    keep = list(range(p)) + list(want_idx[i] + p)
    want_x, want_size, want_ids, want_src = x[i, keep], size[i, keep], np.array(keep), eye[keep]
    if fuse:
      dropped = [j + p for j in range(t) if j not in set(want_idx[i])]
      w = _np(score[i, [j - p for j in dropped]])
      want_x = np.concatenate([want_x, (w[:, None] * x[i, dropped]).sum(0, keepdims=True)])
      want_size = np.concatenate([want_size, [(w * size[i, dropped]).sum()]])
      want_ids = np.concatenate([want_ids, [-1]])
      want_src = np.concatenate([want_src, (w[:, None] * eye[dropped]).sum(0, keepdims=True)])
    np.testing.assert_allclose(out.x[i], want_x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.size[i], want_size, rtol=1e-6)
    np.testing.assert_array_equal(out.ids[i], want_ids)
    np.testing.assert_allclose(out.source[i], want_src, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method,keep_rate", [("evit", 0.6), ("topk", 0.6), ("evit", 0.95)])
def test_evit_and_topk_modules_select_by_class_attention_after_registers(method, keep_rate):
  """The modules on a state with a class token and 2 registers: ranked by the class attention
  of the image tokens only, ceil(keep_rate * T) kept, EViT's fused token weighted by it."""
  rng = np.random.RandomState(3)
  b, p, t, c = 2, 3, 20, 4
  x = rng.randn(b, p + t, c).astype(np.float32)
  cls_attn = rng.dirichlet(np.ones(p + t), size=b).astype(np.float32)
  state = base.TokenState.create(jnp.asarray(x), num_prefix=p, grid=(4, 5))
  info = base.BlockInfo(layer=3, cls_attn=jnp.asarray(cls_attn))
  module = pruning.EViT(keep_rate=keep_rate) if method == "evit" else pruning.TopK(keep_rate=keep_rate)
  out, rec = module.apply({}, state, info)
  left = math.ceil(keep_rate * t)
  fuse = method == "evit"
  assert out.num_tokens == p + left + int(fuse)
  for i in range(b):
    order = np.argsort(-cls_attn[i, p:], kind="stable")
    keep = list(range(p)) + list(order[:left] + p)
    want = x[i, keep]
    if fuse:
      dropped = order[left:] + p
      w = _np(cls_attn[i, dropped])
      want = np.concatenate([want, (w[:, None] * x[i, dropped]).sum(0, keepdims=True)])
      np.testing.assert_allclose(out.size[i, -1], w.sum(), rtol=1e-6)
    np.testing.assert_allclose(out.x[i], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(rec["ids"][i], keep + [-1] * fuse)


def test_keep_rate_that_keeps_every_token_changes_nothing():
  """EViT's `if left_tokens == N - 1: return x`: no reordering and no fused token."""
  x = jax.random.normal(jax.random.key(0), (2, 11, 4))
  cls_attn = jax.nn.softmax(jax.random.normal(jax.random.key(1), (2, 11)))
  state = base.TokenState.create(x, num_prefix=1, grid=(2, 5))
  out, rec = pruning.EViT(keep_rate=0.95).apply({}, state, base.BlockInfo(layer=0, cls_attn=cls_attn))
  assert rec == {}  # ceil(0.95 * 10) = 10
  np.testing.assert_array_equal(out.x, x)
  np.testing.assert_array_equal(out.ids, state.ids)


# ---- 2./3. EViT and top-k on a converted timm ViT vs the reference forward ------------------
@pytest.mark.parametrize("keep_rate,fuse,depth,layers", [
    (0.7, True, DEPTH, LAYERS), (0.7, False, SHORT, SHORT_LAYERS), (0.5, True, SHORT, SHORT_LAYERS)],
    ids=["rho0.7_fuse_3_6_9", "rho0.7_nofuse", "rho0.5_fuse"])
def test_evit_logits_equal_reference_over_timm_weights(keep_rate, fuse, depth, layers):
  model = _timm_model(depth)
  images, nhwc = _images()
  log = []
  with torch.no_grad():
    ref, ref_counts, _ = ref_forward(model, torch.from_numpy(images),
                                     post={i: ref_evit_step(keep_rate, fuse, log=log) for i in layers})
  module, params = from_timm(model, token_reduction={"method": "evit", "keep_rate": keep_rate,
                                                     "layers": layers, "fuse_token": fuse})
  out, aux = jax.jit(module.apply)({"params": params}, nhwc)
  assert min(e["gap"] for e in log) > 1e-6  # no near-tie at any cut: the selection is well posed
  err = _rel_err(out, ref.numpy())
  print(f"evit rho={keep_rate} fuse={fuse}: max abs diff {np.abs(_np(out) - ref.numpy()).max():.3g}, rel {err:.3g}")
  assert err < 1e-4
  # Token counts by hand: ceil(rho * tokens present) kept (+ the fused token) at blocks 3, 6, 9.
  n, want = 64, []
  for i in range(depth):
    if i in layers:
      n = math.ceil(keep_rate * n) + int(fuse)
    want.append(1 + n)
  assert _counts(aux, depth) == ref_counts == want
  for layer, entry in zip(layers, log):
    np.testing.assert_array_equal(aux["reduction"][f"block_{layer:02d}/evit"]["ids"], entry["ids"])
  np.testing.assert_array_equal(aux["state"].ids, log[-1]["ids"])
  if fuse:  # the fused token's size is its attention mass over the patches it pools
    assert np.all(_np(aux["state"].size)[:, -1] < 1) and np.all(_np(aux["state"].size)[:, -1] > 0)


@pytest.mark.parametrize("spec", [{"k": [40, 20, 10]}, {"k": 16}, {"keep_rate": 0.6}],
                         ids=["k_list", "k_const", "keep_rate"])
def test_topk_logits_equal_reference_over_timm_weights(spec):
  model = _timm_model(SHORT)
  images, nhwc = _images()
  ks = spec.get("k")
  ks = ks if isinstance(ks, list) else [ks] * 3
  log = []
  post = {i: ref_evit_step(spec.get("keep_rate"), fuse=False, k=kk, log=log) for i, kk in zip(SHORT_LAYERS, ks)}
  with torch.no_grad():
    ref, ref_counts, _ = ref_forward(model, torch.from_numpy(images), post=post)
  module, params = _dense(SHORT)
  module = module.clone(token_reduction={"method": "topk", "layers": SHORT_LAYERS, **spec})
  out, aux = jax.jit(module.apply)({"params": params}, nhwc)
  assert min(e["gap"] for e in log) > 1e-6
  err = _rel_err(out, ref.numpy())
  print(f"topk {spec}: max abs diff {np.abs(_np(out) - ref.numpy()).max():.3g}, rel {err:.3g}")
  assert err < 1e-4
  n, want = 64, []
  for i in range(SHORT):
    if i in SHORT_LAYERS:
      n = min(n, ks[SHORT_LAYERS.index(i)] if ks[0] is not None else math.ceil(spec["keep_rate"] * n))
    want.append(1 + n)
  assert _counts(aux, SHORT) == ref_counts == want
  # k=16 at block 2 all 16 present: the reference leaves them in place (no record).
  recorded = [k for k in aux["reduction"] if k.endswith("/topk")]
  assert len(recorded) == len(log)
  for key, entry in zip(sorted(recorded), log):
    np.testing.assert_array_equal(aux["reduction"][key]["ids"], entry["ids"])


# ---- 4. DynamicViT inference and its predictor vs torch ------------------------------------
def test_keep_predictor_equals_torch_predictor_lg_with_a_training_policy():
  c = 48
  pp = _predictor_params(c, seed=7)
  rng = np.random.RandomState(8)
  x = rng.randn(3, 15, c).astype(np.float32)
  policy = (rng.rand(3, 15) < 0.6).astype(np.float32)
  policy[:, 0] = 1.0
  got = pruning.KeepPredictor().apply({"params": pp}, jnp.asarray(x), jnp.asarray(policy))
  with torch.no_grad():
    want = _torch_predictor(pp)(torch.from_numpy(x), torch.from_numpy(policy)[..., None]).numpy()
  print(f"predictor: max abs diff {np.abs(_np(got) - want).max():.3g}")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Tokens of variance ~1e-5, where the LayerNorm's eps (torch's 1e-5) matters.
  small = x * 3e-3
  got_small = pruning.KeepPredictor().apply({"params": pp}, jnp.asarray(small), jnp.asarray(policy))
  with torch.no_grad():
    want = _torch_predictor(pp)(torch.from_numpy(small), torch.from_numpy(policy)[..., None]).numpy()
  np.testing.assert_allclose(got_small, want, rtol=1e-4, atol=1e-5)
  # The dropped tokens do not enter the global half: changing them changes only their own rows.
  x2 = x.copy()
  x2[policy == 0] += 3.0
  got2 = pruning.KeepPredictor().apply({"params": pp}, jnp.asarray(x2), jnp.asarray(policy))
  np.testing.assert_allclose(_np(got2)[policy == 1], _np(got)[policy == 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rho", [0.7, 0.5])
def test_dynamicvit_inference_equals_reference_over_timm_weights(rho):
  model = _timm_model(SHORT)
  images, nhwc = _images()
  module, params, preds = _dynamicvit(rho)
  pre = {layer: ref_dynamicvit_step(preds[j], rho ** (j + 1), 64) for j, layer in enumerate(SHORT_LAYERS)}
  with torch.no_grad():
    ref, ref_counts, s = ref_forward(model, torch.from_numpy(images), pre=pre)
  out, aux = jax.jit(module.apply)({"params": params}, nhwc)
  err = _rel_err(out, ref.numpy())
  print(f"dynamicvit inference rho={rho}: max abs diff {np.abs(_np(out) - ref.numpy()).max():.3g}, rel {err:.3g}")
  assert err < 1e-4
  want = [1 + 64, 1 + int(64 * rho), 1 + int(64 * rho ** 2), 1 + int(64 * rho ** 3)]
  assert _counts(aux, SHORT) == ref_counts == want
  np.testing.assert_array_equal(aux["state"].ids, s["ids"].numpy())
  assert sorted(k for k in aux["reduction"]) == [f"block_{i:02d}/dynamicvit" for i in SHORT_LAYERS]
  assert aux["losses"] == {}


# ---- 5. attention with a keep policy equals removing the dropped tokens ---------------------
def test_policy_in_attention_equals_running_the_block_on_the_kept_tokens():
  width, heads, n = 48, 3, 12
  block = vit.EncoderBlock(num_heads=heads, mlp_dim=96)
  x = jax.random.normal(jax.random.key(0), (2, n, width))
  state = base.TokenState.create(x, num_prefix=1, grid=(1, n - 1))
  variables = jax.jit(block.init)(jax.random.key(1), state)
  apply = jax.jit(block.apply)
  rng = np.random.RandomState(0)
  kept = np.stack([np.sort(rng.permutation(np.arange(1, n))[:6]) for _ in range(2)])
  kept = np.concatenate([np.zeros((2, 1), int), kept], axis=1)  # the class token stays
  policy = np.zeros((2, n), np.float32)
  np.put_along_axis(policy, kept, 1.0, axis=1)
  masked, _ = apply(variables, state.replace(policy=jnp.asarray(policy)))
  removed, _ = apply(variables, state.gather(jnp.asarray(kept)))
  dense, _ = apply(variables, state)
  got = np.take_along_axis(_np(masked.x), kept[..., None], axis=1)
  diff = np.abs(got - _np(removed.x)).max()
  print(f"policy vs removal: max abs diff {diff:.3g}")
  assert diff < 1e-4
  # A broken mask (the dense block) is far off, so the tolerance means something.
  assert np.abs(np.take_along_axis(_np(dense.x), kept[..., None], axis=1) - _np(removed.x)).max() > 1e-2
  # A dropped token still attends to itself and to the kept tokens, but to no other dropped one.
  for i in range(2):
    j = next(t for t in range(n) if policy[i, t] == 0)
    alone = np.sort(np.concatenate([kept[i], [j]]))
    out, _ = apply(variables, state.gather(jnp.asarray(np.stack([alone, alone]))))
    pos = int(np.where(alone == j)[0][0])
    np.testing.assert_allclose(_np(masked.x)[i, j], _np(out.x)[i, pos], rtol=1e-4, atol=1e-4)


# ---- 6. keep rate 1 equals the dense model ---------------------------------------------------
def test_keep_rate_one_equals_dense():
  _, nhwc = _images()
  dense, params = _dense(SHORT)
  want, _ = dense.apply({"params": params}, nhwc)
  for method in ("evit", "topk"):
    spec = {"method": method, "keep_rate": 1.0, "layers": SHORT_LAYERS}
    got, aux = dense.clone(token_reduction=spec).apply({"params": params}, nhwc)
    np.testing.assert_array_equal(got, want)
    assert aux["reduction"] == {} and _counts(aux, SHORT) == [65] * SHORT
  module, dyn_params, _ = _dynamicvit(1.0)
  got, aux = module.apply({"params": dyn_params}, nhwc)
  print(f"dynamicvit rho=1 vs dense: max abs diff {np.abs(_np(got) - _np(want)).max():.3g}")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(_np(want)).max())
  assert _counts(aux, SHORT) == [65] * SHORT
  ids = _np(aux["state"].ids)
  assert not np.array_equal(ids, np.broadcast_to(np.arange(65), (2, 65)))  # reordered ...
  np.testing.assert_array_equal(np.sort(ids, axis=1), np.broadcast_to(np.arange(65), (2, 65)))  # ... all kept


def test_dynamicvit_stage_targets_follow_block_order():
  def targets(layers):
    model = vit.Model(10, variant="Ti/8", depth=4,
                      token_reduction={"method": "dynamicvit", "keep_rate": 0.5, "layers": layers})
    return {i: dict(p.kwargs)["keep"] for i, entries in enumerate(model.plan().per_layer) for p in entries}

  assert targets([1, 2]) == {1: 0.5, 2: 0.25}
  assert targets([2, 1]) == {1: 0.5, 2: 0.25}
  for method in ("dynamicvit", "evit", "topk"):
    with pytest.raises(ValueError, match="repeat a block"):
      extra = {"keep_rate": 0.5} if method == "topk" else {}
      vit.Model(10, variant="Ti/8", depth=4,
                token_reduction={"method": method, "layers": [1, 1], **extra}).plan()


# ---- 7. DynamicViT in training ----------------------------------------------------------------
def test_dynamicvit_training_policies_ratio_loss_and_gradients():
  rho = 0.7
  model = _timm_model(SHORT)
  images, nhwc = _images()
  module, params, preds = _dynamicvit(rho)
  rngs = {"dropout": jax.random.key(2), "reduction": jax.random.key(3)}
  capture = lambda mdl, name: name == "__call__" and isinstance(mdl, (pruning.DynamicViT, pruning.KeepPredictor))

  def forward(p):
    (logits, aux), inter = module.apply({"params": p}, nhwc, train=True, rngs=rngs,
                                        capture_intermediates=capture, mutable=["intermediates"])
    return logits, aux, inter["intermediates"]

  def objectives(p):
    logits, aux, inter = forward(p)
    return (sum(aux["losses"].values()), logits.sum()), (logits, aux, inter)

  @jax.jit
  def run(p):
    _, vjp, (logits, aux, inter) = jax.vjp(objectives, p, has_aux=True)
    # Both gradients in one batched backward pass: d(ratio loss), d(sum of logits).
    grads = jax.vmap(vjp)((jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])))[0]
    return logits, aux, inter, jax.tree.map(lambda g: g[0], grads), jax.tree.map(lambda g: g[1], grads)

  logits, aux, inter, g_ratio, g_logits = run(params)
  decisions, log_probs = [], []
  for layer in SHORT_LAYERS:
    scope = inter[f"block_{layer:02d}"]["dynamicvit"]
    state_out = scope["__call__"][0][0]
    decisions.append(_np(state_out.policy)[:, 1:])
    np.testing.assert_array_equal(_np(state_out.policy)[:, 0], 1.0)  # the class token
    log_probs.append(_np(scope["predictor"]["__call__"][0]))
  # Training keeps every token; decisions are hard, and a dropped token stays dropped.
  assert _counts(aux, SHORT) == [65] * SHORT
  prev = np.ones_like(decisions[0])
  for j, (d, layer) in enumerate(zip(decisions, SHORT_LAYERS)):
    assert set(np.unique(d)) <= {0.0, 1.0}
    assert np.all(d <= prev) and 0 < d.sum() < prev.sum()
    frac = _np(aux["reduction"][f"block_{layer:02d}/dynamicvit"]["keep_fraction"])
    np.testing.assert_allclose(frac, d.mean(1), rtol=1e-6)
    want = 2.0 / 3 * np.mean((d.mean(1) - rho ** (j + 1)) ** 2)
    np.testing.assert_allclose(aux["losses"][f"block_{layer:02d}/dynamicvit/ratio"], want, rtol=1e-5)
    prev = d
  np.testing.assert_array_equal(aux["state"].policy[:, 1:], decisions[-1])
  # Given these draws, the logits and the predictors' outputs equal the reference's training
  # forward (softmax_with_policy in every block after the first stage).
  pred_log = []
  pre = {layer: ref_dynamicvit_step(preds[j], rho ** (j + 1), 64, torch.from_numpy(decisions[j]).float(), pred_log)
         for j, layer in enumerate(SHORT_LAYERS)}
  with torch.no_grad():
    ref, _, _ = ref_forward(model, torch.from_numpy(images), pre=pre, train_policy=True)
  err = _rel_err(logits, ref.numpy())
  perr = max(np.abs(a - b.numpy()).max() for a, b in zip(log_probs, pred_log))
  print(f"dynamicvit training: logits max abs diff {np.abs(_np(logits) - ref.numpy()).max():.3g} "
        f"(rel {err:.3g}), predictor log-probs max abs diff {perr:.3g}")
  assert err < 1e-4 and perr < 1e-4
  # Gradients reach every predictor through the ratio loss (straight-through Gumbel) and
  # through the classification logits (the policy weights the attention).
  for layer in SHORT_LAYERS:
    for g in (g_ratio, g_logits):
      leaves = jax.tree.leaves(g[f"block_{layer:02d}"]["dynamicvit"]["predictor"])
      norm = float(sum(jnp.sum(jnp.square(v)) for v in leaves))
      assert np.isfinite(norm) and norm > 0, layer
  # The ratio loss depends on nothing after the last stage.
  assert float(jnp.abs(g_ratio["head"]["kernel"]).max()) == 0.0


# ---- 8. EViT's keep-rate schedule ---------------------------------------------------------------
def ref_adjust_keep_rate(iters, epoch, warmup_epochs, total_epochs, iters_per_epoch, base_keep_rate=0.5,
                         max_keep_rate=1):
  """youweiliang/evit helpers.adjust_keep_rate."""
  if epoch < warmup_epochs:
    return 1
  if epoch >= total_epochs:
    return base_keep_rate
  if iters == -1:
    return base_keep_rate
  total_iters = iters_per_epoch * (total_epochs - warmup_epochs)
  iters = iters - iters_per_epoch * warmup_epochs
  return base_keep_rate + (max_keep_rate - base_keep_rate) * (math.cos(iters / total_iters * math.pi) + 1) * 0.5


@pytest.mark.parametrize("rate", [0.7, 0.5])
def test_keep_rate_at_equals_reference_adjust_keep_rate(rate):
  epochs, warmup, total, per_epoch = 300, 10, 110, 50
  for it in range(0, epochs * per_epoch, 37):
    want = ref_adjust_keep_rate(it, it // per_epoch, warmup, total, per_epoch, rate)
    got = pruning.keep_rate_at(it / (epochs * per_epoch), rate, warmup / epochs, total / epochs)
    assert got == pytest.approx(want, abs=1e-9), it


def test_shrink_phases_set_the_token_counts_in_training_only():
  rate = 0.45  # no phase's rate times 64 lands on an integer, where float rounding decides ceil
  spec = {"method": "evit", "keep_rate": rate, "layers": [0], "shrink": (0.2, 0.8), "shrink_levels": 3}
  model = vit.Model(10, variant="Ti/8", depth=1, token_reduction=spec)
  assert model.plan().phase_starts() == pytest.approx((0.2, 0.4, 0.6, 0.8))
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)  # 64 patches
  rngs = {"params": jax.random.key(1), "dropout": jax.random.key(2), "reduction": jax.random.key(3)}
  variables = jax.eval_shape(model.init, rngs, images)

  def tokens(phase, train=True):  # token counts are static: tracing the apply tells them
    _, aux = jax.eval_shape(functools.partial(model.apply, train=train, phase=phase, rngs=rngs),
                            variables, images)
    return aux["blocks"]["block_00"].shape[1]

  def count(r):  # tokens after EViT: class, ceil(r * 64) kept, the fused token if any dropped
    left = math.ceil(r * 64)
    assert abs(r * 64 - round(r * 64)) > 1e-6 or r == 1
    return 1 + left + int(left < 64)

  def ref_rate(progress):  # the reference schedule, 100 epochs of 10 steps, cosine over 20..80
    it = progress * 1000
    return ref_adjust_keep_rate(it, it // 10, 20, 80, 10, rate)

  starts = (0.0,) + model.plan().phase_starts()
  ends = starts[1:] + (1.0,)
  got = [tokens(start) for start in starts]
  # Constant outside the cosine; inside, each phase uses its mid-point value.
  want = [count(ref_rate(start if start < 0.2 or start >= 0.8 else (start + end) / 2))
          for start, end in zip(starts, ends)]
  assert got == want == [65, 64, 49, 34, 31]
  assert tokens(None) == count(rate) == 31  # a training call outside the trainer
  assert tokens(0.4, train=False) == 31  # evaluation always uses keep_rate


# ---- 9. the Gumbel keep decision ----------------------------------------------------------------
def test_gumbel_keep_is_hard_with_the_right_frequency():
  lp = jax.nn.log_softmax(jnp.array([[2.0, 0.0], [0.0, 0.0], [-1.0, 1.0], [0.3, -2.0], [-4.0, 0.0]]))
  draws = 20000
  keep = pruning.gumbel_keep(jnp.broadcast_to(lp, (draws,) + lp.shape), jax.random.key(0))
  assert keep.shape == (draws, 5)
  assert set(np.unique(_np(keep))) <= {0.0, 1.0}
  freq = _np(keep).mean(0)
  print(f"gumbel keep frequency - probability: max {np.abs(freq - np.exp(_np(lp)[:, 0])).max():.3g}")
  np.testing.assert_allclose(freq, np.exp(_np(lp)[:, 0]), atol=0.02)
  # Unnormalised logits: the frequency is softmax's, as torch's gumbel_softmax.
  logits = jnp.array([[1.5, 0.5]])
  freq = _np(pruning.gumbel_keep(jnp.broadcast_to(logits, (draws, 1, 2)), jax.random.key(1))).mean()
  assert abs(freq - 1 / (1 + np.exp(-1.0))) < 0.02


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_gumbel_keep_gradient_is_the_soft_samples(tau):
  rng = jax.random.key(4)
  lp = jax.nn.log_softmax(jax.random.normal(jax.random.key(5), (3, 7, 2)))
  c = jax.random.normal(jax.random.key(6), (3, 7))
  keep = pruning.gumbel_keep(lp, rng, tau)
  grad = jax.jit(jax.grad(lambda v: jnp.sum(c * pruning.gumbel_keep(v, rng, tau))))(lp)
  # The soft sample for the same noise, in numpy: softmax((lp + g) / tau).
  g = _np(jax.random.gumbel(rng, lp.shape, jnp.float32))
  z = (_np(lp) + g) / tau
  soft = np.exp(z - z.max(-1, keepdims=True))
  soft /= soft.sum(-1, keepdims=True)
  np.testing.assert_array_equal(keep, (soft[..., 0] > soft[..., 1]).astype(np.float32))
  # d soft_0 / d lp_j = soft_0 (delta_0j - soft_j) / tau
  want = _np(c)[..., None] * soft[..., :1] * (np.eye(2)[0] - soft) / tau
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)
  assert np.abs(_np(grad)).max() > 0


# ---- 10. bad configurations ------------------------------------------------------------------
def _small(token_reduction, **kw):
  return vit.Model(10, variant="Ti/8", depth=4, token_reduction=token_reduction, **kw)


_IMAGES16 = jnp.zeros((1, 32, 32, 3))  # 16 patches


def _init(model, train=False):
  """Traces init (the errors are raised while tracing), computing nothing."""
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1), "reduction": jax.random.key(2)}
  return jax.eval_shape(functools.partial(model.init, train=train), rngs, _IMAGES16)


@pytest.mark.parametrize("method", ["topk", "evit", "dynamicvit"])
@pytest.mark.parametrize("rate", [0, 1.5, -0.1, True])
def test_bad_keep_rates(method, rate):
  with pytest.raises(ValueError, match=rf"{method}: keep_rate must be in \(0, 1\], got {rate!r}"):
    _init(_small({"method": method, "keep_rate": rate, "layers": [1]}))


@pytest.mark.parametrize("spec,pattern", [
    ({"method": "evit", "layers": [4]}, r"'evit' targets layer 4, but the ViT has 4 layers \(0..3\)"),
    ({"method": "topk", "k": 3, "layers": [1, 7]}, r"'topk' targets layer 7, but the ViT has 4 layers"),
    ({"method": "dynamicvit", "layers": [-2]}, r"'dynamicvit' targets layer -2"),
    ({"method": "topk", "k": 20, "layers": [1]}, r"layer 1: topk k=20 but only 16 image tokens reach this layer"),
    ({"method": "topk", "k": [8, 10], "layers": [1, 2]}, r"layer 2: topk k=10 but only 8 image tokens"),
    ({"method": "topk", "k": 3, "keep_rate": 0.5}, r"topk: give exactly one of keep_rate .* and k"),
    ({"method": "topk"}, r"topk: give exactly one of keep_rate .* and k"),
    ({"method": "topk", "k": [3, 2], "layers": [1, 2, 3]}, r"topk: 2 counts k for 3 layers \[1, 2, 3\]"),
    ({"method": "topk", "k": 0, "layers": [1]}, r"topk: k must be positive integers, got 0"),
    ({"method": "evit", "shrink": (0.5, 0.5)}, r"evit: shrink must be \(start, end\) fractions .* got \(0.5, 0.5\)"),
    ({"method": "evit", "shrink": (0.8, 0.2)}, r"evit: shrink must be \(start, end\)"),
    ({"method": "evit", "shrink": (0.1, 0.5), "shrink_levels": 0}, r"evit: shrink_levels must be a positive integer"),
    ({"method": "dynamicvit", "keep_rate": 0.1, "layers": [1, 2]},
     r"layer 2: dynamicvit would keep no token \(int\(16 x 0.01\) = 0\)"),
    ([{"method": "topk", "k": 4, "layers": [1]}, {"method": "dynamicvit", "keep_rate": 0.5, "layers": [2]}],
     r"layer 2: dynamicvit keeps int\(16 x 0.5\) = 8 tokens but only 4 reach this layer"),
], ids=lambda v: str(v)[:40])
def test_bad_pruning_configs_name_the_problem(spec, pattern):
  with pytest.raises(ValueError, match=pattern):
    _init(_small(spec))


@pytest.mark.parametrize("method", ["evit", "topk"])
def test_class_attention_pruning_needs_a_class_token(method):
  spec = {"method": method, "keep_rate": 0.5, "layers": [1]}
  with pytest.raises(ValueError, match=rf"layer 1: {method} ranks tokens by the class token's "
                                       r"attention, but this ViT has no class token; use dynamicvit .* or tome"):
    _init(_small(spec, pool_type="gap", class_token=False))
  # DynamicViT needs no class token.
  _init(_small({"method": "dynamicvit", "keep_rate": 0.5, "layers": [1]}, pool_type="gap", class_token=False))


def test_tome_after_dynamicvit_in_training_is_refused():
  model = _small([{"method": "dynamicvit", "keep_rate": 0.7, "layers": [1]},
                  {"method": "tome", "r": [0, 0, 2, 0]}])
  _init(model)  # inference gathers, so ToMe may follow
  with pytest.raises(ValueError, match=r"tome: the token state carries a keep policy .* Merge before DynamicViT"):
    _init(model, train=True)


# ---- 11. pruning then merging ------------------------------------------------------------------
def test_pruning_then_tome_token_counts():
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)  # 64 patches

  def counts(depth, spec):  # token counts are static: tracing tells them
    model = vit.Model(10, variant="Ti/8", depth=depth, token_reduction=spec)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    return _counts(jax.eval_shape(model.apply, variables, images)[1], depth)

  # By hand: block 1 keeps ceil(0.7 * 64) = 45 + the fused token, block 2 ceil(0.7 * 46) = 33
  # + fused, then ToMe merges 4 in each later block.
  assert counts(6, [{"method": "evit", "keep_rate": 0.7, "layers": [1, 2]},
                    {"method": "tome", "r": [0, 0, 0, 4, 4, 4]}]) == [65, 47, 35, 31, 27, 23]
  # Top-k keeps 20 at block 1, ToMe merges 3 and 3.
  assert counts(4, [{"method": "topk", "k": 20, "layers": [1]}, {"method": "tome", "r": [0, 0, 3, 3]}]) == [65, 21, 18, 15]
  # ToMe before EViT: merges 8 at block 0, EViT keeps ceil(0.5 * 56) = 28 + fused, ToMe 8 more.
  assert counts(3, [{"method": "tome", "r": [8, 0, 8]},
                    {"method": "evit", "keep_rate": 0.5, "layers": [1]}]) == [57, 30, 22]


@pytest.mark.parametrize("prune", ["evit", "topk"])
def test_pruning_then_tome_logits_equal_reference_over_timm_weights(prune):
  """EViT (or top-k) then ToMe, against the reference steps chained: ToMe's proportional
  attention starts in the block after its first merge (the fused token's size is its attention
  mass), so every block before it is exactly the pruning method's."""
  if prune == "evit":
    depth, prune_spec, r = 6, {"method": "evit", "keep_rate": 0.7, "layers": [1, 2]}, [0, 0, 0, 4, 4, 4]
    want_counts, kept_mass = [65, 47, 35, 31, 27, 23], None
  else:
    depth, prune_spec, r = SHORT, {"method": "topk", "k": 20, "layers": [1]}, [0, 0, 3, 3]
    want_counts, kept_mass = [65, 21, 18, 15], 20.0
  model = _timm_model(depth)
  images, nhwc = _images()
  log = []
  post = {i: ref_evit_step(prune_spec.get("keep_rate"), fuse=prune == "evit", k=prune_spec.get("k"), log=log)
          for i in prune_spec["layers"]}
  post.update({i: ref_tome_step(ri) for i, ri in enumerate(r) if ri})
  with torch.no_grad():
    first_merge = min(i for i, ri in enumerate(r) if ri)
    ref, ref_counts, s = ref_forward(model, torch.from_numpy(images), post=post, prop_attn=True,
                                     prop_from=first_merge + 1)
  module, params = _dense(depth)
  spec = [prune_spec, {"method": "tome", "r": r}]
  out, aux = jax.jit(module.clone(token_reduction=spec).apply)({"params": params}, nhwc)
  _, alone = jax.jit(module.clone(token_reduction=prune_spec).apply)({"params": params}, nhwc)
  for i in range(first_merge):  # before ToMe merges, the blocks are the pruning method's alone
    np.testing.assert_array_equal(aux["blocks"][f"block_{i:02d}"], alone["blocks"][f"block_{i:02d}"])
  assert min(e["gap"] for e in log) > 1e-6
  err = _rel_err(out, ref.numpy())
  print(f"{prune}+tome: max abs diff {np.abs(_np(out) - ref.numpy()).max():.3g}, rel {err:.3g}")
  assert err < 1e-4
  assert _counts(aux, depth) == ref_counts == want_counts
  np.testing.assert_allclose(aux["state"].size, s["size"].numpy(), rtol=1e-5)
  if kept_mass is not None:  # the merged tokens' sizes add up to the patches top-k kept
    np.testing.assert_array_equal(_np(aux["state"].size)[:, 1:].sum(1), kept_mass)
