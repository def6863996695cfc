"""big_vision ViT checkpoint import/export against an independent numpy forward pass.

The reference below reads the flat, '/'-named big_vision parameter dict directly and follows
big_vision/models/vit.py (pre-norm blocks, LayerNorm eps 1e-6, tanh GELU, class token without a
position, encoder_norm before pooling, MAPHead, tanh pre_logits). No vitoken code is used by it.
"""
import re

import numpy as np
import pytest

try:
  from vitoken.convert import from_big_vision, to_big_vision
except ImportError:  # the package __init__ may not re-export them
  from vitoken.convert.big_vision import from_big_vision, to_big_vision

WIDTH, HEADS, MLP, DEPTH, PATCH = 192, 3, 768, 2, 8
IMAGE, BATCH, NUM_CLASSES, REP_SIZE = 32, 2, 5, 48
GRID = IMAGE // PATCH
NUM_PATCHES = GRID * GRID
VARIANT = f"Ti/{PATCH}"  # width 192, mlp 768, 3 heads; depth overridden to 2
ATOL = 1e-4

MHA = "MultiHeadDotProductAttention_0"


# ------------------------------------------------------------------------------------------
# Independent numpy reference of big_vision's ViT (float64).
# ------------------------------------------------------------------------------------------


def _layer_norm(x, p, prefix, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p[f"{prefix}/scale"] + p[f"{prefix}/bias"]


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _softmax(x, axis=-1):
  x = x - x.max(axis=axis, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=axis, keepdims=True)


def _mha(p, prefix, q_in, kv_in):
  """flax nn.MultiHeadDotProductAttention: q_in [B, Nq, C], kv_in [B, Nk, C] -> [B, Nq, C]."""
  def proj(name, x):
    return np.einsum("bnc,chd->bnhd", x, p[f"{prefix}/{name}/kernel"]) + p[f"{prefix}/{name}/bias"]
  q, k, v = proj("query", q_in), proj("key", kv_in), proj("value", kv_in)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  probs = _softmax(logits, axis=-1)
  y = np.einsum("bhqk,bkhd->bqhd", probs, v)
  return np.einsum("bqhd,hdc->bqc", y, p[f"{prefix}/out/kernel"]) + p[f"{prefix}/out/bias"]


def _mlp(p, prefix, x):
  h = _gelu_tanh(x @ p[f"{prefix}/Dense_0/kernel"] + p[f"{prefix}/Dense_0/bias"])
  return h @ p[f"{prefix}/Dense_1/kernel"] + p[f"{prefix}/Dense_1/bias"]


def _block_params(ckpt, i):
  """The params of block i as {'LayerNorm_0/scale': ..., ...} from either layout."""
  flat = f"Transformer/encoderblock_{i}/"
  scanned = "Transformer/encoderblock/"
  out = {k[len(flat):]: v for k, v in ckpt.items() if k.startswith(flat)}
  if not out:
    out = {k[len(scanned):]: v[i] for k, v in ckpt.items() if k.startswith(scanned)}
  assert out, f"no parameters for block {i}"
  return out


def _depth(ckpt):
  if "Transformer/encoderblock/LayerNorm_0/scale" in ckpt:
    return ckpt["Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
  return len({k.split("/")[1] for k in ckpt if k.startswith("Transformer/encoderblock_")})


def reference_forward(ckpt, images):
  """big_vision ViT logits for NHWC images, computed in float64 numpy."""
  p = {k: np.asarray(v, np.float64) for k, v in ckpt.items()}
  x = np.asarray(images, np.float64)
  b, h, w, c = x.shape
  kernel = p["embedding/kernel"]
  ps = kernel.shape[0]
  gh, gw = h // ps, w // ps
  # Conv (HWIO, stride = patch, VALID) as a patch matmul; tokens in row-major grid order.
  patches = x.reshape(b, gh, ps, gw, ps, c).transpose(0, 1, 3, 2, 4, 5)
  x = np.einsum("bijyxc,yxcd->bijd", patches, kernel) + p["embedding/bias"]
  x = x.reshape(b, gh * gw, -1)
  width = x.shape[-1]

  pe = p["pos_embedding"]
  if "cls" in p:
    cls = np.broadcast_to(p["cls"], (b, 1, width))
    if pe.shape[1] == gh * gw + 1:  # old layout: concatenate the class token, then add
      x = np.concatenate([cls, x], axis=1) + pe
    else:  # current layout: the class token has no position
      x = np.concatenate([cls, x + pe], axis=1)
  else:
    x = x + pe

  for i in range(_depth(p)):
    bp = _block_params(p, i)
    x = x + _mha(bp, MHA, *(2 * [_layer_norm(x, bp, "LayerNorm_0")]))
    x = x + _mlp(bp, "MlpBlock_0", _layer_norm(x, bp, "LayerNorm_1"))
  x = _layer_norm(x, p, "Transformer/encoder_norm")

  if "MAPHead_0/probe" in p:
    probe = np.broadcast_to(p["MAPHead_0/probe"], (b, 1, width))
    y = _mha(p, f"MAPHead_0/{MHA}", probe, x)
    y = y + _mlp(p, "MAPHead_0/MlpBlock_0", _layer_norm(y, p, "MAPHead_0/LayerNorm_0"))
    x = y[:, 0]
  elif "cls" in p:
    x = x[:, 0]
  else:
    x = x.mean(axis=1)

  if "pre_logits/kernel" in p:
    x = np.tanh(x @ p["pre_logits/kernel"] + p["pre_logits/bias"])
  return x @ p["head/kernel"] + p["head/bias"]


# ------------------------------------------------------------------------------------------
# Random big_vision-layout checkpoints.
# ------------------------------------------------------------------------------------------


def _normal(rng, shape, std):
  return (rng.standard_normal(shape) * std).astype(np.float32)


def _ln(rng, prefix, width):
  return {f"{prefix}/scale": (1.0 + _normal(rng, (width,), 0.1)),
          f"{prefix}/bias": _normal(rng, (width,), 0.05)}


def _mha_params(rng, prefix, width, heads):
  d = width // heads
  out = {}
  for name, std in (("query", 0.08), ("key", 0.08), ("value", 0.06)):
    out[f"{prefix}/{name}/kernel"] = _normal(rng, (width, heads, d), std)
    out[f"{prefix}/{name}/bias"] = _normal(rng, (heads, d), 0.05)
  out[f"{prefix}/out/kernel"] = _normal(rng, (heads, d, width), 0.06)
  out[f"{prefix}/out/bias"] = _normal(rng, (width,), 0.05)
  return out


def _mlp_params(rng, prefix, width, mlp):
  return {f"{prefix}/Dense_0/kernel": _normal(rng, (width, mlp), 0.06),
          f"{prefix}/Dense_0/bias": _normal(rng, (mlp,), 0.05),
          f"{prefix}/Dense_1/kernel": _normal(rng, (mlp, width), 0.04),
          f"{prefix}/Dense_1/bias": _normal(rng, (width,), 0.05)}


def make_checkpoint(seed, pool="tok", *, rep_size=None, scanned=False, old=False):
  """A flat big_vision-named dict of float32 arrays for a tiny ViT."""
  rng = np.random.default_rng(seed)
  ck = {"embedding/kernel": _normal(rng, (PATCH, PATCH, 3, WIDTH), 0.05),
        "embedding/bias": _normal(rng, (WIDTH,), 0.05),
        "pos_embedding": _normal(rng, (1, NUM_PATCHES, WIDTH), 0.2)}
  if pool == "tok":
    ck["cls"] = _normal(rng, (1, 1, WIDTH), 0.2)
  for i in range(DEPTH):
    prefix = f"Transformer/encoderblock_{i}"
    ck.update(_ln(rng, f"{prefix}/LayerNorm_0", WIDTH))
    ck.update(_mha_params(rng, f"{prefix}/{MHA}", WIDTH, HEADS))
    ck.update(_ln(rng, f"{prefix}/LayerNorm_1", WIDTH))
    ck.update(_mlp_params(rng, f"{prefix}/MlpBlock_0", WIDTH, MLP))
  ck.update(_ln(rng, "Transformer/encoder_norm", WIDTH))
  if pool == "map":
    ck["MAPHead_0/probe"] = _normal(rng, (1, 1, WIDTH), 0.2)
    ck.update(_mha_params(rng, f"MAPHead_0/{MHA}", WIDTH, HEADS))
    ck.update(_ln(rng, "MAPHead_0/LayerNorm_0", WIDTH))
    ck.update(_mlp_params(rng, "MAPHead_0/MlpBlock_0", WIDTH, MLP))
  head_in = WIDTH
  if rep_size:
    ck["pre_logits/kernel"] = _normal(rng, (WIDTH, rep_size), 0.1)
    ck["pre_logits/bias"] = _normal(rng, (rep_size,), 0.05)
    head_in = rep_size
  ck["head/kernel"] = _normal(rng, (head_in, NUM_CLASSES), 0.2)
  ck["head/bias"] = _normal(rng, (NUM_CLASSES,), 0.1)

  if scanned:
    flat = "Transformer/encoderblock_0/"
    for key in [k for k in ck if k.startswith(flat)]:
      name = key[len(flat):]
      ck[f"Transformer/encoderblock/{name}"] = np.stack(
          [ck.pop(f"Transformer/encoderblock_{i}/{name}") for i in range(DEPTH)])
  if old:
    assert pool == "tok", "the old layout only exists for class-token models"
    ck["pos_embedding"] = np.concatenate(
        [_normal(rng, (1, 1, WIDTH), 0.2), ck["pos_embedding"]], axis=1)
  return ck


# id -> (make_checkpoint kwargs, expected pool type)
CASES = {
    "tok": (dict(pool="tok"), "tok"),
    "gap": (dict(pool="gap"), "gap"),
    "map": (dict(pool="map"), "map"),
    "scanned": (dict(pool="tok", scanned=True), "tok"),
    "old_cls_posemb": (dict(pool="tok", old=True), "tok"),
    "pre_logits": (dict(pool="gap", rep_size=REP_SIZE), "gap"),
}
# The cases whose checkpoints are in the canonical (non-old, unscanned) layout.
CANONICAL = ("tok", "gap", "map", "pre_logits")


def _case_checkpoint(case):
  kwargs, _ = CASES[case]
  return make_checkpoint(sorted(CASES).index(case) + 1, **kwargs)


def _images(seed=0):
  rng = np.random.default_rng(1000 + seed)
  return rng.uniform(-1.0, 1.0, (BATCH, IMAGE, IMAGE, 3)).astype(np.float32)


def _save(path, ckpt):
  np.savez(path, **ckpt)
  return str(path)


def _logits(module, params, images):
  out = module.apply({"params": params}, images)
  assert isinstance(out, tuple) and len(out) == 2, "apply must return (logits, aux)"
  logits = np.asarray(out[0])
  assert logits.dtype == np.float32, logits.dtype
  assert logits.shape == (images.shape[0], NUM_CLASSES), logits.shape
  return logits


def _assert_close(got, want, what):
  err = float(np.max(np.abs(got.astype(np.float64) - want)))
  assert err <= ATOL, f"{what}: max abs error {err:.3g} > {ATOL} (logits scale {np.abs(want).max():.3g})"


# ------------------------------------------------------------------------------------------
# Tests.
# ------------------------------------------------------------------------------------------


def test_reference_is_not_trivial():
  """Sanity of the fixture itself: logits vary across images and the class/pooling paths differ."""
  images = _images()
  for case in CASES:
    logits = reference_forward(_case_checkpoint(case), images)
    assert np.all(np.isfinite(logits))
    assert np.abs(logits[0] - logits[1]).max() > 1e-2, case
    assert np.abs(logits).max() > 0.1, case
  # The old layout really differs from ignoring pe[:, 0].
  old = _case_checkpoint("old_cls_posemb")
  dropped = dict(old, pos_embedding=old["pos_embedding"][:, 1:])
  assert np.abs(reference_forward(old, images) - reference_forward(dropped, images)).max() > 1e-3


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_import_matches_numpy_reference(case, tmp_path):
  ckpt = _case_checkpoint(case)
  path = _save(tmp_path / f"{case}.npz", ckpt)
  module, params = from_big_vision(path, VARIANT, depth=DEPTH)
  images = _images()
  got = _logits(module, params, images)
  _assert_close(got, reference_forward(ckpt, images), f"{case}: vitoken vs numpy reference")
  expected_pool = CASES[case][1]
  if hasattr(module, "pool_type"):
    assert module.pool_type == expected_pool


def test_import_from_dict(tmp_path):
  """A dict of arrays works like the npz path, and does not modify the caller's dict."""
  ckpt = _case_checkpoint("tok")
  snapshot = {k: v.copy() for k, v in ckpt.items()}
  module, params = from_big_vision(ckpt, VARIANT, depth=DEPTH)
  images = _images(1)
  got = _logits(module, params, images)
  _assert_close(got, reference_forward(snapshot, images), "dict input vs numpy reference")
  assert sorted(ckpt) == sorted(snapshot)
  for k in snapshot:
    np.testing.assert_array_equal(ckpt[k], snapshot[k], err_msg=f"input {k} was modified")


def test_import_with_same_image_size_is_identity(tmp_path):
  ckpt = _case_checkpoint("tok")
  path = _save(tmp_path / "tok.npz", ckpt)
  module, params = from_big_vision(path, VARIANT, image_size=IMAGE, depth=DEPTH)
  images = _images(2)
  _assert_close(_logits(module, params, images), reference_forward(ckpt, images),
                "image_size equal to the checkpoint grid")


def test_import_resized_image_size(tmp_path):
  """image_size with another grid resizes the learned posemb; the class token keeps no position."""
  path = _save(tmp_path / "old.npz", _case_checkpoint("old_cls_posemb"))
  module, params = from_big_vision(path, VARIANT, image_size=48, depth=DEPTH)
  assert tuple(params["pos_embedding"].shape) == (1, (48 // PATCH) ** 2, WIDTH)
  images = np.random.default_rng(5).uniform(-1, 1, (BATCH, 48, 48, 3)).astype(np.float32)
  logits = np.asarray(module.apply({"params": params}, images)[0])
  assert logits.shape == (BATCH, NUM_CLASSES) and np.all(np.isfinite(logits))


@pytest.mark.parametrize("grid", [(4, 6), (2, 5)], ids=["4x6", "2x5"])
def test_import_non_square_grid(grid, tmp_path):
  """A checkpoint trained on a non-square grid, loaded at that resolution (image_size given).

  2x5 is a trap for length-based old-layout detection: 10 - 1 = 9 is a perfect square.
  """
  gh, gw = grid
  ckpt = make_checkpoint(11, "gap")
  ckpt["pos_embedding"] = _normal(np.random.default_rng(12), (1, gh * gw, WIDTH), 0.2)
  images = np.random.default_rng(13).uniform(-1, 1, (BATCH, gh * PATCH, gw * PATCH, 3))
  images = images.astype(np.float32)
  module, params = from_big_vision(_save(tmp_path / "ns.npz", ckpt), VARIANT,
                                   image_size=(gh * PATCH, gw * PATCH), depth=DEPTH)
  _assert_close(_logits(module, params, images), reference_forward(ckpt, images),
                f"non-square {gh}x{gw} grid")


def test_scan_override_and_export(tmp_path):
  """scan=True runs the same network, and exports back to the unscanned big_vision names."""
  ckpt = _case_checkpoint("map")
  module, params = from_big_vision(_save(tmp_path / "map.npz", ckpt), VARIANT, depth=DEPTH,
                                   scan=True)
  images = _images(4)
  _assert_close(_logits(module, params, images), reference_forward(ckpt, images), "scan=True")
  exported = to_big_vision(module, params)
  assert sorted(exported) == sorted(ckpt)
  for k in ckpt:
    np.testing.assert_allclose(exported[k], ckpt[k], rtol=0, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_export_round_trip(case, tmp_path):
  ckpt = _case_checkpoint(case)
  module, params = from_big_vision(_save(tmp_path / "in.npz", ckpt), VARIANT, depth=DEPTH)
  images = _images(3)
  before = _logits(module, params, images)

  exported = to_big_vision(module, params)
  assert isinstance(exported, dict)
  for k, v in exported.items():
    assert isinstance(k, str) and isinstance(v, np.ndarray), (k, type(v))
  if case in CANONICAL:
    assert sorted(exported) == sorted(ckpt)
    for k in ckpt:
      assert exported[k].shape == ckpt[k].shape, (k, exported[k].shape, ckpt[k].shape)
      np.testing.assert_allclose(exported[k], ckpt[k], rtol=0, atol=1e-7,
                                 err_msg=f"exported {k} differs from the imported checkpoint")

  module2, params2 = from_big_vision(_save(tmp_path / "out.npz", exported), VARIANT, depth=DEPTH)
  after = _logits(module2, params2, images)
  np.testing.assert_array_equal(after, before)


# (case, big_vision key, wrong shape, pattern naming the parameter). The message may use the
# checkpoint's big_vision name or vitoken's name for the same parameter.
WRONG_SHAPES = {
    "head_bias": ("tok", "head/bias", (NUM_CLASSES + 1,), r"head/bias"),
    "block_mlp_kernel": (
        "tok", "Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel", (WIDTH + 8, MLP),
        r"encoderblock_1/MlpBlock_0/Dense_0/kernel|block_01/mlp/fc1/kernel"),
    "block_query_kernel": (
        "tok", f"Transformer/encoderblock_0/{MHA}/query/kernel", (WIDTH, HEADS, WIDTH // HEADS + 1),
        rf"encoderblock_0/{MHA}/query/kernel|block_00/attn/qkv/kernel"),
    "map_value_bias": (
        "map", f"MAPHead_0/{MHA}/value/bias", (HEADS, WIDTH // HEADS - 1),
        rf"MAPHead_0/{MHA}/value/bias|map_head/kv/bias"),
    "scanned_depth": (  # one stacked array with a leading axis shorter than the depth
        "scanned", "Transformer/encoderblock/MlpBlock_0/Dense_1/bias", (DEPTH - 1, WIDTH),
        r"encoderblock/MlpBlock_0/Dense_1/bias"),
}


@pytest.mark.parametrize("name", list(WRONG_SHAPES), ids=list(WRONG_SHAPES))
def test_wrong_shape_raises(name, tmp_path):
  case, key, shape, pattern = WRONG_SHAPES[name]
  ckpt = _case_checkpoint(case)
  assert key in ckpt and ckpt[key].shape != shape
  ckpt[key] = np.zeros(shape, np.float32)
  path = _save(tmp_path / "bad.npz", ckpt)
  with pytest.raises(ValueError, match=pattern):
    from_big_vision(path, VARIANT, depth=DEPTH)


def test_missing_parameter_raises(tmp_path):
  ckpt = _case_checkpoint("tok")
  del ckpt["Transformer/encoderblock_1/LayerNorm_1/scale"]
  with pytest.raises(ValueError, match=r"encoderblock_1/LayerNorm_1/scale|block_01/norm2/scale"):
    from_big_vision(_save(tmp_path / "bad.npz", ckpt), VARIANT, depth=DEPTH)


def test_unknown_variant_raises(tmp_path):
  path = _save(tmp_path / "tok.npz", _case_checkpoint("tok"))
  with pytest.raises(ValueError, match="variant"):
    from_big_vision(path, "Q/8", depth=DEPTH)


def test_missing_file_raises(tmp_path):
  missing = tmp_path / "does_not_exist.npz"
  with pytest.raises((FileNotFoundError, ValueError), match=re.escape("does_not_exist")):
    from_big_vision(str(missing), VARIANT, depth=DEPTH)


# ------------------------------------------------------------------------------------------
# Checkpoints as big_vision's own loader reads them: bfloat16, `path:img`, training wrappers.
# ------------------------------------------------------------------------------------------


def _exported_tok():
  """A big_vision-layout dict produced by to_big_vision, with its vitoken logits."""
  module, params = from_big_vision(_case_checkpoint("tok"), VARIANT, depth=DEPTH)
  images = _images(6)
  return to_big_vision(module, params), _logits(module, params, images), images


def test_import_bfloat16_npz(tmp_path):
  import ml_dtypes
  ckpt, want, images = _exported_tok()
  bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in ckpt.items()}
  path = _save(tmp_path / "bf16.npz", bf16)
  with np.load(path) as f:  # numpy really stores them as 2-byte void
    assert f["embedding/kernel"].dtype.kind == "V"
  module, params = from_big_vision(path, VARIANT, depth=DEPTH)
  got = _logits(module, params, images)
  rounded = {k: np.asarray(v, np.float32) for k, v in bf16.items()}
  _assert_close(got, reference_forward(rounded, images), "bf16 npz vs reference of rounded weights")
  np.testing.assert_allclose(got, want, rtol=0, atol=0.05 * max(1.0, np.abs(want).max()))


def test_import_two_tower_prefix(tmp_path, caplog):
  ckpt, want, images = _exported_tok()
  two = {f"img/{k}": v for k, v in ckpt.items()}
  two["txt/Embed_0/embedding"] = np.zeros((10, 8), np.float32)
  two["t"] = np.zeros((1,), np.float32)
  path = _save(tmp_path / "siglip.npz", two)
  with caplog.at_level("INFO"):
    module, params = from_big_vision(f"{path}:img", VARIANT, depth=DEPTH)
  assert "img/" in caplog.text
  np.testing.assert_allclose(_logits(module, params, images), want, rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match=r"'img/'.*'txt/'"):
    from_big_vision(f"{path}:image", VARIANT, depth=DEPTH)


@pytest.mark.parametrize("wrapper", ["params/", "opt/target/"])
def test_import_training_checkpoint(wrapper, tmp_path, caplog):
  ckpt, want, images = _exported_tok()
  wrapped = {f"{wrapper}{k}": v for k, v in ckpt.items()}
  wrapped["opt/state/count"] = np.zeros((), np.float32)  # optimizer state beside the params
  path = _save(tmp_path / "train.npz", wrapped)
  with caplog.at_level("INFO"):
    module, params = from_big_vision(path, VARIANT, depth=DEPTH)
  assert wrapper in caplog.text
  np.testing.assert_allclose(_logits(module, params, images), want, rtol=0, atol=1e-6)
  # The flat dict (not only the .npz) is unwrapped the same way.
  module, params = from_big_vision(wrapped, VARIANT, depth=DEPTH)
  np.testing.assert_allclose(_logits(module, params, images), want, rtol=0, atol=1e-6)
