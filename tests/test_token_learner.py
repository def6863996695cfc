"""TokenLearner v1.1 / v1 and TokenFuser (scenic's projects/token_learner/model.py) against
independent numpy and torch re-implementations written here from the reference, their
placement in the ViT (learner and fuser modes, checked block by block against a standalone
block), dropout, bad settings, and short trainings with the project's trainer."""
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vitoken.models import vit
from vitoken.models.reducers import base, token_learner as tl

EPS = 1e-6  # flax's LayerNorm default, which scenic uses throughout


# ---- the reference, re-implemented in numpy (float64) from scenic's model.py ----
def np_params(params):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def np_layer_norm(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + EPS) * p["scale"] + p["bias"]


def np_gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def np_dense(x, p):
  return x @ p["kernel"] + p["bias"]


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_softmax(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def np_mlp(x, p):
  """scenic's MlpBlock: Dense -> gelu (tanh) -> Dense (dropout off)."""
  return np_dense(np_gelu_tanh(np_dense(x, p["Dense_0"])), p["Dense_1"])


def np_conv3x3_same(x, k):
  """x [B, H, W, Cin] cross-correlated with k [3, 3, Cin, Cout] (HWIO), zero padding 1."""
  b, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((b, h, w, k.shape[-1]))
  for dy in range(3):
    for dx in range(3):
      out += xp[:, dy:dy + h, dx:dx + w, :] @ k[dy, dx]
  return out


def ref_v11(p, x):
  """TokenLearnerModuleV11: [B, N, C] -> ([B, S, C], [B, S, N])."""
  logits = np_mlp(np_layer_norm(x, p["LayerNorm_0"]), p["token_masking"])  # [B, N, S]
  weights = np_softmax(logits.transpose(0, 2, 1), axis=-1)
  return weights @ x, weights  # pooling of the raw tokens


def ref_v1(p, grid, sum_pooling):
  """TokenLearnerModule (v1): grid [B, h, w, C] -> ([B, S, C], [B, S, h*w])."""
  b, h, w, c = grid.shape
  maps = np_layer_norm(grid, p["LayerNorm_0"])
  for i in range(3):
    maps = np_gelu_tanh(np_conv3x3_same(maps, p[f"Conv_{i}"]["kernel"]))
  maps = np_conv3x3_same(maps, p["Conv_3"]["kernel"]).reshape(b, h * w, -1)
  weights = np_sigmoid(maps).transpose(0, 2, 1)
  if not sum_pooling:
    weights = weights / (h * w)
  return weights @ grid.reshape(b, h * w, c), weights


def ref_fuser(p, y, original, use_normalization):
  """TokenFuser: y [B, S, C], original [B, N, C] -> [B, N, C] (without the residual)."""
  if use_normalization:
    y = np_layer_norm(y, p["fuser_mix_norm1"])
  y = np_dense(y.transpose(0, 2, 1), p["Dense_0"]).transpose(0, 2, 1)
  if use_normalization:
    y = np_layer_norm(y, p["fuser_mix_norm2"])
  mix = np_sigmoid(np_mlp(np_layer_norm(original, p["LayerNorm_0"]), p["token_masking"]))
  return np.einsum("bsc,bns->bnc", y, mix)


# ---- helpers ----
def _draw(shapes, seed, spread, gain):
  """A params tree of `shapes` drawn in numpy: LayerNorm scales off 1, biases (and position
  embeddings, class/register tokens) off 0, kernels at about `gain` times their init scale."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    z = rng.standard_normal(leaf.shape).astype(np.float32)
    name = path[-1].key
    if name == "scale":
      return 1.0 + spread * z
    if name in ("bias", "pos_embedding", "cls", "registers"):
      return spread * z
    return gain * z / np.sqrt(np.prod(leaf.shape[:-1]))
  return jax.tree_util.tree_map_with_path(draw, shapes)


def random_params(module, seed, *args):
  """Params of the module's structure, every leaf non-trivial (the fuser's zero-initialised
  kernel too)."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]
  return _draw(shapes, seed, spread=0.3, gain=1.5)


