"""LookupViT (`vitoken/models/reducers/lookup.py`) against independent numpy references.

The resize matrix, the bidirectional cross-attention and a whole LookupViT forward are
recomputed in float64 numpy from the flax parameters; training-grid padding is checked against
the grid run alone; converted timm checkpoints load as they are; a tiny model learns.
"""
import functools
import math

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import special

from vitoken.models import vit
from vitoken.models.reducers import lookup

# ---- numpy reference ---------------------------------------------------------------------

EPS = 1e-6


def np_ln(x, p, eps=EPS):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_softmax(a, axis):
  a = a - a.max(axis=axis, keepdims=True)
  e = np.exp(a)
  return e / e.sum(axis=axis, keepdims=True)


def np_gelu(x):  # exact (erf) GELU
  return 0.5 * x * (1.0 + special.erf(x / math.sqrt(2.0)))


def np_dense(x, p):
  return x @ p["kernel"] + p["bias"]


def np_heads(x, p):  # DenseGeneral C -> [H, D]
  return np.einsum("bnc,chd->bnhd", x, p["kernel"]) + p["bias"]


def np_merge(y, p):  # DenseGeneral [H, D] -> C
  return np.einsum("bnhd,hdc->bnc", y, p["kernel"]) + p["bias"]


def np_mlp(x, p):
  return np_dense(np_gelu(np_dense(x, p["fc1"])), p["fc2"])


def np_self_attention(x, p):
  qkv = np.einsum("bnc,cthd->bnthd", x, p["qkv"]["kernel"]) + p["qkv"]["bias"]
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  a = np.einsum("bmhd,bnhd->bhmn", q, k) / math.sqrt(q.shape[-1])
  y = np.einsum("bhmn,bnhd->bmhd", np_softmax(a, -1), v)
  return np_merge(y, p["out"])


def np_cross_logits(compressed_ln, lookup_ln, p):
  q, k = np_heads(compressed_ln, p["q"]), np_heads(lookup_ln, p["k"])
  return np.einsum("bmhd,bnhd->bhmn", q, k) / math.sqrt(q.shape[-1])


def np_gather(a, lookup_ln, p):
  """compressed update: softmax over the lookup tokens N."""
  v = np_heads(lookup_ln, p["v"])
  return np_merge(np.einsum("bhmn,bnhd->bmhd", np_softmax(a, 3), v), p["out"])


def np_scatter(a, compressed_ln, p):
  """lookup update from the same logits: softmax over the compressed tokens M."""
  v = np_heads(compressed_ln, p["v_back"])
  return np_merge(np.einsum("bhmn,bmhd->bnhd", np_softmax(a, 2), v), p["out_back"])


def np_resize_weights(n_in, n_out):
  """[n_out, n_in] antialiased bilinear (triangle filter, half-pixel centres) weights."""
  scale = n_out / n_in
  support = max(1.0 / scale, 1.0)  # antialias: the triangle widens when downsampling
  centres = (np.arange(n_out) + 0.5) / scale - 0.5
  w = np.maximum(0.0, 1.0 - np.abs(centres[:, None] - np.arange(n_in)[None, :]) / support)
  return w / w.sum(1, keepdims=True)


def np_resize_matrix(patches, compressed):
  return np.kron(np_resize_weights(patches[0], compressed[0]),
                 np_resize_weights(patches[1], compressed[1]))


