"""ToMe against an independent re-implementation of the reference (facebookresearch/ToMe)
written here in torch: the chosen indices, merged values, sizes, sources, and whole-model
logits of a ToMe-patched timm ViT."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vitoken.convert import from_timm
from vitoken.convert.torch_reference import import_timm
from vitoken.models import vit
from vitoken.models.reducers import base, tome

timm = import_timm()


# ---- the reference algorithm, re-implemented in torch from the paper and reference code ----
def ref_bipartite(metric, r, class_token=False, distill_token=False):
  protected = int(class_token) + int(distill_token)
  t = metric.shape[1]
  r = min(r, (t - protected) // 2)
  if r <= 0:
    return (lambda x, mode: x), None
  metric = metric / metric.norm(dim=-1, keepdim=True)
  a, b = metric[..., ::2, :], metric[..., 1::2, :]
  scores = a @ b.transpose(-1, -2)
  if class_token:
    scores[..., 0, :] = -math.inf
  if distill_token:
    scores[..., :, 0] = -math.inf
  node_max, node_idx = scores.max(dim=-1)
  edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
  unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
  dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
  if class_token:
    unm_idx = unm_idx.sort(dim=1)[0]

  def merge(x, mode):
    src, dst = x[..., ::2, :], x[..., 1::2, :]
    n, t1, c = src.shape
    unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
    src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
    dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
    if distill_token:
      return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
    return torch.cat([unm, dst], dim=1)
  return merge, (unm_idx[..., 0], src_idx[..., 0], dst_idx[..., 0])


def ref_merge_wavg(merge, x, size=None):
  size = torch.ones_like(x[..., 0, None]) if size is None else size
  x = merge(x * size, "sum")
  size = merge(size, "sum")
  return x / size, size


def ref_merge_source(merge, x, source=None):
  if source is None:
    n, t, _ = x.shape
    source = torch.eye(t)[None].expand(n, t, t)
  return merge(source, "amax")


def ref_tome_forward(model, images, rs, prop_attn=True):
  """timm ViT forward with the reference's ToMe block and attention."""
  x = model._pos_embed(model.patch_embed(images))
  x = model.norm_pre(x)
  size = None
  for blk, r in zip(model.blocks, rs):
    y = blk.norm1(x)
    bsz, n, c = y.shape
    attn = blk.attn
    qkv = attn.qkv(y).reshape(bsz, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    if prop_attn and size is not None:
      logits = logits + size.log()[:, None, None, :, 0]
    y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(bsz, n, c)
    x = x + attn.proj(y)
    if r > 0:
      merge, _ = ref_bipartite(k.mean(1), r, class_token=model.cls_token is not None)
      x, size = ref_merge_wavg(merge, x, size)
    x = x + blk.mlp(blk.norm2(x))
  x = model.norm(x)
  if model.global_pool == "avg" and size is not None:
    # The reference's MAE patch: average pooling proportional to token size.
    p = model.num_prefix_tokens
    x = (x * size)[:, p:].sum(dim=1) / size[:, p:].sum(dim=1)
    return model.head(model.fc_norm(x))
  return model.forward_head(x)


# ---- tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("t,r,protected", [(17, 4, 0), (17, 8, 1), (16, 5, 1), (20, 6, 2), (9, 30, 1), (12, 3, 0)],
                         ids=lambda v: str(v))
