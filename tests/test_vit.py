"""The ViT module: variants, every architectural switch, scan/remat, dtypes, stochastic depth."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitoken.models import layers, layout, posemb, variants, vit

IMAGES = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))


def _small(**kw):
  kw.setdefault("head_zeroinit", False)
  return vit.Model(5, variant="Ti/8", depth=3, **kw)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("variant,width,depth,mlp,heads", [
    ("Ti", 192, 12, 768, 3), ("S", 384, 12, 1536, 6), ("M", 512, 12, 2048, 8),
    ("B", 768, 12, 3072, 12), ("L", 1024, 24, 4096, 16), ("H", 1280, 32, 5120, 16),
    ("g", 1408, 40, 6144, 16), ("G", 1664, 48, 8192, 16)])
def test_variants_follow_big_vision(variant, width, depth, mlp, heads):
  assert variants.decode_variant(variant) == dict(width=width, depth=depth, mlp_dim=mlp, num_heads=heads)
  assert variants.decode_variant(variant + "/14")["patch_size"] == (14, 14)


@pytest.mark.parametrize("variant,timm_count", [
    ("Ti/16", 5_717_416), ("S/16", 22_050_664), ("B/16", 86_567_656), ("B/32", 88_224_232)])
def test_parameter_counts_equal_timm(variant, timm_count):
  """timm's published counts for vit_{tiny,small,base}_patch{16,32}_224 (1000 classes)."""
  model = vit.Model(1000, variant=variant, posemb_prefix=True)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  assert _count(shapes["params"]) == timm_count


@pytest.mark.parametrize("kw,top_level", [
    ({}, {"embedding", "cls", "pos_embedding", "encoder_norm", "head"}),
    ({"pool_type": "gap"}, {"embedding", "pos_embedding", "encoder_norm", "head"}),
    ({"pool_type": "gap", "fc_norm": True}, {"embedding", "pos_embedding", "fc_norm", "head"}),
    ({"pool_type": "map"}, {"embedding", "pos_embedding", "encoder_norm", "map_head", "head"}),
    ({"num_registers": 4}, {"embedding", "cls", "registers", "pos_embedding", "encoder_norm", "head"}),
    ({"posemb": "sincos2d", "pre_norm": True}, {"embedding", "cls", "norm_pre", "encoder_norm", "head"}),
    ({"posemb": "none", "rep_size": 16}, {"embedding", "cls", "encoder_norm", "pre_logits", "head"}),
    ({"pool_type": "none"}, {"embedding", "pos_embedding", "encoder_norm", "head"}),
], ids=["tok", "gap", "gap_fcnorm", "map", "registers", "sincos_prenorm", "rep_size", "none"])
def test_configurations_build_and_run(kw, top_level):
  model = _small(**kw)
  variables = model.init(jax.random.key(0), IMAGES)
  assert set(variables["params"]) == top_level | {f"block_{i:02d}" for i in range(3)}
  logits, aux = model.apply(variables, IMAGES)
  n = 16 + model.num_prefix
  expected = (2, n, 5) if model.pool_type == "none" else (2, 5)
  assert logits.shape == expected and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  assert aux["stem"].shape == (2, 4, 4, 192)
  assert [aux["blocks"][f"block_{i:02d}"].shape for i in range(3)] == [(2, n, 192)] * 3
  assert aux["encoded"].shape == (2, n, 192)


def test_layer_scale_and_no_qkv_bias():
  model = _small(layer_scale_init=0.1, qkv_bias=False)
  p = model.init(jax.random.key(0), IMAGES)["params"]["block_00"]
  np.testing.assert_array_equal(p["ls1"]["gamma"], np.float32(0.1))
  assert "bias" not in p["attn"]["qkv"]