def np_lookup_vit(params, images, *, patch, grid, class_token, pool, layers=None, depth=None,
                  resize=None):
  """The LookupViT forward of the module docstring, in float64: (logits, [tokens per block]).
  `resize` replaces the [M, N] resize matrix."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  images = np.asarray(images, np.float64)
  b, hh, ww, ch = images.shape
  gh, gw = hh // patch, ww // patch
  x = images.reshape(b, gh, patch, gw, patch, ch).transpose(0, 1, 3, 2, 4, 5)
  x = np.einsum("bijpqc,pqcd->bijd", x, p["embedding"]["kernel"]) + p["embedding"]["bias"]
  x = x.reshape(b, gh * gw, -1)
  prefix = 1 if class_token else 0
  pos = p["pos_embedding"]
  if pos.shape[1] == gh * gw:  # class token without a position
    x = x + pos
  if class_token:
    x = np.concatenate([np.broadcast_to(p["cls"], (b, 1, x.shape[-1])), x], 1)
  if prefix and pos.shape[1] == prefix + gh * gw:  # timm's classic layout: the class token has one too
    x = x + pos
  depth = depth if depth is not None else len([k for k in p if k.startswith("block_")])
  layers = list(range(depth)) if layers is None else list(layers)
  r = np_resize_matrix((gh, gw), grid) if resize is None else resize
  look, blocks = None, []
  for i in range(depth):
    bp = p[f"block_{i:02d}"]
    if i in layers:
      lp = bp["lookup"]
      if i == layers[0]:
        look = x[:, prefix:]
        x = np.concatenate([x[:, :prefix], np.einsum("mn,bnc->bmc", r, look)], 1)
      look_ln = np_ln(look, lp["norm_lookup"])
      a = np_cross_logits(np_ln(x, lp["norm_compressed"]), look_ln, lp["cross"])
      x = x + np_gather(a, look_ln, lp["cross"])
    x = x + np_self_attention(np_ln(x, bp["norm1"]), bp["attn"])
    x = x + np_mlp(np_ln(x, bp["norm2"]), bp["mlp"])
    if i in layers and i != layers[-1]:
      look = look + np_scatter(a, np_ln(x, lp["norm_back"]), lp["cross"])
      look = look + np_mlp(np_ln(look, lp["norm_mlp"]), lp["mlp"])
    blocks.append(x)
  x = np_ln(x, p["encoder_norm"])
  pooled = x[:, 0] if pool == "tok" else x[:, prefix:].mean(1)
  return np_dense(pooled, p["head"]), blocks


# ---- helpers -------------------------------------------------------------------------------


def make_model(grid=2, *, width=16, depth=3, heads=2, patch=4, pool="gap", class_token=False,
               num_classes=5, **entry):
  return vit.Model(num_classes, width=width, depth=depth, num_heads=heads, mlp_dim=2 * width,
                   patch_size=(patch, patch), pool_type=pool, class_token=class_token,
                   head_zeroinit=False,
                   token_reduction={"method": "lookup", "grid": grid, "mlp_ratio": 0.5, **entry})


def randomise(params, seed, scale=0.2):
  """Adds noise to every leaf (layer-norm scales around 1), so nothing is trivially zero."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda v: jnp.asarray(np.asarray(v) + scale * rng.standard_normal(v.shape), jnp.float32),
      params)


