"""The training recipe against references that do not share code with vitoken.

Each test pins one piece of the recipe that a plausible bug could break while every other test
still passes: layer-wise lr decay (optax per-group optimizers / a numpy SGD), the padded eval
(a numpy count), the EMA (the recurrence by hand), random-resized-crop (torchvision's
sampler), label smoothing (torch's cross-entropy), eval-only model overrides, pooling over the
prefix tokens, proportional attention (a numpy block) and position-embedding resizing (torch's
`interpolate` for timm, scipy's `zoom` for big_vision).
"""
import math

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.ndimage
import scipy.special
import scipy.stats

from tests.test_train_loop import smoke_config
from tests.test_train_optim import _assert_trees_close
from vitoken.convert import big_vision as bv_convert
from vitoken.convert.torch_reference import import_timm
from vitoken.data import ops, pipeline
from vitoken.engine import checkpoint as ckpt_lib, optim
from vitoken.models import layout, posemb, vit
from vitoken.models.reducers import base as rbase
from vitoken.train import trainer

import_timm()  # declares torchvision's missing C++ op schemas so torchvision imports on CPU
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torchvision import transforms  # noqa: E402

_jit = lambda f: jax.jit(f, compiler_options={"xla_backend_optimization_level": 0,
                                              "xla_llvm_disable_expensive_passes": True})


def _flat(tree):
  return traverse_util.flatten_dict(dict(tree), sep="/")


def _randn_like(tree, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (scale * rng.standard_normal(x.shape)).astype(np.float32), tree)


# ---------------------------------------------------------------------------------------------
# 1. Layer-wise lr decay: after the adaptive scaling, per layer, in both layouts.
# ---------------------------------------------------------------------------------------------

LD, LR, WD, STEPS = 0.5, 0.01, 0.1, 3
# Written out by hand for depth 3 (BEiT/MAE: layer_decay ** (depth + 1 - layer_id), stem = 0,
# block i = i + 1, head = depth + 1), not taken from vitoken.engine.optim.
LAYER_MULT = {
    "embedding": LD ** 4, "cls": LD ** 4, "pos_embedding": LD ** 4,
    "block_00": LD ** 3, "block_01": LD ** 2, "block_02": LD ** 1,
    "encoder_norm": 1.0, "head": 1.0,
}


@pytest.fixture(scope="module")
def vit_tree():
  """(params, [grads per step]) of a depth-3 ViT, random values (the init has zero leaves)."""
  model = vit.Model(7, width=16, depth=3, num_heads=2, mlp_dim=32, patch_size=(4, 4))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
  params = _randn_like(shapes, 0)
  # Per-leaf gradient scales that differ by orders of magnitude: Adam removes them, SGD not.
  leaves, treedef = jax.tree.flatten(shapes)
  scales = jax.tree.unflatten(treedef, [10.0 ** ((i % 3) - 1) for i in range(len(leaves))])
  grads = [jax.tree.map(lambda g, s: (g * s).astype(np.float32), _randn_like(shapes, t + 1), scales)
           for t in range(STEPS)]
  assert set(params) == set(LAYER_MULT), sorted(params)
  return params, grads


def _kernel_mask(tree):
  return jax.tree_util.tree_map_with_path(lambda p, _: p[-1].key == "kernel", tree)


def _apply_steps(tx, params, grads):
  @_jit
  def run(params, grads):
    state = tx.init(params)
    for g in grads:
      updates, state = tx.update(g, state, params)
      params = optax.apply_updates(params, updates)
    return params
  return jax.device_get(run(params, grads))


def _vitoken_tx(name, params, **extra):
  optim_config = {"name": name, "lr": LR, "weight_decay": WD, "layer_decay": LD, **extra}
  tx, _ = optim.make_optimizer(optim_config, {"decay": "constant"}, params, total_steps=100)
  return tx


def _top_labels(tree):
  return {k: jax.tree.map(lambda _, k=k: k, v) for k, v in tree.items()}


