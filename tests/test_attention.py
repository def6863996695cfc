"""Numerical tests for vitoken.models.attention against an independent float64 numpy reference."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitoken.models.attention import (
  SelfAttention,
  attention_probs,
  check_implementation,
  fused_attention,
)

ATOL = 1e-5
RTOL = 1e-5


# ----------------------------------------------------------------------------- numpy reference

def _np_softmax(logits, key_mask=None):
  """Stable softmax over the last axis; masked keys get exactly 0."""
  logits = np.asarray(logits, np.float64)
  if key_mask is not None:
    logits = np.where(key_mask, logits, -np.inf)
  m = logits.max(axis=-1, keepdims=True)
  e = np.exp(logits - m)
  return e / e.sum(axis=-1, keepdims=True)


def _np_qkv(params, x):
  x = np.asarray(x, np.float64)
  kernel = np.asarray(params["qkv"]["kernel"], np.float64)  # [C, 3, H, D]
  qkv = np.einsum("bnc,cthd->bnthd", x, kernel)
  if "bias" in params["qkv"]:
    qkv = qkv + np.asarray(params["qkv"]["bias"], np.float64)
  return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def _np_probs(q, k, bias=None, key_mask=None):
  """q [B,Nq,H,D], k [B,Nk,H,D], bias bcast [B,H,Nq,Nk], key_mask [B,Nk] -> [B,H,Nq,Nk]."""
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  mask4 = None if key_mask is None else np.asarray(key_mask)[:, None, None, :]
  return _np_softmax(logits, mask4)


def np_self_attention(params, x, bias=None, key_mask=None):
  """Returns (out [B,N,C], probs [B,H,N,N], keys_mean [B,N,D], cls_attn [B,N])."""
  q, k, v = _np_qkv(params, x)
  probs = _np_probs(q, k, bias, key_mask)
  ctx = np.einsum("bhqk,bkhd->bqhd", probs, v)
  out = np.einsum("bqhd,hdc->bqc", ctx, np.asarray(params["out"]["kernel"], np.float64))
  out = out + np.asarray(params["out"]["bias"], np.float64)
  return out, probs, k.mean(axis=2), probs[:, :, 0].mean(axis=1)


# ----------------------------------------------------------------------------- fixtures / helpers

B = 2


def _make_inputs(n, c, seed, bias_kind, use_mask):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, n, c)).astype(np.float32)
  bias = None
  if bias_kind == "size":
    # ToMe proportional attention: log of positive token sizes, one per key.
    sizes = rng.integers(1, 6, size=(B, 1, 1, n)).astype(np.float32)
    bias = np.log(sizes)
  elif bias_kind == "full":
    bias = rng.standard_normal((B, 1, n, n)).astype(np.float32)  # broadcast over heads
  key_mask = None
  if use_mask:
    key_mask = rng.random((B, n)) > 0.4
    key_mask[:, 0] = True  # never all masked; keep the class token
    key_mask[0, -1] = False  # at least one masked key
    key_mask[1, 1] = False
  return x, bias, key_mask


def _init(module, x):
  """Parameter shapes/dtypes only (no compile); values come from `_randomize_params`."""
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.asarray(x))["params"]


def _randomize_params(params, seed):
  """Non-trivial values everywhere (default init has zero biases)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  new = [jnp.asarray(0.3 * rng.standard_normal(l.shape), l.dtype) for l in leaves]
  return jax.tree_util.tree_unflatten(treedef, new)


@functools.partial(jax.jit, static_argnums=0, static_argnames=(
    "need_keys_mean", "need_cls_attn", "return_probs"))
def _apply(module, params, x, bias, key_mask, **kw):
  # One compiled program per configuration is much cheaper than eager op-by-op dispatch.
  return module.apply({"params": params}, x, bias=bias, key_mask=key_mask, **kw)


def _call(module, params, x, bias, key_mask, **kw):
  return _apply(module, params, jnp.asarray(x), None if bias is None else jnp.asarray(bias),
                None if key_mask is None else jnp.asarray(key_mask), **kw)