def random_params(model, size, seed):
  """Random parameters of the model's init shapes (no compilation): kernels ~ N(0, 1/fan_in),
  layer-norm scales ~ 1 + N(0, 0.2^2), biases, embeddings and class token ~ N(0, 0.2^2)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in traverse_util.flatten_dict(shapes).items():
    shape, noise = leaf.shape, rng.standard_normal(leaf.shape)
    if path[-1] == "scale":
      value = 1.0 + 0.2 * noise
    elif path[-1] == "kernel":
      fan_in = (np.prod(shape[:3]) if path[0] == "embedding" else
                np.prod(shape[:2]) if path[-2] in ("out", "out_back") else shape[0])
      value = noise / np.sqrt(fan_in)
    else:
      value = 0.2 * noise
    out[path] = jnp.asarray(value, jnp.float32)
  return traverse_util.unflatten_dict(out)


def images(batch, size, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, size, size, 3)),
                     jnp.float32)


def flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


# ---- 1. resize matrix ------------------------------------------------------------------------


@pytest.mark.parametrize("patches,compressed", [((8, 8), (3, 3)), ((7, 7), (4, 4)),
                                                ((6, 8), (3, 4)), ((5, 5), (5, 5))])
def test_resize_matrix_equals_independent_resizes(patches, compressed):
  r = lookup.resize_matrix(patches, compressed)
  m, n = compressed[0] * compressed[1], patches[0] * patches[1]
  assert r.shape == (m, n)
  # An independent numpy antialiased bilinear (triangle) filter, separable over rows/columns.
  np.testing.assert_allclose(r, np_resize_matrix(patches, compressed), atol=1e-6)
  np.testing.assert_allclose(r.sum(1), 1.0, atol=1e-6)
  assert (r >= -1e-7).all()
  # jax.image.resize of a random multi-channel grid equals R @ the flattened grid.
  g = np.random.default_rng(0).standard_normal(patches + (5,)).astype(np.float32)
  want = jax.image.resize(jnp.asarray(g), compressed + (5,), "bilinear", antialias=True)
  np.testing.assert_allclose(r @ g.reshape(n, 5), np.asarray(want).reshape(m, 5), atol=1e-5)
  if patches == compressed:
    np.testing.assert_allclose(r, np.eye(n), atol=1e-6)


# ---- 2. full forward parity ------------------------------------------------------------------


@pytest.mark.parametrize("pool,class_token,grid,layers", [
    ("gap", False, 2, None),
    ("tok", True, 2, None),
    ("gap", True, (2, 3), [1]),  # non-square grid; one LookupViT block (first and last)
    ("tok", True, 3, [1, 2]),  # a dense block first, LookupViT from block 1
    ("gap", False, 3, [0, 1]),  # LookupViT in blocks 0-1, block 2 a plain block on M tokens
])
def test_forward_equals_numpy_reference(pool, class_token, grid, layers):
  size = 16
  model = make_model(grid, pool=pool, class_token=class_token,
                     **({"layers": layers} if layers is not None else {}))
  params = random_params(model, size, seed=1)
  x = images(3, size, seed=2)
  logits, aux = jax.jit(model.apply)({"params": params}, x)
  g = lookup.parse_grid(grid)
  want, blocks = np_lookup_vit(params, x, patch=4, grid=g, class_token=class_token, pool=pool,
                               layers=layers)
  n_prefix = int(class_token)
  for i, ref in enumerate(blocks):
    got = np.asarray(aux["blocks"][f"block_{i:02d}"])
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4, err_msg=f"block {i}")
  err = float(np.abs(np.asarray(logits, np.float64) - want).max())
  print(f"forward parity {pool} cls={class_token} grid={grid} layers={layers}: max|dlogits| = "
        f"{err:.2e} (logit scale {np.abs(want).max():.2f})")
  assert np.abs(want).max() > 0.5  # the check is not on near-zero numbers
  assert err < 1e-4, err
  lookup_layers = range(3) if layers is None else layers
  assert aux["blocks"][f"block_{max(lookup_layers):02d}"].shape[1] == n_prefix + g[0] * g[1]


def test_grid_equal_to_patch_grid_with_silent_gather_is_the_dense_vit():
  """R = identity: the compressed tokens start as the lookup tokens; with the gather's output
  projection zeroed nothing else reaches them, so the logits are the dense ViT's."""
  size = 16
  model = make_model(4, pool="tok", class_token=True)
  dense = vit.Model(5, width=16, depth=3, num_heads=2, mlp_dim=32, patch_size=(4, 4),
                    pool_type="tok", class_token=True, head_zeroinit=False)
  params = flat(random_params(model, size, seed=3))
  for k in params:
    if "/lookup/cross/out/" in k:
      params[k] = jnp.zeros_like(params[k])
  dense_params = {k: v for k, v in params.items() if "/lookup/" not in k}
  x = images(2, size, seed=4)
  got, aux = jax.jit(model.apply)({"params": traverse_util.unflatten_dict(params, sep="/")}, x)
  want, dense_aux = jax.jit(dense.apply)(
      {"params": traverse_util.unflatten_dict(dense_params, sep="/")}, x)
  assert aux["blocks"]["block_00"].shape == dense_aux["blocks"]["block_00"].shape == (2, 17, 16)
  np.testing.assert_allclose(aux["blocks"]["block_00"], dense_aux["blocks"]["block_00"],
                             atol=1e-5)
  np.testing.assert_allclose(got, want, atol=1e-5)