@pytest.mark.parametrize("scanned", [False, True], ids=["unscanned", "scanned"])
def test_layer_decay_adamw_equals_optax_adamw_with_per_layer_lr(vit_tree, scanned):
  params, grads = vit_tree
  # Reference: one optax.adamw per layer group, each at lr * its multiplier.
  reference = optax.multi_transform(
      {name: optax.adamw(LR * m, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WD, mask=_kernel_mask)
       for name, m in LAYER_MULT.items()}, _top_labels(params))
  want = _apply_steps(reference, params, grads)
  if scanned:
    got = layout.to_unscanned(_apply_steps(
        _vitoken_tx("adamw", layout.to_scanned(params)), layout.to_scanned(params),
        [layout.to_scanned(g) for g in grads]))
  else:
    got = _apply_steps(_vitoken_tx("adamw", params), params, grads)
  _assert_trees_close(got, want)
  # The multipliers matter: the (undecayed) stem moved LD ** 4 as far as under plain AdamW,
  # which is what an lr decay applied before Adam's normalisation would amount to.
  plain = _apply_steps(optax.adamw(LR, weight_decay=WD, mask=_kernel_mask), params, grads)
  moved = lambda tree: np.asarray(tree["pos_embedding"]) - np.asarray(params["pos_embedding"])
  np.testing.assert_allclose(moved(got), moved(plain) * LAYER_MULT["pos_embedding"], rtol=1e-3,
                             atol=3e-7)


@pytest.mark.parametrize("scanned", [False, True], ids=["unscanned", "scanned"])
def test_layer_decay_sgd_momentum_equals_numpy_sgdw(vit_tree, scanned):
  params, grads = vit_tree
  momentum = 0.9
  # Reference: SGD with momentum and decoupled weight decay, written out in numpy:
  #   buf = momentum * buf + g;  p -= lr * mult * (buf + wd * p)   (wd on kernels only).
  want = {}
  for path, p in _flat(params).items():
    p = np.asarray(p, np.float64)
    buf = np.zeros_like(p)
    mult = LAYER_MULT[path.split("/")[0]]
    wd = WD if path.endswith("/kernel") else 0.0
    for g in grads:
      buf = momentum * buf + np.asarray(_flat(g)[path], np.float64)
      p = p - LR * mult * (buf + wd * p)
    want[path] = p
  want = traverse_util.unflatten_dict(want, sep="/")
  if scanned:
    got = layout.to_unscanned(_apply_steps(
        _vitoken_tx("sgd", layout.to_scanned(params), momentum=momentum),
        layout.to_scanned(params), [layout.to_scanned(g) for g in grads]))
  else:
    got = _apply_steps(_vitoken_tx("sgd", params, momentum=momentum), params, grads)
  _assert_trees_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 2, 3, 6. Trainer runs: the padded eval, the EMA, eval-only model overrides.
# ---------------------------------------------------------------------------------------------

EVAL_EXAMPLES = 250  # batch 32: the last eval batch holds 26 examples and 6 padding rows
EMA_DECAY = 0.75  # not 0.5: d * e + (1 - d) * p is symmetric in (e, p) at 0.5
RUN_STEPS = 4
# A random (not zero) head and a larger lr: four steps then leave logits far enough from
# uniform that the evals compared below (EMA vs raw, ToMe vs dense) differ clearly.
RUN_OVERRIDES = {"data.eval_examples": EVAL_EXAMPLES, "total_steps": RUN_STEPS,
                 "eval_every_steps": 0, "checkpoint.every_steps": RUN_STEPS,
                 "model.head_zeroinit": False, "optim.lr": 1e-2}


def _run_capturing(workdir, config):
  """Runs `config`; returns (summary, [host copies of the state before step 1 and after each
  step]). The step donates its state, so the copy before a step is taken before the call."""
  states = []
  original_init = trainer.Trainer.__init__

  def init(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    step_fn = self.train_step

    def step(state, *args):
      if not states:
        states.append(jax.device_get(state))
      new, metrics = step_fn(state, *args)
      states.append(jax.device_get(new))
      return new, metrics
    self.train_step = step

  with pytest.MonkeyPatch.context() as m:
    m.setattr(trainer.Trainer, "__init__", init)
    summary = trainer.run(config, str(workdir))
  return summary, states


def _eval_data(config):
  """The eval split as the pipeline serves it, padded, and its real rows."""
  batches = list(pipeline.eval_iterator(config.data, global_batch_size=config.batch_size))
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["labels"] for b in batches]).argmax(-1)  # one-hot -> int
  mask = np.concatenate([b["mask"] for b in batches])
  assert len(mask) == 256 and mask.sum() == EVAL_EXAMPLES and mask[:EVAL_EXAMPLES].all()
  return images[mask], labels[mask]


def _model(config, **overrides):
  """The run's ViT built here from its config section (not through vitoken.tasks)."""
  info = pipeline.dataset_info(config.data)
  kw = {**dict(config.model), **overrides}
  return vit.Model(info.num_classes, channels=info.image_shape[-1], **kw)


