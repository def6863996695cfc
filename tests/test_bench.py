"""The benchmark (vitoken.bench, configs/bench.py) and what it brought along: padded attention
and its implementation choice, ToMe's one-hot merge, analytic FLOPs and device peaks.

The CPU bench runs end to end once (configs/bench.py:cpu,tiny, timm included) and several
tests read its rows; the rest are small and independent (numpy references, hand formulas)."""
import json
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import bench as bench_config
from vitoken import bench
from vitoken.bench import core, flops, torch_baselines
from vitoken.models import attention, vit
from vitoken.models.reducers import base, tome

ATOL = 1e-5


# ============================================================================ 1. CPU bench end to end

TOKENS = {"dense": "65>65>65>65", "tome_r8": "65>57>49>41", "evit_70": "65>65>47>35"}


@pytest.fixture(scope="module")
def cpu_bench(tmp_path_factory):
  """configs/bench.py:cpu,tiny run once, written to a temporary folder: (rows, meta, out)."""
  config = bench_config.get_config("cpu,tiny")
  out = str(tmp_path_factory.mktemp("bench"))
  with config.unlocked():
    config.out = out
  torch_threads = None
  if torch_baselines.missing() is None:
    import torch  # pylint: disable=import-outside-toplevel
    # Two busy shared cores: torch's threads fighting XLA's make timm ~25x slower; one thread
    # changes the timing only, not what the rows hold.
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
  try:
    rows, meta = bench.run(config)
  finally:
    if torch_threads is not None:
      torch.set_num_threads(torch_threads)
  return rows, meta, out


def _vitoken_rows(rows):
  return [r for r in rows if r["variant"] in TOKENS]


def test_bench_every_variant_and_mode_runs(cpu_bench):
  rows, _, _ = cpu_bench
  vrows = _vitoken_rows(rows)
  assert sorted((r["variant"], r["mode"]) for r in vrows) == sorted(
      (v, m) for v in TOKENS for m in ("inference", "train"))
  for r in vrows:
    assert r["status"] == "ok", r
    assert r["backbone"] == "tiny" and r["batch"] == 4
    assert r["img/s"] > 0 and r["img/s min"] <= r["img/s"] <= r["img/s max"], r
    assert r["x dense"] > 0 and r["TFLOP/s"] > 0 and r["compile s"] >= 0
    assert math.isnan(r["MFU"])  # no known peak for a CPU
    assert r["tokens"] == TOKENS[r["variant"]], r
    assert r["XLA GFLOPs/img"] == pytest.approx(r["XLA / analytic"] * r["analytic GFLOPs/img"])
  # Dense rows first within each mode (the baseline leads its group).
  for mode in ("inference", "train"):
    assert [r["variant"] for r in vrows if r["mode"] == mode][0] == "dense"


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_bench_dense_is_the_baseline_and_flops_agree(cpu_bench, mode):
  rows, _, _ = cpu_bench
  by_variant = {r["variant"]: r for r in _vitoken_rows(rows) if r["mode"] == mode}
  dense = by_variant["dense"]
  assert dense["x dense"] == 1.0
  assert 0.9 <= dense["XLA / analytic"] <= 1.1, dense
  for v in ("tome_r8", "evit_70"):
    r = by_variant[v]
    assert r["analytic GFLOPs/img"] < dense["analytic GFLOPs/img"]
    assert r["XLA GFLOPs/img"] < dense["XLA GFLOPs/img"]
    assert r["x dense"] == pytest.approx(r["img/s"] / dense["img/s"])
    assert 0.9 <= r["XLA / analytic"] <= 1.2, r


def test_bench_analytic_flops_follow_the_token_plan(cpu_bench):
  """Each row's analytic count is the hand formula at its token string; train is 3x forward."""
  rows, _, _ = cpu_bench
  for r in _vitoken_rows(rows):
    counts = [int(c) for c in r["tokens"].split(">")]
    want = hand_flops(width=192, mlp=768, patch=8, channels=3, counts=counts, prefix=1,
                      classes=10, heads=3)
    want *= 3 if r["mode"] == "train" else 1
    assert r["analytic GFLOPs/img"] * 1e9 == pytest.approx(want, rel=1e-12), r