# ---- 3. the cross-attention module -----------------------------------------------------------


def _cross_attention(b, m, n, c, h, seed, **randomise_kw):
  """A BidirectionalCrossAttention, random compressed/lookup tokens and randomised params."""
  mod = lookup.BidirectionalCrossAttention(c, h)
  rng = np.random.default_rng(seed)
  comp = jnp.asarray(rng.standard_normal((b, m, c)), jnp.float32)
  look = jnp.asarray(rng.standard_normal((b, n, c)), jnp.float32)
  params = randomise(mod.init(jax.random.key(1), comp, look)["params"], seed=seed + 1,
                     **randomise_kw)
  return mod, rng, comp, look, params


def test_bidirectional_cross_attention_shares_its_logits():
  b, m, n, c, h = 2, 5, 11, 12, 3
  mod, rng, comp, look, params = _cross_attention(b, m, n, c, h, seed=5, scale=0.3)
  assert set(params) == {"q", "k", "v", "out", "v_back", "out_back"}  # no second q/k
  up_p, up_l, a = mod.apply({"params": params}, comp, look)
  assert a.shape == (b, h, m, n) and up_p.shape == (b, m, c) and up_l.shape == (b, n, c)
  p = jax.tree.map(lambda t: np.asarray(t, np.float64), params)
  comp64, look64 = np.asarray(comp, np.float64), np.asarray(look, np.float64)
  ref_a = np_cross_logits(comp64, look64, p)
  np.testing.assert_allclose(a, ref_a, atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(up_p, np_gather(ref_a, look64, p), atol=1e-4, rtol=1e-5)
  # The reverse direction is a function of exactly the returned logits (softmax over M).
  a64 = np.asarray(a, np.float64)
  np.testing.assert_allclose(up_l, np_scatter(a64, comp64, p), atol=1e-4, rtol=1e-5)
  # ...and of nothing else: scatter on arbitrary logits follows them.
  other = jnp.asarray(rng.standard_normal(a.shape) * 3, jnp.float32)
  got = mod.apply({"params": params}, comp, other, method=mod.scatter)
  np.testing.assert_allclose(got, np_scatter(np.asarray(other, np.float64), comp64, p),
                             atol=1e-4, rtol=1e-5)
  got_gather, a2 = mod.apply({"params": params}, comp, look, method=mod.gather)
  np.testing.assert_allclose(a2, a, atol=1e-6)
  np.testing.assert_allclose(got_gather, up_p, atol=1e-6)


def test_masked_scatter_equals_scatter_over_the_kept_compressed_tokens():
  b, m, n, c, h = 2, 6, 9, 8, 2
  mod, rng, comp, _, params = _cross_attention(b, m, n, c, h, seed=7)
  a = jnp.asarray(rng.standard_normal((b, h, m, n)), jnp.float32)
  keep = np.array([True, False, True, True, False, True])
  mask = jnp.asarray(np.broadcast_to(keep, (b, m)))
  got = mod.apply({"params": params}, comp, a, mask, method=mod.scatter)
  want = mod.apply({"params": params}, comp[:, keep], a[:, :, keep], method=mod.scatter)
  np.testing.assert_allclose(got, want, atol=1e-5)


# ---- 4. token counts and other grids ---------------------------------------------------------


def test_token_counts_and_one_model_at_several_grids():
  size = 32  # 8x8 patch grid
  model = make_model(4, pool="tok", class_token=True)
  params = random_params(model, size, seed=9)
  x = images(2, size, seed=10)
  outs = {}
  for g in (4, 2, 3):
    m = make_model(g, pool="tok", class_token=True)
    logits, aux = jax.jit(m.apply)({"params": params}, x)
    gg = lookup.parse_grid(g)
    for name, tokens in aux["blocks"].items():
      assert tokens.shape == (2, 1 + gg[0] * gg[1], 16), (g, name)
    assert aux["state"].mask is None
    assert np.isfinite(np.asarray(logits)).all()
    outs[gg] = np.asarray(logits)
  assert not np.allclose(outs[(2, 2)], outs[(4, 4)], atol=1e-3)
  # params do not depend on the grid
  shapes = lambda m: {k: v.shape for k, v in flat(jax.eval_shape(
      m.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]).items()}
  assert shapes(make_model(2, pool="tok", class_token=True)) == shapes(model)


# ---- 5. training grids: padding equals the grid alone -------------------------------------


@pytest.mark.parametrize("pool,class_token", [("gap", True), ("gap", False)])
def test_train_grids_padding_equals_that_grid_alone(pool, class_token):
  size = 16  # 4x4 patch grid
  grids = (2, 3)
  model = make_model(3, pool=pool, class_token=class_token, train_grids=list(grids))
  assert model.rng_streams() == frozenset({"lookup"})
  params = random_params(model, size, seed=11)
  x = images(2, size, seed=12)
  prefix = int(class_token)

  @jax.jit
  def mixed(key):
    logits, aux = model.apply({"params": params}, x, train=True,
                              rngs={"lookup": key, "dropout": jax.random.key(99)})
    return logits, aux["state"].mask

  alone = {g: jax.jit(functools.partial(make_model(g, pool=pool, class_token=class_token).apply,
                                        train=True))
           for g in grids}
  seen = set()
  for seed in range(10):
    logits, mask = mixed(jax.random.key(seed))
    mask = np.asarray(mask)
    assert mask.shape == (2, prefix + 9)
    valid = int(mask[0].sum())
    drawn = [g for g in grids if prefix + g * g == valid]
    assert len(drawn) == 1, valid
    g = drawn[0]
    seen.add(g)
    assert mask[:, :prefix + g * g].all() and not mask[:, prefix + g * g:].any()
    want, aux_alone = alone[g]({"params": params}, x, rngs={"dropout": jax.random.key(99)})
    assert aux_alone["state"].mask is None
    np.testing.assert_allclose(logits, want, atol=2e-5, rtol=1e-5, err_msg=f"grid {g}")
  assert seen == set(grids)
  # eval runs at `grid`, unpadded
  _, aux = jax.eval_shape(model.apply, {"params": params}, x)  # needs no "lookup" rng
  assert aux["state"].mask is None and aux["state"].x.shape[1] == prefix + 9


# ---- 6. bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("entry,size,pattern", [
    ({"grid": 5}, 16, r"larger than the 4x4 patch grid"),
    ({"grid": (2, 5)}, 16, r"larger than the 4x4 patch grid"),
    ({"grid": (1, 8)}, 32, r"does not scale the 8x8 patch grid evenly"),
    ({"grid": (8, 2)}, 32, r"does not scale the 8x8 patch grid evenly"),
    ({"grid": 2, "layers": [0, 2]}, 16, r"contiguous"),
    ({"grid": 2, "layers": [2, 3]}, 16, r"outside the ViT's 3 blocks"),
    ({"grid": 2, "layers": [-1, 0]}, 16, r"outside the ViT's 3 blocks"),
    ({"grid": 2, "layers": []}, 16, r"empty"),
    ({"grid": 0}, 16, r"positive int"),
    ({"grid": -2}, 16, r"positive int"),
    ({"grid": (2, 0)}, 16, r"positive int"),
    ({"grid": (2, 2, 2)}, 16, r"positive int"),
    ({"grid": 1.5}, 16, r"positive int"),
    ({"grid": 2, "train_grids": [2, 0]}, 16, r"train_grids entry must be a positive"),
    ({"grid": 2, "mlp_ratio": 0}, 16, r"mlp_ratio must be positive"),
])
def test_bad_settings_raise(entry, size, pattern):
  model = make_model(**entry)
  with pytest.raises(ValueError, match=pattern):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