def _hand_eval(model, params, images, labels):
  """{"accuracy", "loss", "examples"} counted in numpy from the model's logits."""
  logits = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x)[0])(params, images),
                      np.float64)
  logp = scipy.special.log_softmax(logits, axis=-1)
  loss = -logp[np.arange(len(labels)), labels]
  correct = logits.argmax(-1) == labels
  return {"accuracy": correct.mean(), "loss": loss.mean(), "examples": len(labels)}


def _assert_eval_equal(got, want):
  assert got["examples"] == want["examples"]
  assert round(got["accuracy"] * want["examples"]) == round(want["accuracy"] * want["examples"])
  np.testing.assert_allclose(got["accuracy"], want["accuracy"], rtol=0, atol=1e-6)
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=2e-6)  # seen: < 1e-7


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ema_run")
  config = smoke_config(**RUN_OVERRIDES, ema_decay=EMA_DECAY)
  assert config.batch_size == 32
  summary, states = _run_capturing(workdir, config)
  return config, workdir, summary, states


def test_eval_counts_exactly_the_real_examples_of_a_padded_split(ema_run):
  config, workdir, summary, states = ema_run
  params = ckpt_lib.load_params(str(workdir))
  _assert_trees_close(params, states[-1]["params"], rtol=0, atol=0)
  images, labels = _eval_data(config)
  want = _hand_eval(_model(config), params, images, labels)
  assert summary["eval"]["examples"] == EVAL_EXAMPLES
  _assert_eval_equal(summary["eval"], want)


def test_ema_follows_its_recurrence_and_is_what_eval_ema_evaluates(ema_run):
  config, _, summary, states = ema_run
  assert len(states) == RUN_STEPS + 1
  d = EMA_DECAY
  ema = jax.tree.map(lambda p: np.asarray(p, np.float64), states[0]["params"])  # e_0 = init
  for state in states[1:]:
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * np.asarray(p, np.float64), ema,
                       state["params"])
  _assert_trees_close(states[-1]["ema_params"], ema, rtol=1e-5, atol=1e-6)
  # ... and the EMA is not simply the params (it lags them).
  assert not np.allclose(states[-1]["params"]["head"]["kernel"], ema["head"]["kernel"], atol=1e-4)

  images, labels = _eval_data(config)
  model = _model(config)
  want_ema = _hand_eval(model, jax.tree.map(np.float32, ema), images, labels)
  want_raw = _hand_eval(model, states[-1]["params"], images, labels)
  assert abs(want_ema["loss"] - want_raw["loss"]) > 1e-3  # the two evals are distinguishable
  _assert_eval_equal(summary["eval_ema"], want_ema)
  _assert_eval_equal(summary["eval"], want_raw)


# Aggressive merging (64 -> 32 -> 16 tokens): four steps in, most patches are near-identical
# background, which ToMe merges almost losslessly at a small r.
TOME = {"method": "tome", "r": 32}


@pytest.fixture(scope="module")
def tome_eval_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("tome_eval_run")
  config = smoke_config(**RUN_OVERRIDES, eval_model_overrides={"token_reduction": TOME})
  summary = trainer.run(config, str(workdir))
  return config, workdir, summary


def test_eval_model_overrides_evaluate_the_overridden_model(tome_eval_run):
  config, workdir, summary = tome_eval_run
  params = ckpt_lib.load_params(str(workdir))
  images, labels = _eval_data(config)
  want_tome = _hand_eval(_model(config, token_reduction=TOME), params, images, labels)
  dense = _hand_eval(_model(config), params, images, labels)
  assert abs(want_tome["loss"] - dense["loss"]) > 1e-3  # ToMe changes this model's outputs
  _assert_eval_equal(summary["eval"], want_tome)


# ---------------------------------------------------------------------------------------------
# 4. Random-resized-crop: the sampler's distribution is torchvision's.
# ---------------------------------------------------------------------------------------------

DRAWS = 4000


def _box_stats(boxes, height, width):
  boxes = np.asarray(boxes, np.float64)
  top, left, h, w = boxes.T
  return {"log_aspect": np.log(w / h), "area": h * w / (height * width),
          "center_y": (top + h / 2) / height, "center_x": (left + w / 2) / width}


@pytest.mark.parametrize("height,width,scale", [(120, 90, (0.08, 1.0)), (24, 200, (0.3, 1.0))],
                         ids=["portrait", "strip_with_fallbacks"])
