"""Learned visual-token compressors (vitoken.vlm.learned) against torch transcriptions, written
here, of their reference code: Qwen-VL's resampler (Qwen-VL `visual.py` / vLLM `Resampler2`,
then the VisionTransformer's ln_post and proj), MQT-LLaVA's position-keyed resampler
(`multimodal_projector/builder.py`) and QueCC (locuslab/llava-token-compression `quecc.py`),
with the Flax parameters copied into torch modules; then the properties the methods rely on
(Matryoshka prefixes, content-free keys, cell-local attention, the text condition), the
Matryoshka draw, the traced-count path and compile counts."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitoken.errors import ConfigError, InputError
from vitoken.vlm import learned

EPS = 1e-6  # the references' LayerNorm eps
TOL = dict(atol=1e-5, rtol=1e-5)


def _t(a):
  return torch.from_numpy(np.array(a, np.float32))


def _normal(rng, *shape):
  return rng.standard_normal(shape).astype(np.float32)


def _init(module, grid, *arrays, seed=0):
  """Random parameters in the tree `module.init` makes, drawn in numpy (running the
  initializers would compile for seconds per module): LayerNorm scales around 1 and biases
  off 0, so a copied weight that the reference ignored, or one put in the wrong place, shows;
  kernels scaled by 1/sqrt(fan_in) to keep activations near unit size."""
  shapes = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a, grid), *arrays)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path[-1:], simple=True)
    noise = _normal(rng, *leaf.shape)
    if name == "scale":
      return 1.0 + 0.1 * noise
    if name in ("bias", "in_proj_bias"):
      return 0.1 * noise
    if name == "query":
      return noise
    return noise / np.sqrt(np.prod(leaf.shape[:-1]))  # kernels, proj

  return jax.tree_util.tree_map_with_path(draw, shapes["params"])


@functools.lru_cache(maxsize=None)
def _jit_apply(module, *static, return_weights=False):
  """module.apply with the trailing static arguments (grid, num_tokens) fixed, jitted; one
  function per setting, so tests that run the same program share its compile."""
  return jax.jit(lambda params, *a: module.apply({"params": params}, *a, *static,
                                                 return_weights=return_weights))


# ---- the references, transcribed in torch/numpy ----

def ref_sincos(embed_dim, grid_size):
  """MAE's get_2d_sincos_pos_embed as Qwen-VL and MQT-LLaVA carry it (float32 numpy)."""
  def one_d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
  return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def ref_abs_pos(abs_pos, tgt_size, always=False):
  """get_abs_pos (vLLM's, with an (h, w) target); MQT-LLaVA's interpolates `always`."""
  src = int(math.sqrt(abs_pos.size(0)))
  if not always and (src, src) == tuple(tgt_size):
    return abs_pos
  return F.interpolate(abs_pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2),
                       size=tuple(tgt_size), mode="bicubic", align_corners=False
                       ).permute(0, 2, 3, 1).flatten(0, 2)


def ref_mha(p, embed_dim, num_heads, batch_first=False):
  attn = torch.nn.MultiheadAttention(embed_dim, num_heads, batch_first=batch_first)
  with torch.no_grad():
    attn.in_proj_weight.copy_(_t(p["in_proj_kernel"]).T)
    attn.in_proj_bias.copy_(_t(p["in_proj_bias"]))
    attn.out_proj.weight.copy_(_t(p["out_proj"]["kernel"]).T)
    attn.out_proj.bias.copy_(_t(p["out_proj"]["bias"]))
  return attn.eval()


def ref_ln(x, p):
  return F.layer_norm(x, x.shape[-1:], _t(p["scale"]), _t(p["bias"]), eps=EPS)


@torch.no_grad()
def ref_qwen_resampler(p, x, grid, m, num_heads):
  """Qwen-VL: Resampler.forward (queries sliced to the first m, as MQT-LLaVA), then
  VisionTransformer's `ln_post` and `x @ proj`. Returns (out [B, m, D], weights)."""
  width = p["query"].shape[1]
  side = math.isqrt(p["query"].shape[0])
  pos = torch.from_numpy(ref_sincos(width, side)).float()
  pos_embed = ref_abs_pos(pos, grid)
  x = _t(x)
  if "kv_proj" in p:
    x = F.linear(x, _t(p["kv_proj"]["kernel"]).T)
  x = ref_ln(x, p["ln_kv"]).permute(1, 0, 2)
  n = x.shape[1]
  q = ref_ln(_t(p["query"]), p["ln_q"])[:m]
  out, weights = ref_mha(p["attn"], width, num_heads)(
      q.unsqueeze(1).repeat(1, n, 1) + pos[:m].unsqueeze(1), x + pos_embed.unsqueeze(1), x,
      average_attn_weights=False)
  out = ref_ln(out.permute(1, 0, 2), p["ln_post"])
  return (out @ _t(p["proj"])).numpy(), weights.numpy()