def test_bad_training_grid_is_refused_at_init():
  model = make_model(2, train_grids=[2, 5])
  with pytest.raises(ValueError, match=r"train_grids entry 5x5 is larger than the 4x4"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def test_direct_checks():
  assert lookup.parse_grid(3) == (3, 3) and lookup.parse_grid([2, 4]) == (2, 4)
  for bad in (True, 0, (0, 1), "3", None):
    with pytest.raises(ValueError):
      lookup.parse_grid(bad)
  lookup.check_grid((4, 2), (8, 8))  # ratio 2: allowed
  with pytest.raises(ValueError, match="evenly"):
    lookup.check_grid((4, 1), (8, 8))
  with pytest.raises(ValueError, match="larger"):
    lookup.check_grid((9, 8), (8, 8))
  with pytest.raises(ValueError, match="not divisible"):
    lookup.BidirectionalCrossAttention(10, 3).init(jax.random.key(0), jnp.zeros((1, 2, 10)),
                                                   jnp.zeros((1, 3, 10)))


# ---- 7. converted checkpoints ----------------------------------------------------------------


def test_lookup_runs_on_a_converted_timm_checkpoint():
  torch = pytest.importorskip("torch")
  from vitoken.convert import from_timm, torch_reference
  timm = torch_reference.import_timm()
  torch.manual_seed(0)
  m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                        img_size=64).eval()
  with torch.no_grad():  # a non-trivial classifier (timm zero-initialises nothing here anyway)
    for prm in m.parameters():
      prm.add_(0.02 * torch.randn_like(prm))
  module, params = from_timm(m, token_reduction={"method": "lookup", "grid": 2})
  dense_module, dense_params = from_timm(m)
  got, dense_flat = flat(params), flat(dense_params)
  assert set(dense_flat) <= set(got)
  for k in dense_flat:  # patch/pos embedding, blocks, norms, head: as the dense conversion
    np.testing.assert_array_equal(got[k], dense_flat[k], err_msg=k)
  extra = {k for k in got if k not in dense_flat}
  assert extra and all("/lookup/" in k for k in extra)
  for i in range(12):
    for name in ("cross/q/kernel", "cross/k/kernel", "cross/v/kernel", "cross/out/kernel",
                 "norm_compressed/scale", "norm_lookup/scale"):
      assert f"block_{i:02d}/lookup/{name}" in got
    assert (f"block_{i:02d}/lookup/cross/v_back/kernel" in got) == (i < 11)
  x = np.random.default_rng(13).standard_normal((2, 64, 64, 3)).astype(np.float32)
  logits, aux = jax.jit(module.apply)({"params": params}, x)
  assert logits.shape == (2, 10) and np.isfinite(np.asarray(logits)).all()
  assert aux["blocks"]["block_11"].shape == (2, 1 + 4, 192)
  # Numerically: the converted LookupViT equals the numpy reference on the converted weights
  # (class token with a position, timm's layout)...
  want, _ = np_lookup_vit(params, x, patch=16, grid=(2, 2), class_token=True, pool="tok")
  err = float(np.abs(np.asarray(logits, np.float64) - want).max())
  print(f"converted timm ViT-Ti at grid 2: max|dlogits| vs numpy = {err:.2e} "
        f"(logit scale {np.abs(want).max():.2f})")
  np.testing.assert_allclose(logits, want, atol=1e-4, rtol=1e-4)
  # ...and that reference is the timm model itself when R = identity and the gather is silent.
  silent = {k: (np.zeros_like(v) if "/lookup/cross/out/" in k else v) for k, v in got.items()}
  dense_ref, _ = np_lookup_vit(traverse_util.unflatten_dict(silent, sep="/"), x, patch=16,
                               grid=(4, 4), class_token=True, pool="tok", resize=np.eye(16))
  with torch.no_grad():
    ref = m(torch.from_numpy(x).permute(0, 3, 1, 2)).double().numpy()
  np.testing.assert_allclose(dense_ref, ref, atol=1e-4, rtol=1e-4)