def test_bench_meta(cpu_bench):
  _, meta, _ = cpu_bench
  assert meta["device"].startswith("cpu:")
  assert meta["devices"] == jax.device_count()
  assert meta["peak TFLOP/s"] is None
  assert meta["dtype"] == "float32" and meta["image_size"] == 64
  assert meta["attention parity (max |logit diff| vs XLA)"] == {"tiny": 0.0}


def test_bench_torch_rows(cpu_bench):
  rows, meta, _ = cpu_bench
  why = torch_baselines.missing()
  if why is not None:
    assert meta["torch"] == why
    assert not [r for r in rows if r["variant"] == "timm"]
    pytest.skip(why)
  timm_rows = [r for r in rows if r["variant"] == "timm"]
  assert sorted(r["mode"] for r in timm_rows) == ["inference", "train"]
  dense = {r["mode"]: r["img/s"] for r in _vitoken_rows(rows) if r["variant"] == "dense"}
  for r in timm_rows:
    assert r["status"] == "ok" and r["backbone"] == "tiny" and r["batch"] == 4, r
    assert r["img/s"] > 0
    assert r["x dense"] == pytest.approx(r["img/s"] / dense[r["mode"]])
  assert not [r for r in rows if r["variant"].startswith("ToMe reference")]  # tiny: no r's
  assert "timm" in meta["torch"]


def _same(a, b):
  """Equality with nan == nan (MFU is nan without a peak)."""
  if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
    return True
  return a == b


def test_bench_writes_json_and_markdown(cpu_bench):
  rows, meta, out = cpu_bench
  assert sorted(os.listdir(out)) == ["bench_cpu.json", "bench_cpu.md"]
  with open(os.path.join(out, "bench_cpu.json")) as f:
    saved = json.load(f)
  assert len(saved["rows"]) == len(rows)
  for got, want in zip(saved["rows"], rows):
    assert set(got) == set(want)
    assert all(_same(got[k], want[k]) for k in want), (got, want)
  assert saved["meta"]["device"] == meta["device"]
  assert saved["meta"]["attention parity (max |logit diff| vs XLA)"] == {"tiny": 0.0}
  with open(os.path.join(out, "bench_cpu.md")) as f:
    text = f.read()
  lines = text.strip().split("\n")
  assert lines[0].startswith("<!-- {") and lines[0].endswith("} -->")
  assert json.loads(lines[0][len("<!-- "):-len(" -->")])["device"] == meta["device"]
  assert lines[1] == "| " + " | ".join(bench.COLUMNS) + " |"
  assert len(lines) == 3 + len(rows)
  for line, r in zip(lines[3:], rows):
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert len(cells) == len(bench.COLUMNS)
    assert cells[:3] == [r["backbone"], r["variant"], r["mode"]] and cells[-1] == r["status"]
    assert cells[bench.COLUMNS.index("MFU")] == "-"


# ============================================================================ 7. config errors

def _micro_config(**kw):
  """The tiny preset shrunk further, for the errors that come before (or just after) init."""
  c = bench_config.get_config("cpu,tiny")
  c.backbones = (dict(name="micro", width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=(8, 8)),)
  c.image_size, c.check_parity, c.variants = 16, False, {"dense": {}}
  c.torch.enabled = False
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def test_bench_config_unknown_preset():
  with pytest.raises(ValueError, match=r"preset, one of \('cpu', 'gpu'\); got 'tpu'"):
    bench_config.get_config("tpu")
  with pytest.raises(ValueError, match="got 'tiny'"):
    bench_config.get_config("tiny,cpu")


def test_bench_config_presets_are_consistent():
  for arg in ("cpu", "gpu", "cpu,tiny", "gpu,tiny", "gpu,variant=B/16"):
    c = bench_config.get_config(arg)
    assert c.baseline in c.variants, arg
    assert set(c.modes) <= set(core.MODES)
  assert bench_config.get_config("gpu,variant=B/16").backbones == ("B/16",)


def test_bench_baseline_not_among_variants():
  with pytest.raises(ValueError, match=r"baseline 'nope' is not among the variants \['dense'\]"):
    core.bench(_micro_config(baseline="nope"))


def test_bench_bad_mode():
  with pytest.raises(ValueError, match=r"modes must be among \('inference', 'train'\), got \['eval'\]"):
    core.bench(_micro_config(modes=("eval",)))


# ============================================================================ 2. analytic FLOPs