CASES = [
    # id, n, c, heads, bias_kind, use_mask
    pytest.param(5, 16, 2, None, False, id="plain-n5-c16-h2"),
    pytest.param(9, 32, 4, "size", False, id="sizebias-n9-c32-h4"),
    pytest.param(17, 24, 3, None, True, id="mask-n17-c24-h3"),
    pytest.param(9, 16, 4, "size", True, id="sizebias+mask-n9-c16-h4"),
    pytest.param(7, 16, 2, "full", True, id="fullbias+mask-n7-c16-h2"),
]


# ----------------------------------------------------------------------------- 1. outputs

@pytest.mark.parametrize("return_probs", [False, True], ids=["fused", "explicit"])
@pytest.mark.parametrize("qkv_bias", [True, False], ids=["qkvbias", "noqkvbias"])
@pytest.mark.parametrize("n,c,heads,bias_kind,use_mask", CASES)
def test_output_matches_numpy(n, c, heads, bias_kind, use_mask, qkv_bias, return_probs):
  x, bias, key_mask = _make_inputs(n, c, seed=n * 31 + c, bias_kind=bias_kind, use_mask=use_mask)
  module = SelfAttention(num_heads=heads, qkv_bias=qkv_bias)
  params = _init(module, x)
  d = c // heads
  assert params["qkv"]["kernel"].shape == (c, 3, heads, d)
  assert params["out"]["kernel"].shape == (heads, d, c)
  assert params["out"]["bias"].shape == (c,)
  if qkv_bias:
    assert params["qkv"]["bias"].shape == (3, heads, d)
  else:
    assert "bias" not in params["qkv"]
  params = _randomize_params(params, seed=n)

  out, info = _call(module, params, x, bias, key_mask, return_probs=return_probs)
  ref_out, ref_probs, _, _ = np_self_attention(params, x, bias, key_mask)
  assert out.shape == (B, n, c) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), ref_out, rtol=RTOL, atol=ATOL)
  if return_probs:
    assert set(info) == {"probs"}
    np.testing.assert_allclose(np.asarray(info["probs"]), ref_probs, rtol=RTOL, atol=ATOL)
  else:
    assert info == {}