# ---- 8. learning -----------------------------------------------------------------------------


def test_overfits_one_batch_and_gradients_reach_both_directions():
  size, classes = 16, 4
  model = make_model(2, pool="gap", class_token=False, num_classes=classes, depth=2,
                     train_grids=[1, 2])
  params = random_params(model, size, seed=14)
  x = images(16, size, seed=14)
  labels = jax.nn.one_hot(np.arange(16) % classes, classes)
  tx = optax.adam(3e-3)

  def loss_fn(p, key):
    logits, _ = model.apply({"params": p}, x, train=True,
                            rngs={"lookup": key, "dropout": key})
    return optax.softmax_cross_entropy(logits, labels).mean()

  @jax.jit
  def step(p, opt, key):
    loss, grads = jax.value_and_grad(loss_fn)(p, key)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, loss, grads

  opt = tx.init(params)
  grads0 = None
  losses = []
  for i in range(40):
    params, opt, loss, grads = step(params, opt, jax.random.key(i))
    grads0 = grads if grads0 is None else grads0
    losses.append(float(loss))
  g = flat(grads0)
  for k in ("block_00/lookup/cross/q/kernel", "block_00/lookup/cross/k/kernel",
            "block_00/lookup/cross/v_back/kernel", "block_00/lookup/cross/out_back/kernel",
            "block_00/lookup/mlp/fc1/kernel", "block_01/lookup/cross/out/kernel",
            "embedding/kernel"):
    assert float(jnp.abs(g[k]).max()) > 0, k
  eval_loss = float(optax.softmax_cross_entropy(jax.jit(model.apply)({"params": params}, x)[0],
                                                labels).mean())
  assert losses[-1] < 0.5 * losses[0], losses
  assert eval_loss < 0.5 * losses[0], (eval_loss, losses[0])