@torch.no_grad()
def ref_mqt_resampler(p, x, grid, m, num_heads):
  """MQT-LLaVA's Resampler.forward(x, num_visual_tokens=m, tgt_size=grid). Its table is stored
  in float16 (`.half()`); kept in float32 here, as the module does."""
  kv_dim = p["query"].shape[1]
  side = math.isqrt(p["query"].shape[0])
  pos = torch.from_numpy(ref_sincos(kv_dim, side)).float()
  pos_embed = ref_abs_pos(pos, grid, always=True)
  x = _t(x).permute(1, 0, 2)
  n = x.shape[1]
  q = _t(p["query"])[:m].unsqueeze(1).repeat(1, n, 1)
  out, weights = ref_mha(p["attn"], kv_dim, num_heads)(
      ref_ln(q + pos[:m].unsqueeze(1), p["ln_q"]),
      ref_ln(pos_embed.unsqueeze(1).repeat(1, n, 1), p["ln_k"]),
      ref_ln(x, p["ln_v"]), average_attn_weights=False)
  return (out.permute(1, 0, 2) @ _t(p["proj"])).numpy(), weights.numpy()


def ref_linear(x, p):
  return F.linear(x, _t(p["kernel"]).T, _t(p["bias"]))


def ref_proj_mlp(x, p):
  """QueCC's q/k/v_proj: Linear, nn.GELU(), Linear, LayerNorm(eps=1e-6)."""
  return ref_ln(ref_linear(F.gelu(ref_linear(x, p["fc1"])), p["fc2"]), p["norm"])


@torch.no_grad()
def ref_quecc(p, features, levels, text, grid, num_heads):
  """QueCC.forward((x_multi, text_features, x)), the grid (h, w) in place of the reference's
  square token_grid_size; the einops patterns are spelled out as reshapes."""
  h, w = grid
  d = p["q_proj"]["fc2"]["kernel"].shape[1]
  x, x_multi = _t(features), _t(levels)
  text_features = ref_ln(ref_linear(_t(text).unsqueeze(1), p["text_projection"]), p["text_norm"])
  x = x + text_features
  b = x.shape[0]
  query_2d = ref_proj_mlp(x, p["q_proj"]).reshape(b, h, w, d).permute(0, 3, 1, 2)
  kernel = np.asarray(p["q_downsample"]["kernel"])
  s = kernel.shape[0]
  conv = torch.nn.Conv2d(d, d, kernel_size=s, stride=s, groups=d)
  conv.weight.copy_(_t(kernel.transpose(3, 2, 0, 1)))
  conv.bias.copy_(_t(p["q_downsample"]["bias"]))
  down = conv(query_2d)
  _, _, hh, ww = down.size()
  query_states = down.permute(0, 2, 3, 1).reshape(b * hh * ww, 1, d)  # b d h w -> (b h w) 1 d
  k, ell = h // hh, w // ww

  def chunk(t):  # b (i k j l) d -> (b i j) (k l) d
    return t.reshape(b, hh, k, ww, ell, d).permute(0, 1, 3, 2, 4, 5).reshape(-1, k * ell, d)

  key_states = chunk(ref_proj_mlp(x_multi, p["k_proj"]))
  value_states = chunk(ref_proj_mlp(x_multi, p["v_proj"]))
  out = ref_mha(p["clip_attn"], d, num_heads, batch_first=True)(
      query_states, key_states, value_states)[0]
  return out.reshape(b, hh * ww, d).numpy()  # (b t) 1 d -> b t d


# ---- Resampler ----