def test_matching_and_merge_equal_the_reference(t, r, protected):
  rng = np.random.RandomState(t * 100 + r)
  metric = rng.randn(3, t, 8).astype(np.float32)
  x = rng.randn(3, t, 5).astype(np.float32)
  size = rng.randint(1, 5, (3, t)).astype(np.float32)
  merge, (unm, src, dst) = ref_bipartite(torch.from_numpy(metric), r, protected >= 1, protected >= 2)
  x_ref, size_ref = ref_merge_wavg(merge, torch.from_numpy(x), torch.from_numpy(size)[..., None])
  src_ref = ref_merge_source(merge, torch.from_numpy(x))

  m = tome.bipartite_soft_matching(jnp.asarray(metric), r, protected)
  np.testing.assert_array_equal(m.unm_idx, unm.numpy())
  np.testing.assert_array_equal(m.src_idx, src.numpy())
  np.testing.assert_array_equal(m.dst_idx, dst.numpy())
  state = base.TokenState.create(jnp.asarray(x), num_prefix=protected, grid=(1, t - protected),
                                 track_source=True).replace(size=jnp.asarray(size))
  out = tome.merge_state(m, state)
  np.testing.assert_allclose(out.x, x_ref.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out.size, size_ref.numpy()[..., 0])
  np.testing.assert_array_equal(out.source, src_ref.numpy())
  r_eff = min(r, (t - protected) // 2)
  assert out.num_tokens == t - r_eff
  np.testing.assert_array_equal(out.ids[:, :protected], np.broadcast_to(np.arange(protected), (3, protected)))


def test_registers_are_protected_and_keep_their_order():
  metric = jax.random.normal(jax.random.key(0), (2, 21, 8))
  state = base.TokenState.create(jax.random.normal(jax.random.key(1), (2, 21, 4)), num_prefix=5,
                                 grid=(4, 4), track_source=True)
  out = tome.merge_state(tome.bipartite_soft_matching(metric, 8, 5), state)
  assert out.num_tokens == 13
  np.testing.assert_array_equal(out.ids[:, :5], np.broadcast_to(np.arange(5), (2, 5)))
  np.testing.assert_array_equal(out.x[:, :5], state.x[:, :5])
  np.testing.assert_array_equal(out.size[:, :5], 1.0)


def ref_kth(metric, x, k):
  """Reference kth_bipartite_soft_matching + merge "sum", in numpy."""
  t_rnd = (x.shape[1] // k) * k
  def split(v):
    v = v[:, :t_rnd].reshape(v.shape[0], -1, k, v.shape[2])
    return v[:, :, :k - 1].reshape(v.shape[0], -1, v.shape[-1]), v[:, :, k - 1]
  mn = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
  a, b = split(mn)
  dst_idx = (a @ b.transpose(0, 2, 1)).argmax(-1)
  src, dst = split(x)
  dst = dst.copy()
  for n in range(x.shape[0]):
    np.add.at(dst[n], dst_idx[n], src[n])
  return dst


@pytest.mark.parametrize("k,t", [(2, 16), (3, 17), (4, 16)])
def test_kth_matching_equals_reference(k, t):
  rng = np.random.RandomState(k)
  metric, x = rng.randn(2, t, 6).astype(np.float32), rng.randn(2, t, 3).astype(np.float32)
  m = tome.kth_bipartite_soft_matching(jnp.asarray(metric), k)
  np.testing.assert_allclose(tome.merge(m, jnp.asarray(x), "sum"), ref_kth(metric, x, k), rtol=1e-5, atol=1e-6)


def test_random_matching_follows_the_reference_given_the_same_split():
  rng = np.random.RandomState(0)
  metric, x = rng.randn(2, 12, 6).astype(np.float32), rng.randn(2, 12, 3).astype(np.float32)
  key, r = jax.random.key(3), 4
  m = tome.random_bipartite_soft_matching(jnp.asarray(metric), r, key)
  perm = np.argsort(np.asarray(jax.random.uniform(key, (2, 12))), axis=1)
  a_idx, b_idx = perm[:, :r], perm[:, r:]
  np.testing.assert_array_equal(m.b_idx, b_idx)
  mn = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
  want = []
  for n in range(2):
    a, b = mn[n][a_idx[n]], mn[n][b_idx[n]]
    dst = x[n][b_idx[n]].copy()
    np.add.at(dst, (a @ b.T).argmax(-1), x[n][a_idx[n]])
    want.append(dst)
  np.testing.assert_allclose(tome.merge(m, jnp.asarray(x), "sum"), np.stack(want), rtol=1e-5, atol=1e-6)


def test_parse_r_matches_reference_formula():
  assert tome.parse_r(12, 16) == [16] * 12
  assert tome.parse_r(12, 16, -0.5) == [int(24 + (-16 / 11) * i) for i in range(12)]
  assert tome.parse_r(12, 8, 1.0) == [int(0 + (16 / 11) * i) for i in range(12)]
  assert tome.parse_r(4, [3, 2]) == [3, 2, 0, 0]
  with pytest.raises(ValueError, match="5 entries but the ViT has 4 layers"):
    tome.parse_r(4, [1, 1, 1, 1, 1])


def _timm_model(name="vit_tiny_patch16_224", seed=0, **kw):
  torch.manual_seed(seed)
  model = timm.create_model(name, pretrained=False, img_size=128, **kw).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model


@pytest.mark.parametrize("spec,kw", [
    ({"r": 8}, {}),
    ({"r": 16}, {}),  # capped in later layers, as in the paper's r=16 setting for ViT-B
    ({"r": 12, "inflection": -1.0}, {}),
    ({"r": [12, 10, 0, 5]}, {}),
    ({"r": 8, "prop_attn": False}, {}),
    ({"r": 8}, {"global_pool": "avg", "class_token": False}),
], ids=["r8", "r16", "decreasing", "list", "no_prop_attn", "gap"])
def test_tome_vit_logits_equal_reference_patched_timm(spec, kw):
  model = _timm_model(**kw)
  images = np.random.RandomState(1).randn(2, 3, 128, 128).astype(np.float32)
  depth = len(model.blocks)
  r = spec["r"]
  rs = tome.parse_r(depth, r, spec.get("inflection"))
  with torch.no_grad():
    ref = ref_tome_forward(model, torch.from_numpy(images), rs, spec.get("prop_attn", True)).numpy()
  module, params = from_timm(model, token_reduction={"method": "tome", **spec})
  out, aux = jax.jit(module.apply)({"params": params}, images.transpose(0, 2, 3, 1))
  assert np.abs(np.asarray(out) - ref).max() < 1e-4
  # Token count per layer follows the (capped) schedule.
  t, p = 64 + int(model.cls_token is not None), int(model.cls_token is not None)
  counts = []
  for i in range(depth):
    t -= min(rs[i], (t - p) // 2)
    counts.append(t)
  assert [aux["blocks"][f"block_{i:02d}"].shape[1] for i in range(depth)] == counts


def test_r_zero_equals_plain_vit():
  model = vit.Model(10, variant="Ti/8", depth=3, head_zeroinit=False)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = model.init(jax.random.key(1), images)
  tomed = vit.Model(10, variant="Ti/8", depth=3, head_zeroinit=False,
                    token_reduction={"method": "tome", "r": 0, "prop_attn": False})
  np.testing.assert_array_equal(model.apply(variables, images)[0], tomed.apply(variables, images)[0])
  assert tomed.plan().empty


def test_no_recompilation_across_batches_and_gradients_flow():
  model = vit.Model(10, variant="Ti/8", depth=3, head_zeroinit=False,
                    token_reduction={"method": "tome", "r": 6})
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  params = model.init(jax.random.key(1), images)["params"]
  traces = []

  @jax.jit
  def grads(params, images):
    traces.append(1)
    return jax.grad(lambda p: model.apply({"params": p}, images)[0].sum())(params)

  for i in range(3):
    g = grads(params, images * (i + 1))
  assert len(traces) == 1
  norms = {k: float(jnp.linalg.norm(jnp.concatenate([x.ravel() for x in jax.tree.leaves(v)])))
           for k, v in g.items()}
  assert all(np.isfinite(list(norms.values()))) and norms["block_00"] > 0 and norms["embedding"] > 0


def test_matching_is_under_stop_gradient():
  """Gradients of the merged output never flow into the similarity metric."""
  x = jax.random.normal(jax.random.key(0), (1, 9, 4))
  def f(metric):
    state = base.TokenState.create(x, num_prefix=1, grid=(2, 4))
    return tome.merge_state(tome.bipartite_soft_matching(metric, 3, 1), state).x.sum()
  np.testing.assert_array_equal(jax.grad(f)(jax.random.normal(jax.random.key(1), (1, 9, 4))), 0.0)


@pytest.mark.parametrize("spec,pattern", [
    ({"r": [30, 30]}, r"layer 1: tome r=30 but 35 tokens reach this layer \(1 protected\), so at most 17 can merge"),
    ({"r": 40}, r"layer 0: tome r=40 but 65 tokens reach this layer"),
    ({"r": [1, 1, 1, 1]}, "4 entries but the ViT has 3 layers"),
    ({"r": 4, "matching": "greedy"}, "matching must be one of"),
    ({"r": 4, "colour": 1}, r"unknown token_reduction method 'tome' key 'colour'"),
])
def test_bad_tome_configs_name_the_layer_and_count(spec, pattern):
  model = vit.Model(10, variant="Ti/8", depth=3, token_reduction={"method": "tome", **spec})
  with pytest.raises(ValueError, match=pattern):
    model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


def test_unmerge_restores_a_full_resolution_map():
  model = vit.Model(10, variant="Ti/8", depth=3, pool_type="gap",
                    token_reduction={"method": "tome", "r": 4, "trace_source": True})
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  _, aux = model.apply(model.init(jax.random.key(1), images), images)
  state = aux["state"]
  full = tome.unmerge(state.x, state.source)
  assert full.shape == (2, 16, 192) and state.num_tokens == 16 - 3 * 4
  group = np.asarray(state.source).argmax(1)  # [B, N0]: which merged token holds each patch
  np.testing.assert_allclose(full, np.take_along_axis(np.asarray(state.x), group[..., None], 1), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(state.source).sum(1), 1.0)
  np.testing.assert_allclose(state.size, np.asarray(state.source).sum(-1))


def test_tome_and_dense_training_runs_both_learn(tmp_path):
  from configs import quickstart
  from vitoken.engine.metrics import read_jsonl
  from vitoken.train import trainer

  def run(arg):
    c = quickstart.get_config(arg)
    c.progress_bar, c.log_every_steps, c.eval_every_steps = False, 1, 0
    c.total_steps, c.batch_size, c.optim.lr, c.schedule.warmup_steps = 200, 64, 5e-3, 5
    c.data.train_examples, c.checkpoint.every_steps = 4096, 200
    summary = trainer.run(c, str(tmp_path / arg))
    losses = [r["loss"] for r in read_jsonl(str(tmp_path / arg / "metrics.jsonl")) if r["split"] == "train"]
    return summary, losses

  for arg in ("runlocal", "runlocal,tome=8"):
    summary, losses = run(arg)
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.05, (arg, losses[:8], losses[-8:])
    assert summary["eval"]["loss"] < np.log(10) - 0.02, (arg, summary["eval"])


def test_random_matching_draws_its_own_key_at_every_layer(monkeypatch):
  """matching="random" splits each layer's tokens with a key of that layer: the same key at
  every layer would tie the layers' splits together (identical noise wherever their token
  counts agree). The keys and splits each layer draws are read from inside the jitted apply."""
  depth, batch = 4, 1
  model = vit.Model(10, patch_size=(8, 8), width=32, depth=depth, num_heads=2, mlp_dim=64,
                    pool_type="gap", head_zeroinit=False,
                    token_reduction={"method": "tome", "r": 2, "matching": "random"})
  assert model.rng_streams() == {"reduction"}
  images = jax.random.normal(jax.random.key(0), (batch, 32, 32, 3))
  variables = jax.jit(model.init)({"params": jax.random.key(1), "reduction": jax.random.key(2)},
                                  images)

  seen, traced = {}, []
  original = tome.random_bipartite_soft_matching

  def spy(metric, r, rng, num_protected=0):
    m = original(metric, r, rng, num_protected)
    call = len(traced)  # layers trace in order: call i is layer i
    traced.append(r)
    data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    jax.debug.callback(lambda k, a, b: seen.__setitem__(call, (np.asarray(k), np.asarray(a),
                                                              np.asarray(b))),
                       data, m.a_idx, m.b_idx)
    return m

  monkeypatch.setattr(tome, "random_bipartite_soft_matching", spy)
  apply = jax.jit(lambda v, x, k: model.apply(v, x, rngs={"reduction": k}))
  logits, aux = apply(variables, images, jax.random.key(3))
  jax.effects_barrier()
  assert traced == [2] * depth and sorted(seen) == list(range(depth))
  assert aux["state"].num_tokens == 16 - 2 * depth
  keys = [seen[i][0].tobytes() for i in range(depth)]
  assert len(set(keys)) == depth, "two layers drew the same random-matching key"
  # The splits differ: no two layers order the positions they all have alike (with one
  # example and partitionable threefry, one key shared by the layers would order them alike).
  perms = [np.concatenate([seen[i][1], seen[i][2]], axis=1) for i in range(depth)]
  common = min(p.shape[1] for p in perms)
  ranks = [np.argsort(np.argsort(p, axis=1)[:, :common], axis=1) for p in perms]
  assert all(not np.array_equal(ranks[i], ranks[j]) for i in range(depth) for j in range(i))

  # The keys follow the apply's "reduction" key: the same key draws the same splits (and
  # logits), another key draws other splits at every layer.
  seen.clear()
  again, _ = apply(variables, images, jax.random.key(3))
  jax.effects_barrier()
  np.testing.assert_array_equal(again, logits)
  assert [seen[i][0].tobytes() for i in range(depth)] == keys
  seen.clear()
  apply(variables, images, jax.random.key(4))
  jax.effects_barrier()
  other = [seen[i][0].tobytes() for i in range(depth)]
  assert len(set(other)) == depth and not set(other) & set(keys)