def hand_flops(*, width, mlp, patch, channels, counts, prefix, classes, heads=2):
  """2 FLOPs per multiply-add of every matmul, written shape by shape: (m x k) @ (k x n) costs
  2 m k n; attention per head on head_dim = width / heads columns."""
  def mm(m, k, n):
    return 2 * m * k * n
  head_dim = width // heads
  total = mm(counts[0] - prefix, patch * patch * channels, width)  # patch embedding
  for n_in, n_out in zip(counts[:-1], counts[1:]):
    total += mm(n_in, width, 3 * width)  # q, k, v
    total += heads * mm(n_in, head_dim, n_in)  # q k^T
    total += heads * mm(n_in, n_in, head_dim)  # probs v
    total += mm(n_in, width, width)  # output projection
    total += mm(n_out, width, mlp) + mm(n_out, mlp, width)  # MLP after the reducer
  return total + mm(1, width, classes)


def _small(class_token=True, num_classes=10, depth=2, mlp_dim=64, **kw):
  return vit.VisionTransformer(
      num_classes=num_classes, patch_size=(4, 4), width=32, depth=depth, mlp_dim=mlp_dim,
      num_heads=2, pool_type="tok" if class_token else "gap", class_token=class_token, **kw)


def test_analytic_flops_hand_count():
  """Worked by hand: 16 patches of 4x4x3 into width 32, 2 blocks of 17 tokens, 10 classes."""
  patch = 2 * 16 * 48 * 32
  block = 2 * 17 * 32 * 96 + 2 * 2 * 17 * 17 * 32 + 2 * 17 * 32 * 32 + 2 * 2 * 17 * 32 * 64
  assert patch + 2 * block + 2 * 32 * 10 == 680832
  assert flops.analytic_forward_flops(_small(), [17, 17, 17], [17, 17], 3) == 680832


@pytest.mark.parametrize("num_classes", [0, 10])
@pytest.mark.parametrize("class_token", [True, False], ids=["cls", "gap"])
@pytest.mark.parametrize("plan", ["dense", "uneven"])
@pytest.mark.parametrize("mlp_dim", [64, None], ids=["mlp64", "mlp4x"])
def test_analytic_flops_against_hand_formula(num_classes, class_token, plan, mlp_dim):
  prefix = int(class_token)
  counts = {"dense": [16, 16, 16], "uneven": [16, 16, 12, 8]}[plan]
  counts = [c + prefix for c in counts]
  model = _small(class_token, num_classes, depth=len(counts) - 1, mlp_dim=mlp_dim)
  want = hand_flops(width=32, mlp=mlp_dim or 128, patch=4, channels=3, counts=counts,
                    prefix=prefix, classes=num_classes)
  # ToMe-like: each block attends over the tokens entering it, its MLP runs on those leaving.
  assert flops.analytic_forward_flops(model, counts, counts[:-1], 3) == want


def test_analytic_flops_channels_and_registers():
  model = _small(num_registers=2)  # class token + 2 registers: 3 prefix tokens
  counts = [19, 19, 15]
  want = hand_flops(width=32, mlp=64, patch=4, channels=1, counts=counts, prefix=3, classes=10)
  assert flops.analytic_forward_flops(model, counts, counts[:-1], 1) == want


def _shapes(model, images):
  return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


@pytest.mark.parametrize("class_token", [True, False], ids=["cls", "gap"])
def test_token_counts_scanned_and_not(class_token):
  images = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  n = 16 + int(class_token)
  for scan in (False, True):
    model = _small(class_token, depth=3, scan=scan)
    counts, attended = flops.token_counts(model, _shapes(model, images), images)
    assert counts == [n] * 4 and attended == [n] * 3, (scan, counts, attended)


def test_token_counts_and_summary_follow_tome():
  images = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  model = _small(depth=3, token_reduction={"method": "tome", "r": [2, 0, 3]})
  counts, attended = flops.token_counts(model, _shapes(model, images), images)
  assert counts == [17, 15, 15, 12] and attended == [17, 15, 15]
  got = flops.summary(model, _shapes(model, images), images)
  assert got["tokens"] == "17>15>15>12"
  want = hand_flops(width=32, mlp=64, patch=4, channels=3, counts=counts, prefix=1, classes=10)
  assert got["analytic GFLOPs/img"] == pytest.approx(want / 1e9, rel=1e-12)