def test_masked_keys_do_not_influence_output():
  """Changing x at masked (key) positions must leave the outputs of unmasked tokens unchanged;
  only the masked tokens' own output rows may change."""
  n, c, heads = 9, 16, 2
  x, bias, key_mask = _make_inputs(n, c, seed=11, bias_kind="size", use_mask=True)
  module = SelfAttention(num_heads=heads)
  params = _randomize_params(_init(module, x), seed=5)
  x2 = x.copy()
  x2[~key_mask] += 10.0
  for return_probs in (False, True):
    o1, _ = _call(module, params, x, bias, key_mask, return_probs=return_probs)
    o2, _ = _call(module, params, x2, bias, key_mask, return_probs=return_probs)
    keep = key_mask
    np.testing.assert_allclose(np.asarray(o1)[keep], np.asarray(o2)[keep], rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- 2. keys_mean / cls_attn

@pytest.mark.parametrize("return_probs", [False, True], ids=["fused", "explicit"])
@pytest.mark.parametrize("n,c,heads,bias_kind,use_mask", CASES)
def test_keys_mean_and_cls_attn(n, c, heads, bias_kind, use_mask, return_probs):
  x, bias, key_mask = _make_inputs(n, c, seed=100 + n, bias_kind=bias_kind, use_mask=use_mask)
  module = SelfAttention(num_heads=heads)
  params = _randomize_params(_init(module, x), seed=n + c)
  out, info = _call(module, params, x, bias, key_mask, need_keys_mean=True, need_cls_attn=True,
                    return_probs=return_probs)
  _, _, ref_km, ref_cls = np_self_attention(params, x, bias, key_mask)

  km, cls = np.asarray(info["keys_mean"]), np.asarray(info["cls_attn"])
  assert km.shape == (B, n, c // heads)
  assert cls.shape == (B, n) and cls.dtype == np.float32
  np.testing.assert_allclose(km, ref_km, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(cls, ref_cls, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(cls.sum(-1), 1.0, rtol=0, atol=1e-5)
  if key_mask is not None:
    assert np.all(cls[~key_mask] == 0.0)
    assert np.all(cls[key_mask] > 0.0)
  if return_probs:
    # cls_attn is row 0 of probs averaged over heads.
    np.testing.assert_allclose(cls, np.asarray(info["probs"])[:, :, 0].mean(1), rtol=RTOL,
                               atol=1e-6)


def test_cls_attn_depends_on_bias():
  """Sanity check that the bias actually reaches cls_attn (a no-op bias would pass silently)."""
  n, c, heads = 9, 16, 4
  x, bias, _ = _make_inputs(n, c, seed=1, bias_kind="size", use_mask=False)
  module = SelfAttention(num_heads=heads)
  params = _randomize_params(_init(module, x), seed=2)
  _, a = _call(module, params, x, None, None, need_cls_attn=True)
  _, b = _call(module, params, x, bias, None, need_cls_attn=True)
  assert np.abs(np.asarray(a["cls_attn"]) - np.asarray(b["cls_attn"])).max() > 1e-3


# ----------------------------------------------------------------------------- 3. probs

@pytest.mark.parametrize("n,c,heads,bias_kind,use_mask", CASES)
def test_probs(n, c, heads, bias_kind, use_mask):
  x, bias, key_mask = _make_inputs(n, c, seed=200 + n, bias_kind=bias_kind, use_mask=use_mask)
  module = SelfAttention(num_heads=heads)
  params = _randomize_params(_init(module, x), seed=9)
  _, info = _call(module, params, x, bias, key_mask, return_probs=True)
  probs = np.asarray(info["probs"])
  assert probs.shape == (B, heads, n, n) and probs.dtype == np.float32
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=0, atol=1e-5)
  assert np.all(probs >= 0.0)
  if key_mask is not None:
    masked = np.broadcast_to(~key_mask[:, None, None, :], probs.shape)
    assert np.all(probs[masked] == 0.0)
  _, ref_probs, _, _ = np_self_attention(params, x, bias, key_mask)
  np.testing.assert_allclose(probs, ref_probs, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "sizebias"])
@pytest.mark.parametrize("use_mask", [False, True], ids=["nomask", "mask"])
def test_functional_helpers(use_bias, use_mask):
  """attention_probs / fused_attention directly, with Nq != Nk."""
  rng = np.random.default_rng(42)
  h, d, nq, nk = 3, 4, 3, 8
  q = rng.standard_normal((B, nq, h, d)).astype(np.float32)
  k = rng.standard_normal((B, nk, h, d)).astype(np.float32)
  v = rng.standard_normal((B, nk, h, d)).astype(np.float32)
  bias = np.log(rng.integers(1, 5, (B, 1, 1, nk))).astype(np.float32) if use_bias else None
  key_mask = None
  if use_mask:
    key_mask = rng.random((B, nk)) > 0.5
    key_mask[:, 0] = True
    key_mask[:, -1] = False
  ref = _np_probs(q.astype(np.float64), k.astype(np.float64), bias, key_mask)
  jb = None if bias is None else jnp.asarray(bias)
  probs = attention_probs(jnp.asarray(q), jnp.asarray(k), bias=jb,
                          key_mask=None if key_mask is None else jnp.asarray(key_mask)[:, None, None, :])
  np.testing.assert_allclose(np.asarray(probs), ref, rtol=RTOL, atol=ATOL)
  out = fused_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), bias=jb,
                        key_mask=None if key_mask is None else jnp.asarray(key_mask))
  assert out.shape == (B, nq, h, d)
  np.testing.assert_allclose(np.asarray(out), np.einsum("bhqk,bkhd->bqhd", ref, v),
                             rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- 4. bf16

@pytest.mark.parametrize("return_probs", [False, True], ids=["fused", "explicit"])
def test_bf16_close_to_fp32(return_probs):
  n, c, heads = 9, 32, 4
  x, bias, key_mask = _make_inputs(n, c, seed=5, bias_kind="size", use_mask=True)
  m32 = SelfAttention(num_heads=heads)
  m16 = SelfAttention(num_heads=heads, dtype=jnp.bfloat16)
  params = _init(m16, x)
  assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(params))
  params = _randomize_params(params, seed=8)
  kw = dict(need_keys_mean=True, need_cls_attn=True, return_probs=return_probs)
  o32, i32 = _call(m32, params, x, bias, key_mask, **kw)
  o16, i16 = _call(m16, params, x, bias, key_mask, **kw)
  assert o16.dtype == jnp.bfloat16
  scale = np.abs(np.asarray(o32)).max()
  err = np.abs(np.asarray(o16, np.float32) - np.asarray(o32)).max()
  assert err <= 2e-2 * scale, (err, scale)
  for key in ("keys_mean", "cls_attn"):
    a, b = np.asarray(i16[key], np.float32), np.asarray(i32[key])
    assert np.abs(a - b).max() <= 2e-2 * max(np.abs(b).max(), 1.0), key
  # The explicit softmax is documented to run in float32 even under bf16 compute.
  assert i16["cls_attn"].dtype == jnp.float32
  if return_probs:
    assert i16["probs"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(i16["probs"]).sum(-1), 1.0, rtol=0, atol=1e-5)
    assert np.all(np.asarray(i16["probs"])[np.broadcast_to(~key_mask[:, None, None, :],
                                                           i16["probs"].shape)] == 0.0)
  # Masked keys still get exactly zero class attention in bf16.
  assert np.all(np.asarray(i16["cls_attn"])[~key_mask] == 0.0)