@functools.lru_cache(maxsize=None)
def _resampler(keys, c_in, grid, num_queries=16, width=32, heads=4, batch=2, seed=0):
  module = learned.Resampler(num_queries, width, heads, keys=keys)
  x = _normal(np.random.default_rng(seed), batch, grid[0] * grid[1], c_in)
  return module, _init(module, grid, x, seed=seed), x


@pytest.mark.parametrize("c_in,grid,m", [
    (24, (6, 6), 16),  # kv_proj, key table upsampled 4x4 -> 6x6
    (32, (5, 7), 16),  # input width == width: no kv_proj; a non-square grid
    (24, (4, 4), 10),  # the query grid itself (no resize); the first 10 queries
])
def test_resampler_content_matches_qwen_vl(c_in, grid, m):
  module, params, x = _resampler("content", c_in, grid)
  assert ("kv_proj" in params) == (c_in != 32)
  out, weights = _jit_apply(module, grid, m, return_weights=True)(params, x)
  ref_out, ref_weights = ref_qwen_resampler(params, x, grid, m, 4)
  assert out.shape == (2, m, 32)
  np.testing.assert_allclose(out, ref_out, **TOL)
  np.testing.assert_allclose(weights, ref_weights, **TOL)


@pytest.mark.parametrize("grid,m", [((6, 6), 16), ((3, 5), 6)])  # resized up; down, 6 queries
def test_resampler_position_matches_mqt_llava(grid, m):
  module, params, x = _resampler("position", 24, grid)
  assert params["query"].shape == (16, 24) and params["proj"].shape == (24, 32)
  out, weights = _jit_apply(module, grid, m, return_weights=True)(params, x)
  ref_out, ref_weights = ref_mqt_resampler(params, x, grid, m, 4)
  assert out.shape == (2, m, 32)
  np.testing.assert_allclose(out, ref_out, **TOL)
  np.testing.assert_allclose(weights, ref_weights, **TOL)


def test_bicubic_resize_is_torchs():
  table = np.random.default_rng(0).normal(size=(25, 8)).astype(np.float32)
  for grid in [(5, 5), (9, 7), (2, 3), (1, 1), (16, 16)]:
    ours = learned.resize_table(table, 5, grid)
    theirs = ref_abs_pos(torch.from_numpy(table), grid, always=True).numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-6)
  np.testing.assert_array_equal(learned.sincos_2d(32, 4), ref_sincos(32, 4))


@pytest.mark.parametrize("keys", learned.KEYS)
def test_first_m_outputs_are_the_prefix_of_all_m(keys):
  module, params, x = _resampler(keys, 24, (6, 6))
  full = _jit_apply(module, (6, 6))(params, x)
  assert full.shape == (2, 16, 32)
  for m in (1, 7):
    np.testing.assert_allclose(_jit_apply(module, (6, 6), m)(params, x), full[:, :m], atol=1e-6)


def test_position_keys_ignore_the_image():
  other = 3.0 * _normal(np.random.default_rng(9), 2, 36, 24) + 1.0
  weights = {}
  for keys in learned.KEYS:
    module, params, x = _resampler(keys, 24, (6, 6))
    apply = _jit_apply(module, (6, 6), return_weights=True)
    (out1, w1), (out2, w2) = apply(params, x), apply(params, other)
    assert np.abs(np.asarray(out1) - np.asarray(out2)).max() > 1e-3
    weights[keys] = np.asarray(w1), np.asarray(w2)
  w1, w2 = weights["position"]
  np.testing.assert_array_equal(w1, w2)
  np.testing.assert_array_equal(w1[0], w1[1])  # the same weights for every image
  c1, c2 = weights["content"]
  assert np.abs(c1 - c2).max() > 1e-3  # Qwen-VL's keys do see the image


@pytest.mark.parametrize("max_tokens", [16, 7])
def test_matryoshka_tokens_even_and_uniform(max_tokens):
  draws = 8000
  keys = jax.random.split(jax.random.key(0), draws)
  m = np.asarray(jax.jit(jax.vmap(lambda k: learned.matryoshka_tokens(k, max_tokens)))(keys))
  assert m.dtype == np.int32
  support = np.arange(2, max_tokens + 1, 2)
  assert set(np.unique(m)) == set(support)
  counts = np.array([(m == v).sum() for v in support])
  expected = draws / len(support)
  chi2 = ((counts - expected) ** 2 / expected).sum()
  # 99.9% quantiles of chi-square with 7 and 2 degrees of freedom
  assert chi2 < {8: 24.32, 3: 13.82}[len(support)], (counts, chi2)
  with pytest.raises(ConfigError, match="max_tokens"):
    learned.matryoshka_tokens(jax.random.key(0), 1)