def test_analytic_flops_count_attention_after_a_pre_block_reducer():
  images = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  model = _small(depth=3, token_reduction={"method": "token_learner", "num_tokens": 4, "loc": 1})
  got = flops.summary(model, _shapes(model, images), images)
  assert got["tokens"] == "17>17>5>5"
  # Block 1's attention and MLP both run on the 5 tokens the learner leaves (its own small
  # matmuls are left out, as the module says of reducers).
  want = (hand_flops(width=32, mlp=64, patch=4, channels=3, counts=[17, 17], prefix=1, classes=10)
          + hand_flops(width=32, mlp=64, patch=4, channels=3, counts=[5, 5, 5], prefix=1,
                       classes=0) - 2 * (5 - 1) * 48 * 32)
  assert got["analytic GFLOPs/img"] * 1e9 == pytest.approx(want, rel=1e-12)


# ============================================================================ 3. padded attention

def _np_attention(q, k, v, bias=None, key_mask=None):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  if key_mask is not None:
    logits = np.where(np.asarray(key_mask)[:, None, None, :], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def _attention_inputs(nq, nk, bias_kind, use_mask, seed=0, b=2, h=3, d=8):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, nq, h, d)).astype(np.float32)
  k = rng.standard_normal((b, nk, h, d)).astype(np.float32)
  v = rng.standard_normal((b, nk, h, d)).astype(np.float32)
  bias = {None: None,
          "per_key": rng.standard_normal((b, 1, 1, nk)),
          "per_head": rng.standard_normal((1, h, nq, nk))}[bias_kind]
  bias = None if bias is None else bias.astype(np.float32)
  key_mask = None
  if use_mask:
    key_mask = rng.random((b, nk)) > 0.3
    key_mask[:, 0] = True
    key_mask[0, -1] = False
  return q, k, v, bias, key_mask


def _attend_and_grads(pad_to, q, k, v, bias, key_mask, cotangent):
  @jax.jit
  def f(q, k, v, bias, key_mask):
    def loss(q, k, v, bias):
      out = attention.fused_attention(q, k, v, bias=bias, key_mask=key_mask,
                                      implementation="xla", pad_to=pad_to)
      return (out * cotangent).sum(), out
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    return jax.grad(loss, argnums=argnums, has_aux=True)(q, k, v, bias)
  grads, out = f(q, k, v, bias, key_mask)
  return np.asarray(out), [np.asarray(g) for g in grads]


ATTENTION_CASES = [
    # nq, nk, pad_to, bias kind, key mask
    pytest.param(197, 197, 64, None, False, id="n197"),
    pytest.param(197, 197, 64, "per_key", False, id="n197-keybias"),
    pytest.param(197, 197, 64, "per_head", False, id="n197-headbias"),
    pytest.param(197, 197, 64, None, True, id="n197-mask"),
    pytest.param(197, 197, 64, "per_key", True, id="n197-keybias-mask"),
    pytest.param(197, 197, 64, "per_head", True, id="n197-headbias-mask"),
    pytest.param(50, 50, 16, "per_head", False, id="n50-pad16-headbias"),
    pytest.param(50, 50, 16, "per_key", True, id="n50-pad16-keybias-mask"),
    pytest.param(1, 197, 64, None, False, id="q1-k197"),
    pytest.param(1, 197, 64, "per_key", True, id="q1-k197-keybias-mask"),
    pytest.param(1, 64, 64, "per_key", False, id="q1-k64-keybias"),
]


@pytest.mark.parametrize("nq,nk,pad_to,bias_kind,use_mask", ATTENTION_CASES)
def test_padded_attention_equals_unpadded(nq, nk, pad_to, bias_kind, use_mask):
  q, k, v, bias, key_mask = _attention_inputs(nq, nk, bias_kind, use_mask, seed=nq + nk)
  cot = np.random.default_rng(7).standard_normal(q.shape).astype(np.float32)
  out0, grads0 = _attend_and_grads(0, q, k, v, bias, key_mask, cot)
  out1, grads1 = _attend_and_grads(pad_to, q, k, v, bias, key_mask, cot)
  assert out1.shape == out0.shape == q.shape
  np.testing.assert_allclose(out1, out0, rtol=0, atol=ATOL)
  np.testing.assert_allclose(out0, _np_attention(q, k, v, bias, key_mask), rtol=0, atol=ATOL)
  assert len(grads1) == len(grads0) == (3 if bias is None else 4)
  for name, g0, g1, x in zip("qkvb", grads0, grads1, (q, k, v, bias)):
    assert g1.shape == g0.shape == x.shape, name
    np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=ATOL, err_msg=name)
  if key_mask is not None:  # masked keys get no gradient, padded or not
    np.testing.assert_array_equal(grads1[2][~key_mask], 0.0)