# ----------------------------------------------------------------------------- 5. errors

@pytest.mark.parametrize("impl", [None, "auto", "xla", "cudnn"])
def test_check_implementation_accepts(impl):
  assert check_implementation(impl) == (None if impl == "auto" else impl)


@pytest.mark.parametrize("impl", ["flash", "XLA", "", "triton"])
def test_bad_implementation_raises(impl):
  with pytest.raises(ValueError):
    check_implementation(impl)
  x = jnp.ones((B, 5, 16), jnp.float32)
  with pytest.raises(ValueError):
    jax.eval_shape(SelfAttention(num_heads=2, implementation=impl).init, jax.random.PRNGKey(0), x)


def test_xla_implementation_matches_numpy():
  n, c, heads = 9, 16, 2
  x, bias, key_mask = _make_inputs(n, c, seed=13, bias_kind="size", use_mask=True)
  module = SelfAttention(num_heads=heads, implementation="xla")
  params = module.init(jax.random.PRNGKey(0), jnp.asarray(x))["params"]  # a real init
  assert np.all(np.asarray(params["qkv"]["bias"]) == 0.0)
  params = _randomize_params(params, seed=13)
  out, _ = _call(module, params, x, bias, key_mask)
  ref_out, *_ = np_self_attention(params, x, bias, key_mask)
  np.testing.assert_allclose(np.asarray(out), ref_out, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("c,heads", [(16, 3), (30, 4)], ids=["16/3", "30/4"])
def test_width_not_divisible_raises(c, heads):
  with pytest.raises(ValueError, match="divisible"):
    jax.eval_shape(SelfAttention(num_heads=heads).init, jax.random.PRNGKey(0),
                   jnp.ones((B, 5, c), jnp.float32))


# ----------------------------------------------------------------------------- 6. jit

def test_jit_compiles_once():
  n, c, heads = 9, 16, 2
  x1, bias1, mask1 = _make_inputs(n, c, seed=1, bias_kind="size", use_mask=True)
  x2, bias2, mask2 = _make_inputs(n, c, seed=2, bias_kind="size", use_mask=True)
  module = SelfAttention(num_heads=heads)
  params = _randomize_params(_init(module, x1), seed=4)
  traces = []

  def fwd(params, x, bias, key_mask):
    traces.append(1)
    return module.apply({"params": params}, x, bias=bias, key_mask=key_mask,
                        need_keys_mean=True, need_cls_attn=True)

  jfwd = jax.jit(fwd)
  outs = []
  for x, bias, mask in ((x1, bias1, mask1), (x2, bias2, mask2)):
    out, info = jfwd(params, jnp.asarray(x), jnp.asarray(bias), jnp.asarray(mask))
    outs.append(out)
    ref_out, _, _, ref_cls = np_self_attention(params, x, bias, mask)
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(info["cls_attn"]), ref_cls, rtol=RTOL, atol=ATOL)
  assert len(traces) == 1
  assert not np.allclose(np.asarray(outs[0]), np.asarray(outs[1]))