def test_traced_count_masks_and_matches_static():
  module, params, x = _resampler("content", 24, (6, 6))
  traces = []

  def masked(params, x, m):
    traces.append(None)
    return module.apply({"params": params}, x, (6, 6), m)

  masked = jax.jit(masked)
  for m in (7, 16, 1):
    out = masked(params, x, jnp.int32(m))
    assert out.shape == (2, 16, 32)
    static = _jit_apply(module, (6, 6), m)(params, x)
    np.testing.assert_allclose(out[:, :m], static, atol=1e-6)
    np.testing.assert_array_equal(out[:, m:], 0)
    np.testing.assert_array_equal(learned.query_mask(m, 16), np.arange(16) < m)
  assert len(traces) == 1  # one compile for every m

  # a training step: a fresh m drawn inside the jitted function
  @jax.jit
  def step(params, x, rng):
    m = learned.matryoshka_tokens(rng, 16)
    return module.apply({"params": params}, x, (6, 6), m), learned.query_mask(m, 16)

  out, keep = step(params, x, jax.random.key(3))
  m = int(keep.sum())
  assert m % 2 == 0 and np.all(np.asarray(out)[:, m:] == 0)
  np.testing.assert_allclose(out[:, :m], _jit_apply(module, (6, 6), m)(params, x), atol=1e-6)


def test_one_compile_per_static_count():
  module, params, x = _resampler("position", 24, (6, 6))
  traces = []

  def run(params, x, m):
    traces.append(m)
    return module.apply({"params": params}, x, (6, 6), m)

  run = jax.jit(run, static_argnums=2)
  for m in (1, 7, 1, 7, 1):
    assert run(params, x + m, m).shape == (2, m, 32)
  assert sorted(traces) == [1, 7]


def test_resampler_bad_settings():
  x = np.ones((1, 36, 24), np.float32)
  with pytest.raises(ConfigError, match="num_queries=15"):
    learned.Resampler(15, 32, 4).init(jax.random.key(0), x, (6, 6))
  with pytest.raises(ConfigError, match="keys"):
    learned.Resampler(16, 32, 4, keys="text").init(jax.random.key(0), x, (6, 6))
  with pytest.raises(ConfigError, match="num_heads"):
    learned.Resampler(16, 32, 5).init(jax.random.key(0), x, (6, 6))
  with pytest.raises(ConfigError, match="num_heads"):  # MQT-LLaVA attends at the input width
    learned.Resampler(16, 32, 16, keys="position").init(jax.random.key(0), x, (6, 6))
  module, params, x = _resampler("content", 24, (6, 6))
  with pytest.raises(ConfigError, match="num_tokens=17"):
    module.apply({"params": params}, x, (6, 6), 17)
  with pytest.raises(ConfigError, match="num_tokens=0"):
    module.apply({"params": params}, x, (6, 6), 0)
  with pytest.raises(InputError, match="grid 5x6"):
    module.apply({"params": params}, x, (5, 6))


def test_initializers_run():
  """The real initializers (the tests above draw parameters in numpy) run and give the
  references' shapes. (An rbg key: threefry's bits take twice as long to compile here.)"""
  key = jax.random.key(0, impl="unsafe_rbg")
  module = learned.Resampler(4, 8, 2)
  params = jax.jit(lambda k, x: module.init(k, x, (2, 3)))(
      key, np.ones((1, 6, 24), np.float32))["params"]
  assert params["kv_proj"]["kernel"].shape == (24, 8)
  assert params["query"].shape == (4, 8) and params["proj"].shape == (8, 8)
  module = learned.QueCC(4, 8, 2)
  params = jax.jit(lambda k, *a: module.init(k, *a, (4, 4)))(
      key, np.ones((1, 16, 8), np.float32), np.ones((1, 16, 32), np.float32),
      np.ones((1, 12), np.float32))["params"]
  assert params["q_downsample"]["kernel"].shape == (2, 2, 1, 8)
  assert params["text_projection"]["kernel"].shape == (12, 8)
  assert np.abs(params["q_downsample"]["bias"]).max() <= 0.5  # U(+-1/sqrt(2*2)), as torch's