def test_padded_attention_equals_numpy_reference():
  """Against an explicit float64 softmax: a padded key with any weight would show."""
  q, k, v, bias, key_mask = _attention_inputs(197, 197, "per_head", True, seed=3)
  # Large values make any leak into padded (zero) keys or from masked keys obvious.
  v[:, 5] += 100.0
  out = attention.fused_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                  bias=jnp.asarray(bias), key_mask=jnp.asarray(key_mask),
                                  implementation="xla", pad_to=64)
  np.testing.assert_allclose(np.asarray(out), _np_attention(q, k, v, bias, key_mask),
                             rtol=1e-5, atol=ATOL)
  q, k, v, _, _ = _attention_inputs(50, 50, None, False, seed=4)
  k *= 3.0  # peaked attention; zero-padded keys would have logit 0, well above many real ones
  out = attention.fused_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                  implementation="xla", pad_to=64)
  np.testing.assert_allclose(np.asarray(out), _np_attention(q, k, v), rtol=1e-5, atol=ATOL)


@pytest.mark.parametrize("nq,nk,bias_kind,use_mask,padded", [
    (197, 197, "per_key", False, (256, 256)),
    (197, 197, "per_head", True, (256, 256)),
    (1, 197, "per_key", True, (64, 256)),  # a single query (MAP head) is padded too
    (128, 128, None, False, (128, 128)),
])
def test_cudnn_pads_to_64_by_default(monkeypatch, nq, nk, bias_kind, use_mask, padded):
  """Under "cudnn" the sequences reach dot_product_attention padded to a multiple of 64 (run
  here through XLA in its place), and the result is the unpadded one; "xla" pads nothing."""
  q, k, v, bias, key_mask = _attention_inputs(nq, nk, bias_kind, use_mask, seed=11)
  real = jax.nn.dot_product_attention
  seen = []

  def recording(q, k, v, **kw):
    seen.append((kw["implementation"], q.shape[1], k.shape[1], v.shape[1],
                 None if kw["bias"] is None else kw["bias"].shape,
                 None if kw["mask"] is None else kw["mask"].shape))
    return real(q, k, v, **{**kw, "implementation": "xla"})

  monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
  args = [jnp.asarray(a) for a in (q, k, v)]
  kw = dict(bias=None if bias is None else jnp.asarray(bias),
            key_mask=None if key_mask is None else jnp.asarray(key_mask))
  out = attention.fused_attention(*args, **kw, implementation="cudnn")
  ref = attention.fused_attention(*args, **kw, implementation="xla")
  assert seen[0][:4] == ("cudnn", *padded, padded[1])
  assert seen[1][:4] == ("xla", nq, nk, nk)
  if bias_kind == "per_key":
    assert seen[0][4] == (2, 1, 1, padded[1])
  elif bias_kind == "per_head":
    assert seen[0][4] == (1, 3) + padded
  if use_mask:
    assert seen[0][5] == (2, 1, 1, padded[1])
  assert out.shape == q.shape
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=ATOL)
  np.testing.assert_allclose(np.asarray(ref), _np_attention(q, k, v, bias, key_mask),
                             rtol=1e-5, atol=ATOL)


# ============================================================================ 4. choose_implementation