def test_random_resized_crop_box_has_torchvisions_distribution(height, width, scale):
  ratio = (3 / 4, 4 / 3)
  rng = np.random.default_rng(0)
  ours = [ops.random_resized_crop_box(height, width, rng, scale, ratio) for _ in range(DRAWS)]
  torch.manual_seed(0)
  image = torch.empty(1, height, width)
  theirs = [transforms.RandomResizedCrop.get_params(image, list(scale), list(ratio))
            for _ in range(DRAWS)]
  a, b = _box_stats(ours, height, width), _box_stats(theirs, height, width)
  for key in a:
    p = scipy.stats.ks_2samp(a[key], b[key]).pvalue
    assert p > 1e-3, (key, p)
  # How often all 10 tries fail (the central-crop fallback), as a binomial proportion.
  central = tuple(ops._central_crop_box(height, width, ratio))  # pylint: disable=protected-access
  fa = np.mean([tuple(x) == central for x in ours])
  fb = np.mean([tuple(x) == central for x in theirs])
  assert abs(fa - fb) < 4 * math.sqrt(max(fb * (1 - fb), 1e-4) * 2 / DRAWS) + 1e-3, (fa, fb)


@pytest.mark.parametrize("height,width,scale,ratio", [
    (10, 1000, (0.9, 1.0), (3 / 4, 4 / 3)),   # too wide: full height, widest allowed width
    (1000, 10, (0.9, 1.0), (3 / 4, 4 / 3)),   # too tall
    (1000, 1100, (1.0, 1.0), (0.5, 2.0)),     # ratio allowed but no sampled crop fits: all
    (50, 60, (1.0, 1.0), (1.3, 1.5)),         # ratio below the range
])
def test_random_resized_crop_fallback_is_torchvisions(height, width, scale, ratio):
  for seed in range(5):
    torch.manual_seed(seed)
    want = transforms.RandomResizedCrop.get_params(torch.empty(1, height, width), list(scale),
                                                   list(ratio))
    got = ops.random_resized_crop_box(height, width, np.random.default_rng(seed), scale, ratio)
    assert tuple(got) == tuple(want)


# ---------------------------------------------------------------------------------------------
# 5. Label smoothing: the train loss is torch's smoothed cross-entropy.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "mixed"])
def test_label_smoothed_train_loss_equals_torch_cross_entropy(tmp_path, soft):
  ls = 0.2
  t = trainer.Trainer(smoke_config(label_smoothing=ls), str(tmp_path))
  try:
    example = t.task.example_batch()
    params = t.task.init_params(jax.random.key(0), example)
    params = dict(params, head=_randn_like(params["head"], 1, scale=0.5))  # zero-init head
    k = t.info.num_classes
    rng = np.random.default_rng(0)
    images = rng.standard_normal((8, *t.info.image_shape)).astype(np.float32)
    labels = rng.integers(0, k, 8)
    targets = np.eye(k, dtype=np.float32)[labels]
    if soft:  # mixup-style targets
      targets = (0.7 * targets + 0.3 * targets[::-1]).astype(np.float32)
    _, metrics = t.task.loss(params, {}, {"image": images, "labels": targets},
                             jax.random.key(1), jnp.int32(0), jnp.float32(0.0))
    logits = np.asarray(t.model.apply({"params": params}, images)[0])
  finally:
    t.checkpointer.close()
  target = torch.from_numpy(targets) if soft else torch.from_numpy(labels)
  want = F.cross_entropy(torch.tensor(logits).double(),
                         target.double() if soft else target, label_smoothing=ls).item()
  unsmoothed = F.cross_entropy(torch.tensor(logits).double(),
                               target.double() if soft else target).item()
  assert abs(want - unsmoothed) > 1e-2
  np.testing.assert_allclose(float(metrics["loss/ce"]), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# 7. gap pooling with pool_include_prefix.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("include", [True, False])
def test_gap_pool_include_prefix_averages_the_right_tokens(include):
  num_prefix = 3  # class token + 2 registers
  model = vit.Model(0, width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=(4, 4),
                    pool_type="gap", class_token=True, num_registers=2,
                    pool_include_prefix=include)
  images = np.random.default_rng(0).standard_normal((2, 8, 12, 3)).astype(np.float32)
  variables = model.init(jax.random.key(0), images)
  variables = {"params": _randn_like(variables["params"], 2, scale=0.3)}
  pooled, aux = model.apply(variables, images)
  encoded = np.asarray(aux["encoded"], np.float64)
  assert encoded.shape[1] == num_prefix + 6
  want = encoded.mean(axis=1) if include else encoded[:, num_prefix:].mean(axis=1)
  other = encoded[:, num_prefix:].mean(axis=1) if include else encoded.mean(axis=1)
  assert np.abs(want - other).max() > 1e-3
  np.testing.assert_allclose(np.asarray(pooled), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 8. Proportional attention with unequal token sizes.
# ---------------------------------------------------------------------------------------------


def _np_layer_norm(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_block(x, size, p, num_heads, proportional):
  """A pre-norm ViT block in numpy; attention softmax(q k^T / sqrt(d) + log(size_k))."""
  f = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)
  p = f(p)
  b, n, c = x.shape
  d = c // num_heads
  h = _np_layer_norm(x, p["norm1"])
  qkv = np.einsum("bnc,cthd->bnthd", h, p["attn"]["qkv"]["kernel"]) + p["attn"]["qkv"]["bias"]
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
  if proportional:
    logits = logits + np.log(size)[:, None, None, :]
  probs = scipy.special.softmax(logits, axis=-1)
  o = np.einsum("bhqk,bkhd->bqhd", probs, v)
  x = x + np.einsum("bqhd,hdc->bqc", o, p["attn"]["out"]["kernel"]) + p["attn"]["out"]["bias"]
  h = _np_layer_norm(x, p["norm2"])
  h = h @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]
  h = 0.5 * h * (1 + scipy.special.erf(h / math.sqrt(2)))  # exact GELU
  h = h @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]
  return x + h, probs