def test_sincos_posemb_matches_big_vision_formula():
  h, w, c = 3, 5, 16
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  omega = 1.0 / 10_000 ** (np.arange(c // 4) / (c // 4 - 1))
  ox, oy = xs.reshape(-1, 1) * omega, ys.reshape(-1, 1) * omega
  want = np.concatenate([np.sin(ox), np.cos(ox), np.sin(oy), np.cos(oy)], axis=1)
  np.testing.assert_allclose(posemb.sincos_2d((h, w), c)[0], want, atol=1e-6)


def test_resize_posemb_keeps_prefix_and_constant_fields():
  table = jnp.concatenate([jnp.full((1, 2, 8), 7.0), jnp.full((1, 16, 8), 3.0)], axis=1)
  out = posemb.resize_posemb(table, (4, 4), (6, 3), num_prefix=2)
  assert out.shape == (1, 2 + 18, 8)
  np.testing.assert_allclose(out[:, :2], 7.0)
  np.testing.assert_allclose(out[:, 2:], 3.0, atol=1e-5)
  assert posemb.resize_posemb(table, (4, 4), (4, 4), num_prefix=2) is not None
  with pytest.raises(ValueError, match="does not match a 5x5 grid"):
    posemb.resize_posemb(table, (5, 5), (6, 6), num_prefix=2)


@pytest.mark.parametrize("remat_policy", [None, "nothing_saveable", "dots_saveable"])
def test_scan_equals_unrolled_layers(remat_policy):
  plain = _small()
  variables = plain.init(jax.random.key(0), IMAGES)
  scanned = _small(scan=True, remat_policy=remat_policy)
  sparams = layout.to_scanned(variables["params"])
  assert jax.tree.structure(sparams) == jax.tree.structure(scanned.init(jax.random.key(0), IMAGES)["params"])
  out, aux = plain.apply(variables, IMAGES)
  sout, saux = scanned.apply({"params": sparams}, IMAGES)
  np.testing.assert_allclose(out, sout, atol=1e-5)
  np.testing.assert_allclose(np.stack([aux["blocks"][f"block_{i:02d}"] for i in range(3)]),
                             saux["blocks"], atol=1e-5)
  loss = lambda m, p: lambda p: m.apply({"params": p}, IMAGES)[0].sum()
  g = jax.grad(loss(plain, None))(variables["params"])
  sg = jax.grad(loss(scanned, None))(sparams)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max()),
               layout.to_scanned(g), sg)
  jax.tree.map(np.testing.assert_array_equal, layout.to_unscanned(sparams), variables["params"])


def test_bf16_compute_keeps_fp32_params_and_logits():
  f32 = _small()
  variables = f32.init(jax.random.key(0), IMAGES)
  bf16 = _small(dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16.init(jax.random.key(0), IMAGES)))
  out, aux = bf16.apply(variables, IMAGES)
  assert out.dtype == jnp.float32 and aux["blocks"]["block_00"].dtype == jnp.bfloat16
  ref = f32.apply(variables, IMAGES)[0]
  assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_return_attention_gives_row_stochastic_maps():
  model = _small(return_attention=True)
  variables = model.init(jax.random.key(0), IMAGES)
  logits, aux = model.apply(variables, IMAGES)
  np.testing.assert_allclose(logits, _small().apply(variables, IMAGES)[0], atol=1e-5)
  probs = aux["attention"]["block_02"]
  assert probs.shape == (2, 3, 17, 17)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_stochastic_depth_rates_are_linear():
  assert vit.stochastic_depth_rates(0.3, 4) == pytest.approx([0.0, 0.1, 0.2, 0.3])
  assert vit.stochastic_depth_rates(0.5, 1) == [0.0]


def test_drop_path_drops_whole_examples_and_rescales():
  class Probe(__import__("flax").linen.Module):
    @__import__("flax").linen.compact
    def __call__(self, x, rate):
      return layers.drop_path(self, x, rate, deterministic=False)
  x = jnp.ones((4000, 3, 2))
  y = Probe().apply({}, x, 0.25, rngs={"dropout": jax.random.key(0)})
  per_example = np.asarray(y).reshape(4000, -1)
  assert np.all(np.isclose(per_example, 0.0) | np.isclose(per_example, 1 / 0.75))
  assert (per_example == per_example[:, :1]).all()  # the whole example is kept or dropped
  assert abs((per_example[:, 0] == 0).mean() - 0.25) < 0.03
  np.testing.assert_allclose(per_example.mean(), 1.0, atol=0.05)


def test_train_mode_is_random_and_eval_is_deterministic():
  model = _small(drop_path_rate=0.5, dropout=0.1)
  variables = model.init(jax.random.key(0), IMAGES)
  a = model.apply(variables, IMAGES, train=True, rngs={"dropout": jax.random.key(1)})[0]
  b = model.apply(variables, IMAGES, train=True, rngs={"dropout": jax.random.key(2)})[0]
  assert np.abs(a - b).max() > 1e-4
  np.testing.assert_array_equal(model.apply(variables, IMAGES)[0], model.apply(variables, IMAGES)[0])
  quiet = _small()
  np.testing.assert_allclose(quiet.apply(variables, IMAGES, train=True, rngs={"dropout": jax.random.key(1)})[0],
                             quiet.apply(variables, IMAGES)[0], atol=1e-6)


def test_jit_compiles_once_per_shape_and_grads_are_finite():
  model = _small(drop_path_rate=0.1)
  variables = model.init(jax.random.key(0), IMAGES)
  traces = []

  @jax.jit
  def step(params, images, key):
    traces.append(1)
    def loss(p):
      return model.apply({"params": p}, images, train=True, rngs={"dropout": key})[0].mean()
    return jax.value_and_grad(loss)(params)

  for i in range(3):
    _, grads = step(variables["params"], IMAGES + i, jax.random.key(i))
  assert len(traces) == 1
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