def _q(dtype=jnp.float32, head_dim=64):
  return jnp.zeros((1, 4, 2, head_dim), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("impl", [None, "auto"])
def test_choose_implementation_on_cpu_is_xla(impl, dtype):
  assert jax.default_backend() == "cpu"
  assert attention.choose_implementation(impl, _q(dtype)) == "xla"


@pytest.mark.parametrize("impl", ["xla", "cudnn"])
def test_choose_implementation_explicit_stands(monkeypatch, impl):
  assert attention.choose_implementation(impl, _q()) == impl
  assert attention.choose_implementation(impl, _q(jnp.bfloat16, 12)) == impl
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert attention.choose_implementation(impl, _q(jnp.bfloat16)) == impl
  assert attention.choose_implementation(impl, _q(jnp.float32, 256)) == impl


@pytest.mark.parametrize("impl", ["flash", "XLA", "", "gpu"])
def test_choose_implementation_unknown_names(impl):
  with pytest.raises(ValueError, match="attention implementation must be one of"):
    attention.choose_implementation(impl, _q())
  with pytest.raises(ValueError, match="attention implementation must be one of"):
    attention.fused_attention(_q(), _q(), _q(), implementation=impl)


@pytest.mark.parametrize("dtype,head_dim,want", [
    (jnp.bfloat16, 64, "cudnn"),
    (jnp.float16, 64, "cudnn"),
    (jnp.bfloat16, 128, "cudnn"),
    (jnp.bfloat16, 8, "cudnn"),
    (jnp.float32, 64, "xla"),
    (jnp.bfloat16, 12, "xla"),
    (jnp.bfloat16, 136, "xla"),
    (jnp.bfloat16, 256, "xla"),
])
@pytest.mark.parametrize("impl", [None, "auto"])
def test_choose_implementation_on_gpu(monkeypatch, impl, dtype, head_dim, want):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert attention.choose_implementation(impl, _q(dtype, head_dim)) == want


def test_choose_implementation_tpu_is_xla(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert attention.choose_implementation(None, _q(jnp.bfloat16)) == "xla"


# ============================================================================ 5. ToMe one-hot merge

def _clustered_metric(rng, b, t, c=8, clusters=3):
  """Tokens near a few centres: many A tokens pick the same B token (repeated destinations)."""
  centres = rng.standard_normal((clusters, c))
  return (centres[rng.integers(0, clusters, (b, t))] + 0.05 * rng.standard_normal((b, t, c))
          ).astype(np.float32)


MERGE_SHAPES = ((5,), (2, 4))  # per-token trailing shapes of x


def _matchings(metric, r, protected):
  return {"bipartite": tome.bipartite_soft_matching(metric, r, protected),
          "kth": tome.kth_bipartite_soft_matching(metric, 3, protected),
          "random": tome.random_bipartite_soft_matching(metric, r, jax.random.key(5), protected)}


@pytest.mark.parametrize("t,r,protected", [(17, 6, 1), (16, 5, 0), (21, 7, 2), (20, 6, 5)])
def test_onehot_merge_equals_scatter(t, r, protected):
  rng = np.random.default_rng(t * 10 + protected)
  metric = jnp.asarray(_clustered_metric(rng, 3, t))
  xs = [jnp.asarray(rng.standard_normal((3, t) + shape).astype(np.float32))
        for shape in MERGE_SHAPES]

  @jax.jit  # one program per case: eager dispatch of every merge is much slower
  def merges(metric, xs):
    out = {}
    for name, m in _matchings(metric, r, protected).items():
      out[f"{name}/dst"] = m.dst_idx
      for i, x in enumerate(xs):
        for mode in ("sum", "max", "keep"):
          for impl in tome.MERGE_IMPLS:
            out[f"{name}/{i}/{mode}/{impl}"] = tome.merge(m, x, mode, impl)
    return out

  out = merges(metric, xs)
  # The clustered metric does give repeated destinations (several sources into one token).
  assert any(len(set(row)) < len(row) for row in np.asarray(out["bipartite/dst"]))
  for name in ("bipartite", "kth", "random"):
    for i, x in enumerate(xs):
      got, want = out[f"{name}/{i}/sum/onehot"], out[f"{name}/{i}/sum/scatter"]
      assert got.shape == want.shape and got.shape[2:] == x.shape[2:]
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"{name} {x.shape}")
      np.testing.assert_array_equal(got[:, :protected], x[:, :protected])  # protected lead
      # "max" and "keep" are not sums: the one-hot setting leaves them as they were.
      for mode in ("max", "keep"):
        np.testing.assert_array_equal(out[f"{name}/{i}/{mode}/onehot"],
                                      out[f"{name}/{i}/{mode}/scatter"])
      # A sum keeps the total of every token that is not dropped (kth drops a remainder).
      if name != "kth" or (t - protected) % 3 == 0:
        np.testing.assert_allclose(got.sum(1), np.asarray(x).sum(1), rtol=1e-5, atol=1e-5)


def test_onehot_merge_state_equals_scatter():
  rng = np.random.default_rng(0)
  t, p = 17, 1
  metric = jnp.asarray(_clustered_metric(rng, 2, t))
  x = jnp.asarray(rng.standard_normal((2, t, 6)).astype(np.float32))
  size = jnp.asarray(rng.integers(1, 5, (2, t)).astype(np.float32))

  @jax.jit
  def both(metric, x, size):
    state = base.TokenState.create(x, num_prefix=p, grid=(4, 4), track_source=True)
    m = tome.bipartite_soft_matching(metric, 6, p)
    return [tome.merge_state(m, state.replace(size=size), impl) for impl in tome.MERGE_IMPLS]

  a, b = both(metric, x, size)
  np.testing.assert_allclose(b.x, a.x, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(b.size, a.size)
  np.testing.assert_array_equal(b.source, a.source)
  np.testing.assert_array_equal(b.ids, a.ids)
  assert b.num_tokens == t - 6
  np.testing.assert_allclose(b.size.sum(1), size.sum(1))
  # The size-weighted mean: sum(size * x) is kept.
  np.testing.assert_allclose((b.x * b.size[..., None]).sum(1), (x * size[..., None]).sum(1),
                             rtol=1e-5, atol=1e-5)


TOME_SPECS = [
    # 64 patches and a class token through 3 blocks
    pytest.param({"r": 4}, 65 - 3 * 4, id="bipartite-r4"),
    pytest.param({"matching": "kth", "k": 2, "layers": [0, 2]}, 1 + 64 // 4, id="kth-k2"),
]


def _random_params(model, images, seed=0, scale=0.2):
  """Random values in every parameter (no init program to compile; the default init has a
  zero head and zero biases)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  leaves, treedef = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [
      jnp.asarray(scale * rng.standard_normal(l.shape), l.dtype) for l in leaves])


@pytest.mark.parametrize("spec,tokens", TOME_SPECS)
def test_tome_vit_onehot_equals_scatter(monkeypatch, spec, tokens):
  # Which sums each model does which way (equal outputs alone would not show the setting
  # reaching the merges).
  real_merge, sums = tome.merge, []

  def recording(m, x, mode="sum", impl="scatter"):
    if mode == "sum":
      sums.append(impl)
    return real_merge(m, x, mode, impl)

  monkeypatch.setattr(tome, "merge", recording)
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  models = {impl: vit.Model(10, variant="Ti/8", depth=3, token_reduction={
      "method": "tome", "trace_source": True, "merge_impl": impl, **spec})
            for impl in tome.MERGE_IMPLS}
  params = _random_params(models["scatter"], images)

  @jax.jit
  def both(params, images):
    out = {}
    for impl, m in models.items():
      del sums[:]
      out[impl] = m.apply({"params": params}, images)
      # Per merging layer: the tokens' and the sizes' sums, all the configured way.
      assert sums == [impl] * 2 * (2 if "layers" in spec else 3), (impl, sums)
    return out

  outs = both(params, images)
  (l0, aux0), (l1, aux1) = outs["scatter"], outs["onehot"]
  assert np.abs(np.asarray(l0)).max() > 1e-2  # non-trivial logits
  np.testing.assert_allclose(l1, l0, rtol=0, atol=1e-5)
  s0, s1 = aux0["state"], aux1["state"]
  assert s0.num_tokens == s1.num_tokens == tokens
  np.testing.assert_array_equal(s1.size, s0.size)
  np.testing.assert_array_equal(s1.source, s0.source)
  assert float(np.asarray(s0.size).max()) > 1  # something merged
  np.testing.assert_allclose(np.asarray(s0.size)[:, 1:].sum(1), 64)


@pytest.mark.parametrize("spec", [{"r": 4}, {"matching": "kth"}, {"matching": "random", "r": 2}])
def test_tome_bad_merge_impl(spec):
  model = vit.Model(10, variant="Ti/8", depth=2, token_reduction={
      "method": "tome", "merge_impl": "bogus", **spec})
  with pytest.raises(ValueError, match=r"merge_impl must be one of \('scatter', 'onehot'\), "
                                       r"got 'bogus'"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


# ============================================================================ 6. device peaks

@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H100 80GB HBM3", 989.4),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H200", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA L4", 121.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v4", 275.0),
    ("cpu", None),
    ("", None),
])
def test_device_peak_tflops(kind, peak):
  assert core.device_peak_tflops(types.SimpleNamespace(device_kind=kind)) == peak


def test_device_peak_tflops_default_device_and_no_kind():
  assert core.device_peak_tflops() is None  # this machine's CPU
  assert core.device_peak_tflops(object()) is None