@functools.partial(jax.jit, static_argnames=("module", "kw"))
def _apply(module, params, args, rng, kw):
  rngs = {} if rng is None else {"dropout": rng}
  return module.apply({"params": params}, *args, rngs=rngs, **dict(kw))


def apply(module, params, *args, rng=None, **kw):
  """module.apply under jit (one compile instead of one per operation)."""
  return _apply(module, params, tuple(jnp.asarray(a) for a in args), rng, tuple(sorted(kw.items())))


def randn(seed, *shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def report(name, got, want):
  err = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
  print(f"{name}: max abs err {err:.2e} (max |ref| {np.max(np.abs(want)):.2f})")
  return err


# ---- 1. module parity with numpy ----
@pytest.mark.parametrize("b,n,c,s,bottleneck", [
    (2, 16, 16, 4, 64), (3, 12, 8, 5, 64), (1, 9, 24, 9, 16), (2, 25, 12, 1, 8)])
def test_v11_equals_numpy_reference(b, n, c, s, bottleneck):
  module = tl.TokenLearnerV11(num_tokens=s, bottleneck_dim=bottleneck)
  x = randn(b * 7 + n, b, n, c) * 2.0 + 0.5
  params = random_params(module, n, x)
  out, weights = apply(module, params, x, return_weights=True)
  want, want_w = ref_v11(np_params(params), x.astype(np.float64))
  assert out.shape == (b, s, c) and weights.shape == (b, s, n)
  np.testing.assert_allclose(weights, want_w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  report(f"v11 {(b, n, c, s)}", out, want)
  if s > 1:  # the maps are far from uniform (else the check above says little)
    assert np.ptp(want_w, axis=-1).min() > 1e-2
  np.testing.assert_array_equal(apply(module, params, x), out)


@pytest.mark.parametrize("sum_pooling", [True, False])
@pytest.mark.parametrize("b,h,w,c,s,flat", [
    (2, 4, 4, 8, 4, True), (1, 5, 5, 6, 3, True), (2, 3, 3, 16, 9, True), (2, 3, 5, 6, 4, False)])
def test_v1_equals_numpy_reference(b, h, w, c, s, flat, sum_pooling):
  module = tl.TokenLearnerV1(num_tokens=s, use_sum_pooling=sum_pooling)
  grid = randn(h * 10 + w + c, b, h, w, c) * 1.5 - 0.3
  x = grid.reshape(b, h * w, c) if flat else grid
  params = random_params(module, c, x)
  assert set(params) == {"LayerNorm_0", "Conv_0", "Conv_1", "Conv_2", "Conv_3"}
  assert params["Conv_0"]["kernel"].shape == (3, 3, c, s) and set(params["Conv_3"]) == {"kernel"}
  out, weights = apply(module, params, x, return_weights=True)
  want, want_w = ref_v1(np_params(params), grid.astype(np.float64), sum_pooling)
  assert out.shape == (b, s, c) and weights.shape == (b, s, h * w)
  np.testing.assert_allclose(weights, want_w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  report(f"v1 {(b, h, w, c, s, sum_pooling)}", out, want)
  assert np.ptp(want_w * (1 if sum_pooling else h * w), axis=-1).min() > 1e-2


@pytest.mark.parametrize("use_normalization", [True, False])
@pytest.mark.parametrize("b,s,n,c,grid", [(2, 4, 16, 8, False), (1, 3, 12, 16, False),
                                          (2, 5, 9, 6, True)])
def test_fuser_equals_numpy_reference(b, s, n, c, grid, use_normalization):
  module = tl.TokenFuser(bottleneck_dim=32, use_normalization=use_normalization)
  y = randn(s + n, b, s, c) * 1.5
  original = randn(s * n, b, n, c) + 0.2
  arg = original.reshape(b, 3, n // 3, c) if grid else original  # [B, h, w, C] in, out
  params = random_params(module, c + s, y, arg)
  names = {"Dense_0", "LayerNorm_0", "token_masking"} | (
      {"fuser_mix_norm1", "fuser_mix_norm2"} if use_normalization else set())
  assert set(params) == names and params["Dense_0"]["kernel"].shape == (s, s)
  out = apply(module, params, y, arg)
  want = ref_fuser(np_params(params), y.astype(np.float64), original.astype(np.float64),
                   use_normalization)
  assert out.shape == arg.shape
  np.testing.assert_allclose(np.asarray(out).reshape(b, n, c), want, rtol=1e-5, atol=1e-5)
  report(f"fuser {(b, s, n, c, use_normalization)}", np.asarray(out).reshape(b, n, c), want)


def test_fuser_mixing_kernel_is_zero_initialised_so_its_output_is_zero():
  module = tl.TokenFuser()
  y, original = randn(1, 2, 4, 8), randn(2, 2, 16, 8)
  params = jax.jit(module.init)(jax.random.key(0), y, original)["params"]
  assert not np.any(params["Dense_0"]["kernel"]) and not np.any(params["Dense_0"]["bias"])
  np.testing.assert_array_equal(apply(module, params, y, original), 0.0)


# ---- 2. the same against torch (float64), an implementation that shares no code ----
def test_modules_equal_torch_reference():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  t = lambda a: torch.tensor(np.asarray(a, np.float64))

  def ln(x, p):
    return F.layer_norm(x, x.shape[-1:], t(p["scale"]), t(p["bias"]), eps=EPS)

  def dense(x, p):
    return F.linear(x, t(p["kernel"]).T, t(p["bias"]))

  def mlp(x, p):
    return dense(F.gelu(dense(x, p["Dense_0"]), approximate="tanh"), p["Dense_1"])

  b, n, c, s = 2, 16, 12, 4
  x = randn(5, b, n, c) * 2.0
  xt = t(x)

  v11 = tl.TokenLearnerV11(num_tokens=s)
  p = random_params(v11, 1, x)
  w = torch.softmax(mlp(ln(xt, p["LayerNorm_0"]), p["token_masking"]).transpose(1, 2), dim=-1)
  want = (w @ xt).numpy()
  got = apply(v11, p, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  report("torch v11", got, want)

  for sum_pooling in (True, False):
    v1 = tl.TokenLearnerV1(num_tokens=s, use_sum_pooling=sum_pooling)
    p = random_params(v1, 2, x)
    maps = ln(xt.reshape(b, 4, 4, c), p["LayerNorm_0"]).permute(0, 3, 1, 2)  # NCHW
    conv = lambda m, i: F.conv2d(m, t(p[f"Conv_{i}"]["kernel"]).permute(3, 2, 0, 1), padding=1)
    for i in range(3):
      maps = F.gelu(conv(maps, i), approximate="tanh")
    w = torch.sigmoid(conv(maps, 3).reshape(b, s, n)) / (1 if sum_pooling else n)
    want = (w @ xt).numpy()
    got = apply(v1, p, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    report(f"torch v1 sum={sum_pooling}", got, want)

  y = randn(6, b, s, c)
  for use_normalization in (True, False):
    fuser = tl.TokenFuser(use_normalization=use_normalization)
    p = random_params(fuser, 3, y, x)
    yt = t(y)
    if use_normalization:
      yt = ln(yt, p["fuser_mix_norm1"])
    yt = dense(yt.transpose(1, 2), p["Dense_0"]).transpose(1, 2)
    if use_normalization:
      yt = ln(yt, p["fuser_mix_norm2"])
    mix = torch.sigmoid(mlp(ln(xt, p["LayerNorm_0"]), p["token_masking"]))  # [B, N, S]
    want = (mix @ yt).numpy()
    got = apply(fuser, p, y, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    report(f"torch fuser norm={use_normalization}", got, want)


# ---- 3. equal logits everywhere: every learned token is the mean token ----
def test_v11_with_constant_logits_returns_the_mean_token():
  b, n, c, s = 2, 12, 8, 3
  x = randn(11, b, n, c) * 3.0
  module = tl.TokenLearnerV11(num_tokens=s)
  params = random_params(module, 4, x)
  params["token_masking"]["Dense_1"]["kernel"] = np.zeros_like(
      params["token_masking"]["Dense_1"]["kernel"])
  out, weights = apply(module, params, x, return_weights=True)
  np.testing.assert_allclose(weights, np.full((b, s, n), 1.0 / n), rtol=1e-6)
  mean = x.mean(axis=1, keepdims=True)
  np.testing.assert_allclose(out, np.broadcast_to(mean, (b, s, c)), rtol=1e-5, atol=1e-6)


# ---- 4. dropout ----
@pytest.mark.parametrize("name", ["v11", "fuser", "v1"])
def test_dropout_only_with_a_dropout_rng(name):
  b, n, c, s = 2, 16, 8, 4
  x, y = randn(1, b, n, c), randn(2, b, s, c)
  module, args = {"v11": (tl.TokenLearnerV11(num_tokens=s, dropout_rate=0.5), (x,)),
                  "fuser": (tl.TokenFuser(dropout_rate=0.5), (y, x)),
                  "v1": (tl.TokenLearnerV1(num_tokens=s), (x,))}[name]
  key, other = jax.random.key(3), jax.random.key(4)
  p = random_params(module, 5, *args)
  evals = apply(module, p, *args)
  np.testing.assert_array_equal(apply(module, p, *args), evals)
  np.testing.assert_array_equal(apply(module, p, *args, rng=key, deterministic=True), evals)
  train = apply(module, p, *args, rng=key)
  np.testing.assert_array_equal(apply(module, p, *args, rng=key), train)
  if name == "v1":  # no dropout in v1
    np.testing.assert_array_equal(train, evals)
  else:
    assert np.max(np.abs(np.asarray(train) - np.asarray(evals))) > 1e-2
    assert np.max(np.abs(np.asarray(apply(module, p, *args, rng=other)) - train)) > 1e-2
    # With dropout_rate 0 the rng changes nothing.
    module0 = module.clone(dropout_rate=0.0)
    np.testing.assert_allclose(apply(module0, p, *args, rng=key), evals, rtol=1e-6, atol=1e-6)


# ---- the ViT ----
B, IMG, PATCH, WIDTH, DEPTH, HEADS, MLP, S = 2, 16, 4, 16, 3, 2, 32, 4
N = (IMG // PATCH) ** 2
IMAGES = np.random.default_rng(1).standard_normal((B, IMG, IMG, 3)).astype(np.float32)


def _model(mode, loc, version="v1.1", pool_type="gap", class_token=None, num_registers=0,
           num_tokens=S, **kw):
  reduction = {"method": "token_learner", "num_tokens": num_tokens, "loc": loc,
               "version": version, "mode": mode}
  reduction.update({k: kw.pop(k) for k in ("dropout_rate", "use_sum_pooling", "bottleneck_dim",
                                           "fuser_normalization") if k in kw})
  return vit.Model(10, width=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP,
                   patch_size=(PATCH, PATCH), pool_type=pool_type, class_token=class_token,
                   num_registers=num_registers, token_reduction=reduction, **kw)


def _params(model, seed=0, images=IMAGES):
  """Random parameters of the model's structure, drawn in numpy (compiling the ViT's init is
  slow on CPU)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  return _draw(shapes, seed, spread=0.2, gain=1.2)


def _runner(model, train=False):
  """params, images, dropout key or None -> (logits, aux), jitted once."""
  return jax.jit(lambda p, x, k=None: model.apply(
      {"params": p}, x, train=train, rngs={} if k is None else {"dropout": k}))


def _block_name(i):
  return f"block_{i:02d}"


def _block_input(model, params, aux, layer):
  """The tokens that entered block `layer` (prefix included), from the model's own outputs."""
  if layer > 0:
    return np.asarray(aux["blocks"][_block_name(layer - 1)])
  patches = np.asarray(aux["stem"]).reshape(B, N, WIDTH) + np.asarray(params["pos_embedding"])
  prefix = []
  if model.num_prefix > model.num_registers:
    prefix.append(np.broadcast_to(np.asarray(params["cls"]), (B, 1, WIDTH)))
  if model.num_registers:
    prefix.append(np.broadcast_to(np.asarray(params["registers"]), (B, model.num_registers, WIDTH)))
  return np.concatenate(prefix + [patches], axis=1)


def _plain_block(model, params, layer, x):
  """Block `layer` without its reducer, run standalone on the tokens x."""
  block_params = {k: v for k, v in params[_block_name(layer)].items() if k != "token_learner"}
  block = vit.EncoderBlock(num_heads=HEADS, mlp_dim=MLP, layer=layer, context=model.context())

  def fn(p, x):
    state = base.TokenState.create(x, num_prefix=model.num_prefix, grid=(IMG // PATCH,) * 2)
    return block.apply({"params": p}, state)[0].x
  return np.asarray(jax.jit(fn)(block_params, jnp.asarray(x)))


def test_vit_reducer_dropout_follows_train():
  model = _model("learner", loc=1, dropout_rate=0.3)
  params = _params(model)
  key = jax.random.key(7)
  run = _runner(model)
  evals = run(params, IMAGES)[1]["pre_logits"]
  np.testing.assert_array_equal(run(params, IMAGES, key)[1]["pre_logits"], evals)
  train = _runner(model, train=True)(params, IMAGES, key)[1]["pre_logits"]
  assert np.max(np.abs(np.asarray(train) - np.asarray(evals))) > 1e-3


PLACEMENTS = [  # version, loc, pool_type, class_token, num_registers
    ("v1.1", 1, "tok", None, 0),
    ("v1.1", 2, "gap", False, 0),
    ("v1.1", 0, "tok", None, 2),
    ("v1", 2, "gap", True, 1),
]


@pytest.mark.parametrize("version,loc,pool_type,class_token,num_registers", PLACEMENTS)
def test_learner_mode_counts_and_block_input_equal_the_standalone_learner(
    version, loc, pool_type, class_token, num_registers):
  model = _model("learner", loc, version, pool_type, class_token, num_registers,
                 use_sum_pooling=False, fc_norm=False)
  p = model.num_prefix
  params = _params(model)
  assert set(params[_block_name(loc)]["token_learner"]) == {"learner"}
  assert all("token_learner" not in params[_block_name(i)] for i in range(DEPTH) if i != loc)
  _, aux = _runner(model)(params, IMAGES)

  counts = [aux["blocks"][_block_name(i)].shape[1] for i in range(DEPTH)]
  assert counts == [N + p if i < loc else S + p for i in range(DEPTH)]
  assert list(aux["reduction"]) == [f"{_block_name(loc)}/token_learner/pre_block"]

  x_in = _block_input(model, params, aux, loc)
  patches = x_in[:, p:]
  cls = tl.TokenLearnerV1(S, use_sum_pooling=False) if version == "v1" else tl.TokenLearnerV11(S)
  tokens, weights = apply(cls, params[_block_name(loc)]["token_learner"]["learner"], patches,
                          return_weights=True)
  record = np.asarray(aux["reduction"][f"{_block_name(loc)}/token_learner/pre_block"]["weights"])
  np.testing.assert_allclose(record, weights, rtol=1e-5, atol=1e-6)
  # The learned tokens are the record's weights over the raw patch tokens, ...
  np.testing.assert_allclose(record @ patches.astype(np.float64), tokens, rtol=1e-4, atol=1e-5)
  # ... and block `loc` ran on them behind the untouched class/register tokens.
  want = _plain_block(model, params, loc, np.concatenate([x_in[:, :p], tokens], axis=1))
  np.testing.assert_allclose(aux["blocks"][_block_name(loc)], want, rtol=1e-5, atol=1e-5)
  report(f"learner block {loc} ({version}, {pool_type}, prefix {p})",
         aux["blocks"][_block_name(loc)], want)

  state = aux["state"]
  assert state.x.shape == (B, S + p, WIDTH)
  np.testing.assert_array_equal(state.ids[:, :p], np.broadcast_to(np.arange(p), (B, p)))
  np.testing.assert_array_equal(state.ids[:, p:], base.LEARNED_ID)
  np.testing.assert_allclose(state.size[:, p:], 1.0, rtol=1e-6)  # one token each
  if pool_type == "gap":  # a plain mean over the learned tokens, as scenic's "gap"
    np.testing.assert_allclose(aux["pre_logits"], np.asarray(aux["encoded"])[:, p:].mean(1),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool_type,class_token,num_registers,normalization",
                         [("gap", False, 0, True), ("tok", None, 1, True), ("tok", None, 0, False)])
def test_fuser_mode_counts_and_block_by_block_reference(pool_type, class_token, num_registers,
                                                        normalization):
  """Each fused block: learner -> block on S (+ prefix) -> fuser back to N -> + its input."""
  loc = 1
  model = _model("fuser", loc, pool_type=pool_type, class_token=class_token,
                 num_registers=num_registers, fuser_normalization=normalization)
  p = model.num_prefix
  params = _params(model)
  for i in range(DEPTH):
    names = set(params[_block_name(i)].get("token_learner", {}))
    assert names == ({"learner", "fuser"} if i >= loc else set())
  _, aux = _runner(model)(params, IMAGES)

  assert [aux["blocks"][_block_name(i)].shape for i in range(DEPTH)] == [(B, N + p, WIDTH)] * DEPTH
  assert sorted(aux["reduction"]) == [f"{_block_name(i)}/token_learner/pre_block"
                                      for i in range(loc, DEPTH)]
  state = aux["state"]
  np.testing.assert_array_equal(state.ids, np.broadcast_to(np.arange(N + p), (B, N + p)))
  np.testing.assert_array_equal(state.size, 1.0)
  assert not state.carry, state.carry  # the fuser's entry is popped again

  for layer in range(loc, DEPTH):
    reducer = params[_block_name(layer)]["token_learner"]
    x_in = _block_input(model, params, aux, layer)
    tokens, weights = apply(tl.TokenLearnerV11(S), reducer["learner"], x_in[:, p:],
                            return_weights=True)
    record = aux["reduction"][f"{_block_name(layer)}/token_learner/pre_block"]["weights"]
    np.testing.assert_allclose(record, weights, rtol=1e-5, atol=1e-6)
    y = _plain_block(model, params, layer, np.concatenate([x_in[:, :p], tokens], axis=1))
    fused = ref_fuser(np_params(reducer["fuser"]), y[:, p:].astype(np.float64),
                      x_in[:, p:].astype(np.float64), normalization)
    out = np.asarray(aux["blocks"][_block_name(layer)])
    assert np.max(np.abs(fused)) > 0.1  # the fuser does something here
    np.testing.assert_allclose(out[:, :p], y[:, :p], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, p:], fused + x_in[:, p:], rtol=1e-4, atol=1e-4)
    report(f"fused block {layer} ({pool_type}, prefix {p}, norm {normalization})",
           out[:, p:], fused + x_in[:, p:])


def test_fuser_passes_the_input_through_at_init_and_not_after_a_step():
  loc = 1
  model = _model("fuser", loc, pool_type="gap", class_token=False, head_zeroinit=False)
  # The model's own init (an rbg key: the same initialisers, far cheaper to compile on CPU).
  params = jax.jit(model.init)(jax.random.key(0, impl="unsafe_rbg"), IMAGES)["params"]
  run = _runner(model)
  _, aux = run(params, IMAGES)
  for layer in range(DEPTH):
    x_in = _block_input(model, params, aux, layer)
    out = np.asarray(aux["blocks"][_block_name(layer)])
    if layer >= loc:
      np.testing.assert_allclose(out, x_in, rtol=0, atol=1e-6)
    else:  # an ordinary block changes its tokens
      assert np.max(np.abs(out - x_in)) > 1e-2

  labels = jnp.arange(B) % 10

  def loss_fn(p):
    logits, _ = model.apply({"params": p}, IMAGES, train=True, rngs={"dropout": jax.random.key(1)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  opt = optax.adamw(1e-2)

  @jax.jit
  def train_step(params):
    updates, _ = opt.update(jax.grad(loss_fn)(params), opt.init(params), params)
    return optax.apply_updates(params, updates)

  params = train_step(params)
  _, aux = run(params, IMAGES)
  for layer in range(loc, DEPTH):
    kernel = params[_block_name(layer)]["token_learner"]["fuser"]["Dense_0"]["kernel"]
    assert np.all(np.abs(kernel) > 0), layer
    x_in = _block_input(model, params, aux, layer)
    out = np.asarray(aux["blocks"][_block_name(layer)])
    assert np.max(np.abs(out - x_in)) > 1e-3, layer


# ---- 8. bad settings ----
@pytest.mark.parametrize("images_shape,kw,pattern", [
    ((B, IMG, IMG, 3), dict(num_tokens=N + 1), rf"num_tokens={N + 1} is more than the {N} patch"),
    ((B, IMG, IMG, 3), dict(num_tokens=0), r"num_tokens must be a positive integer"),
    ((B, IMG, IMG, 3), dict(loc=DEPTH), r"loc=3 is outside"),
    ((B, IMG, IMG, 3), dict(loc=-1), r"loc=-1 is outside"),
    ((B, IMG, IMG, 3), dict(loc=None), r"needs `loc`"),
    ((B, IMG, 2 * IMG, 3), dict(version="v1"), r"version 'v1' needs a square patch grid, got 4x8"),
    ((B, IMG, IMG, 3), dict(version="v2"), r"version must be one of"),
    ((B, IMG, IMG, 3), dict(mode="mixer"), r"mode must be one of"),
    ((B, IMG, IMG, 3), dict(dropout_rate=1.0), r"dropout_rate must be in"),
    ((B, IMG, IMG, 3), dict(bottleneck_dim=0), r"bottleneck_dim must be a positive integer"),
])
def test_bad_settings_are_named(images_shape, kw, pattern):
  settings = dict(mode="learner", loc=1, pool_type="tok")
  settings.update(kw)
  model = _model(**settings)
  with pytest.raises(ValueError, match=pattern):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(images_shape))


def test_v11_accepts_non_square_grids_and_v1_standalone_refuses_them():
  model = _model("learner", 1, "v1.1", pool_type="tok")
  images = np.zeros((B, IMG, 2 * IMG, 3), np.float32)
  shapes = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), images)[0][1])
  assert shapes["blocks"]["block_00"].shape == (B, 2 * N + 1, WIDTH)
  assert shapes["blocks"]["block_01"].shape == (B, S + 1, WIDTH)
  with pytest.raises(ValueError, match="square patch grid, got 12 tokens"):
    jax.eval_shape(tl.TokenLearnerV1(4).init, jax.random.key(0), jnp.zeros((1, 12, 8)))


# ---- 9. short trainings with the project's trainer ----
@pytest.mark.parametrize("arg", ["method=learner,tokens=4,loc=1",
                                 "method=learner,tokens=4,loc=1,version=v1",
                                 "method=fuser,tokens=4,loc=1"])
def test_trainer_runs_learn(tmp_path, arg):
  from configs import token_learners
  from vitoken.engine import checkpoint as ckpt_lib
  from vitoken.engine.metrics import read_jsonl
  from vitoken.train import trainer

  c = token_learners.get_config(arg + ",runlocal")
  c.progress_bar, c.checkpoint.async_save = False, False
  # A tiny model that memorises 128 images of 32 px: the check is that the loss falls with the
  # learner in the network (gradients reach everything), not test accuracy.
  c.data.image_size, c.data.train_examples, c.data.eval_examples = 32, 128, 64
  c.model.update(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=(8, 8))
  c.total_steps, c.batch_size, c.optim.lr, c.schedule.warmup_steps = 80, 32, 5e-3, 5
  c.log_every_steps, c.eval_every_steps, c.checkpoint.every_steps = 1, 0, 80
  summary = trainer.run(c, str(tmp_path))
  assert summary["final_step"] == 80
  losses = [r["loss"] for r in read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
            if r["split"] == "train"]
  assert len(losses) == 80 and np.all(np.isfinite(losses))
  first, last = np.mean(losses[:10]), np.mean(losses[-10:])
  assert last < math.log(10) - 0.3 and last < first - 0.3, (first, last)

  params = ckpt_lib.load_params(str(tmp_path))
  reducer = params["block_01"]["token_learner"]
  if "fuser" in arg:
    assert set(reducer) == {"learner", "fuser"}
    assert np.abs(np.asarray(reducer["fuser"]["Dense_0"]["kernel"])).min() > 0
  else:
    assert set(reducer) == {"learner"} and "token_learner" not in params["block_00"]
    leaf = reducer["learner"]["LayerNorm_0"]["scale"]
    assert np.max(np.abs(np.asarray(leaf) - 1.0)) > 1e-3  # the learner was trained