@pytest.mark.parametrize("return_attention", [False, True], ids=["fused", "explicit"])
def test_proportional_attention_with_unequal_sizes(return_attention):
  rng = np.random.default_rng(0)
  b, n, c, heads = 2, 7, 16, 2
  x = rng.standard_normal((b, n, c)).astype(np.float32)
  size = rng.uniform(1.0, 6.0, (b, n)).astype(np.float32)  # merged tokens of unequal mass
  state = rbase.TokenState.create(jnp.asarray(x), num_prefix=1, grid=(2, 3))
  state = state.replace(size=jnp.asarray(size))
  block = vit.EncoderBlock(num_heads=heads, mlp_dim=32, proportional_attention=True,
                           return_attention=return_attention)
  params = block.init(jax.random.key(0), state)["params"]
  params = _randn_like(params, 3, scale=0.5)
  out_state, out = block.apply({"params": params}, state)
  want, want_probs = _np_block(x.astype(np.float64), size.astype(np.float64), params, heads, True)
  plain, _ = _np_block(x.astype(np.float64), size.astype(np.float64), params, heads, False)
  assert np.abs(want - plain).max() > 1e-2  # the sizes matter here
  np.testing.assert_allclose(np.asarray(out_state.x), want, rtol=1e-4, atol=1e-4)
  if return_attention:
    np.testing.assert_allclose(np.asarray(out["attention"]), want_probs, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 10. Position-embedding resizing: timm's interpolate; big_vision's scipy zoom.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("old,new", [((4, 6), (6, 9)), ((4, 6), (3, 4)), ((5, 5), (7, 3))])
def test_resize_posemb_is_torch_antialiased_interpolate(method, old, new):
  """The timm path: timm's resample_abs_pos_embed is F.interpolate(antialias=True)."""
  rng = np.random.default_rng(0)
  prefix = 2
  table = rng.standard_normal((1, prefix + old[0] * old[1], 5)).astype(np.float32)
  got = np.asarray(posemb.resize_posemb(table, old, new, num_prefix=prefix, method=method))
  grid = torch.from_numpy(table[0, prefix:].reshape(old + (5,))).permute(2, 0, 1)[None]
  want = F.interpolate(grid, size=new, mode=method, antialias=True, align_corners=False)
  want = want[0].permute(1, 2, 0).reshape(1, new[0] * new[1], 5).numpy()
  np.testing.assert_array_equal(got[:, :prefix], table[:, :prefix])
  np.testing.assert_allclose(got[:, prefix:], want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("image_size", [24, (24, 32)], ids=["square", "non_square"])
def test_from_big_vision_resizes_posemb_as_big_vision(image_size):
  model = vit.Model(5, width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=(4, 4),
                    pool_type="gap", class_token=False, gelu_approximate=True)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  params = _randn_like(params, 4)
  flat = bv_convert.to_big_vision(model, params)
  _, converted = bv_convert.from_big_vision(flat, num_heads=2, image_size=image_size)
  new = (24 // 4, 24 // 4) if image_size == 24 else (24 // 4, 32 // 4)
  old_grid = np.asarray(params["pos_embedding"])[0].reshape(4, 4, -1)
  want = scipy.ndimage.zoom(old_grid, (new[0] / 4, new[1] / 4, 1), order=1)
  np.testing.assert_allclose(np.asarray(converted["pos_embedding"])[0],
                             want.reshape(new[0] * new[1], -1), rtol=1e-5, atol=1e-5)