def test_trainer_runs_lookup_with_training_grids(tmp_path):
  from configs import token_learners
  from vitoken.engine.metrics import read_jsonl
  from vitoken.train import trainer
  c = token_learners.get_config("method=lookup,grid=4,grids=2/3,eval_grid=3,runlocal")
  assert c.model.token_reduction.to_dict() == {"method": "lookup", "grid": 4, "train_grids": [2, 3]}
  assert c.eval_model_overrides.token_reduction.grid == 3
  # smaller than runlocal, to keep the compile short: 2 blocks of width 32, 4 steps
  c.model.depth, c.model.width, c.model.mlp_dim = 2, 32, 64
  c.batch_size, c.data.train_examples, c.data.eval_examples = 16, 64, 32
  c.progress_bar = False
  c.checkpoint.async_save = False
  c.total_steps, c.eval_every_steps, c.checkpoint.every_steps, c.log_every_steps = 4, 4, 4, 1
  summary = trainer.run(c, str(tmp_path))
  assert summary["final_step"] == 4 and summary["steps_run"] == 4
  assert 0.0 <= summary["eval"]["accuracy"] <= 1.0 and summary["eval"]["examples"] == 32
  assert np.isfinite(summary["eval"]["loss"])
  train = [r["loss"] for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if r["split"] == "train"]
  assert len(train) == 4 and np.isfinite(train).all()