# ---- QueCC ----

@functools.lru_cache(maxsize=None)
def _quecc(num_tokens, grid, c=16, levels=4, width=None, heads=4, t=40, batch=2, seed=0):
  width = c if width is None else width
  module = learned.QueCC(num_tokens, width, heads)
  n = grid[0] * grid[1]
  rng = np.random.default_rng(seed)
  inputs = (_normal(rng, batch, n, c), _normal(rng, batch, n, levels * c), _normal(rng, batch, t))
  return module, _init(module, grid, *inputs, seed=seed), inputs


@pytest.mark.parametrize("num_tokens,grid,width", [
    (9, (6, 6), None),    # s = 2, the reference's shapes (width == vision width)
    (8, (4, 8), None),    # s = 2 on a non-square grid
    (9, (6, 6), 24),      # an attention width other than the vision width
])
def test_quecc_matches_reference(num_tokens, grid, width):
  module, params, inputs = _quecc(num_tokens, grid, width=width)
  out = _jit_apply(module, grid)(params, *inputs)
  assert out.shape == (2, num_tokens, width or 16)
  np.testing.assert_allclose(out, ref_quecc(params, *inputs, grid, 4), **TOL)


def test_quecc_default_heads_are_eight():
  assert learned.QueCC(4, 16).num_heads == 8
  module, params, inputs = _quecc(4, (6, 6), heads=8)  # s = 3
  np.testing.assert_allclose(_jit_apply(module, (6, 6))(params, *inputs),
                             ref_quecc(params, *inputs, (6, 6), 8), **TOL)


def test_quecc_queries_see_only_their_cell():
  grid, s = (6, 6), 2
  module, params, (features, multi, text) = _quecc(9, grid)
  apply = _jit_apply(module, grid, return_weights=True)
  base, weights = apply(params, features, multi, text)
  assert weights.shape == (2, 9, 4, 1, s * s)  # [B, K, heads, 1 query, its cell]
  rng = np.random.default_rng(0)
  for token in rng.choice(36, size=6, replace=False):
    row, col = divmod(int(token), grid[1])
    cell = (row // s) * (grid[1] // s) + col // s
    bumped = []
    for a in (features, multi):  # the token moved in the query's input and in the keys/values
      a = a.copy()
      a[:, token] += 5.0 * _normal(rng, a.shape[-1])
      bumped.append(a)
    out, _ = apply(params, *bumped, text)
    others = np.arange(9) != cell
    np.testing.assert_array_equal(out[:, others], base[:, others])
    assert np.abs(out[:, cell] - base[:, cell]).max() > 1e-3


def test_quecc_text_shifts_the_output():
  module, params, (features, multi, text) = _quecc(9, (6, 6))
  apply = _jit_apply(module, (6, 6))
  out, shifted = apply(params, features, multi, text), apply(params, features, multi, text + 1)
  assert np.abs(np.asarray(out) - np.asarray(shifted)).max() > 1e-3
  with pytest.raises(InputError, match="question's LM state"):
    module.apply({"params": params}, features, multi, None, (6, 6))


@pytest.mark.parametrize("num_tokens,grid", [(2, (6, 6)), (5, (6, 6)), (36 * 4, (6, 6)),
                                             (1, (2, 8))])
def test_quecc_bad_num_tokens(num_tokens, grid):
  n = grid[0] * grid[1]
  module = learned.QueCC(num_tokens, 16, 4)
  arrays = (np.ones((1, n, 16), np.float32), np.ones((1, n, 64), np.float32),
            np.ones((1, 8), np.float32))
  with pytest.raises(ConfigError, match=rf"num_tokens={num_tokens}.*N={n}"):
    module.init(jax.random.key(0), *arrays, grid)


def test_quecc_one_compile_per_num_tokens():
  traces = []
  for num_tokens, heads in ((9, 4), (4, 8)):
    module, params, (features, multi, text) = _quecc(num_tokens, (6, 6), heads=heads)

    def run(params, features, multi, text, module=module):
      traces.append(module.num_tokens)
      return module.apply({"params": params}, features, multi, text, (6, 6))

    run = jax.jit(run)
    for shift in range(3):
      assert run(params, features + shift, multi, text - shift).shape == (2, num_tokens, 16)
  assert traces == [9, 4]
