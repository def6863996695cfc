"""Tests of vitoken.engine.optim: schedules, optimizers vs optax references, weight-decay mask,
gradient clipping and layer-wise lr decay (unscanned and scanned layouts)."""
import functools
import math

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vitoken.engine import optim
from vitoken.models import layout, vit

DEPTH = 3
# Cheap XLA:CPU codegen: these programs are many tiny per-leaf ops that run once, so compile
# time (not run time) is what this file spends; numerics do not depend on these flags.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                    "xla_llvm_disable_expensive_passes": True})


def _flat(tree):
  return traverse_util.flatten_dict(dict(tree), sep="/")


def _params(scan=False, seed=0, **kw):
  """Random values in the tree of a small ViT (shapes only from the model: no slow init)."""
  model = vit.Model(10, variant="Ti/8", depth=DEPTH, scan=scan, **kw)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  return _randn(shapes, seed)


def _randn(tree, seed):
  # numpy, not jax.random: eager jax would compile a kernel per leaf shape.
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree)


@pytest.fixture(scope="module")
def params():
  """A small ViT with every kind of parameter the mask and layer decay must place."""
  # Random values, not the init: many leaves start at zero (biases, cls, head), and "left
  # untouched by weight decay" would then prove nothing.
  return _params(pool_type="map", class_token=True, num_registers=2, layer_scale_init=0.1,
                 pre_norm=True, fc_norm=True, rep_size=16, seed=2)


@pytest.fixture(scope="module")
def grads(params):
  return _randn(params, 1)


@pytest.fixture(scope="module")
def small():
  """(params, grads) of a plain ViT: fewer leaves, so the numeric comparisons compile faster."""
  params = _params(seed=3)
  return params, _randn(params, 4)


def _run(tx, params, grads_seq):
  """Applies `tx` for each gradient tree in turn; returns the final params."""

  # One jit with a scan over the steps: compiles the update once, not per op and leaf shape
  # (eager) nor per step (unrolled), which keeps the cold-cache run of this file fast.
  @_jit
  def run(params, stacked):
    def step(carry, g):
      params, state = carry
      updates, state = tx.update(g, state, params)
      return (optax.apply_updates(params, updates), state), None

    return jax.lax.scan(step, (params, tx.init(params)), stacked)[0][0]

  return run(params, jax.tree.map(lambda *gs: jnp.stack(gs), *grads_seq))


def _assert_trees_close(a, b, atol=1e-6, rtol=1e-5):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_allclose(np.asarray(fa[k]), np.asarray(fb[k]), atol=atol, rtol=rtol,
                               err_msg=k)


def _kernel_mask(params):
  return jax.tree_util.tree_map_with_path(
      lambda p, _: layout.path_str(p).endswith("kernel"), params)


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


def _np_schedule(step, base, total, warmup, decay, end_factor, init_factor):
  if step < warmup:
    return base * (init_factor + (1 - init_factor) * step / warmup)
  frac = min((step - warmup) / (total - warmup), 1.0)
  end = base * end_factor
  if decay == "cosine":
    return end + (base - end) * 0.5 * (1 + math.cos(math.pi * frac))
  if decay == "linear":
    return base + (end - base) * frac
  return base


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup,end_factor,init_factor", [(0, 0.0, 0.0), (10, 0.0, 0.0),
                                                           (10, 0.1, 0.05), (0, 0.2, 0.0)])
def test_schedule_values(decay, warmup, end_factor, init_factor):
  total, base = 100, 3e-3
  cfg = ml_collections.ConfigDict(dict(warmup_steps=warmup, decay=decay, end_factor=end_factor,
                                       warmup_init_factor=init_factor))
  sched = optim.make_schedule(cfg, base, total)
  for step in [0, 1, 5, 9, 10, 11, 37, 55, 99, 100, 150]:
    want = _np_schedule(step, base, total, warmup, decay, end_factor, init_factor)
    np.testing.assert_allclose(float(sched(step)), want, rtol=1e-5, atol=1e-9, err_msg=str(step))
  # Also traced (the optimizer calls it on its int32 step count inside jit).
  np.testing.assert_allclose(float(jax.jit(sched)(jnp.int32(37))),
                             _np_schedule(37, base, total, warmup, decay, end_factor,
                                          init_factor), rtol=1e-5)


def test_schedule_landmarks():
  sched = optim.make_schedule(dict(warmup_steps=10, decay="cosine", end_factor=0.1,
                                   warmup_init_factor=0.5), 1.0, 110)
  np.testing.assert_allclose(float(sched(0)), 0.5)
  np.testing.assert_allclose(float(sched(5)), 0.75)
  np.testing.assert_allclose(float(sched(10)), 1.0)
  np.testing.assert_allclose(float(sched(60)), 0.55, rtol=1e-6)  # halfway: mean of 1 and 0.1
  np.testing.assert_allclose(float(sched(110)), 0.1, rtol=1e-6)


def test_schedule_defaults_and_plain_dict():
  sched = optim.make_schedule(None, 2.0, 10)
  np.testing.assert_allclose(float(sched(0)), 2.0)  # no warmup by default
  np.testing.assert_allclose(float(sched(10)), 0.0, atol=1e-7)  # cosine to 0
  assert optim.make_schedule({"decay": "constant"}, 2.0, 10)(7) == 2.0


def test_schedule_errors():
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.make_schedule(dict(warmup_steps=11), 1.0, 10)
  optim.make_schedule(dict(warmup_steps=10), 1.0, 10)  # == total is allowed
  with pytest.raises(ValueError, match="'decay'.*'step'"):
    optim.make_schedule(dict(decay="step"), 1.0, 10)
  with pytest.raises(ValueError, match="warmup_step'.*allowed keys"):
    optim.make_schedule(dict(warmup_step=5), 1.0, 10)
  with pytest.raises(ValueError, match="end_factor"):
    optim.make_schedule(dict(end_factor=-0.1), 1.0, 10)
  with pytest.raises(ValueError, match="total_steps"):
    optim.make_schedule(None, 1.0, 0)


def _np_schedule_every_step(steps, base, total, warmup, decay, end_factor, init_factor):
  """The schedule's definition in float64 numpy, for an array of steps.

  Linear warmup base * init_factor -> base over [0, warmup), then `decay` from base to
  base * end_factor over the remaining total - warmup steps, holding the end value after. With
  warmup == total the decay has no steps: base at step `total`, the end value after it.
  """
  steps = np.asarray(steps, np.float64)
  end = base * end_factor
  span = total - warmup
  frac = np.clip((steps - warmup) / span, 0.0, 1.0) if span else (steps > total).astype(float)
  if decay == "cosine":
    lr = end + (base - end) * 0.5 * (1 + np.cos(np.pi * frac))
  elif decay == "linear":
    lr = base + (end - base) * frac
  else:
    lr = np.full_like(steps, base)
  if warmup:
    lr = np.where(steps < warmup, base * (init_factor + (1 - init_factor) * steps / warmup), lr)
  return lr


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("total,warmup,end_factor,init_factor", [
    (50, 0, 0.0, 0.0), (50, 7, 0.1, 0.25), (50, 50, 0.1, 0.25), (1, 1, 0.5, 0.0), (1, 0, 0.5, 0.0),
    (9, 3, 2.0, 1.5)], ids=["no_warmup", "warmup", "warmup_eq_total", "one_step_warmup",
                            "one_step", "rising"])
def test_schedule_matches_numpy_at_every_step(decay, total, warmup, end_factor, init_factor):
  base = 3e-3
  sched = optim.make_schedule(dict(warmup_steps=warmup, decay=decay, end_factor=end_factor,
                                   warmup_init_factor=init_factor), base, total)
  steps = np.arange(total + 6)
  want = _np_schedule_every_step(steps, base, total, warmup, decay, end_factor, init_factor)
  eager = np.array([float(sched(int(s))) for s in steps])
  traced = np.asarray(_jit(jax.vmap(sched))(jnp.asarray(steps, jnp.int32)))
  assert traced.dtype == np.float32
  for got in (eager, traced):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7 * base)
  # The landmarks exactly as documented.
  np.testing.assert_allclose(eager[warmup], base, rtol=1e-6)
  if warmup:
    np.testing.assert_allclose(eager[0], base * init_factor, rtol=1e-6, atol=1e-12)
  if warmup < total:
    end = base if decay == "constant" else base * end_factor
    np.testing.assert_allclose(eager[total:], end, rtol=1e-6, atol=1e-7 * base)


def test_path_str_names():
  """'/'-joined key paths for every key kind jax makes (dict, sequence, attribute, index)."""
  import collections  # pylint: disable=import-outside-toplevel

  import flax  # pylint: disable=import-outside-toplevel
  from flax.core import FrozenDict  # pylint: disable=import-outside-toplevel

  @flax.struct.dataclass
  class State:
    x: jax.Array
    meta: int = flax.struct.field(pytree_node=False, default=0)

  point = collections.namedtuple("point", "u v")
  tree = {"block_00": FrozenDict({"attn": {"qkv": {"kernel": 1}}}), "list": [2, (3, 4)],
          "nt": point(5, 6), "state": State(x=7), "ints": {3: 8}}
  names = [layout.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  assert names == ["block_00/attn/qkv/kernel", "ints/3", "list/0", "list/1/0", "list/1/1",
                   "nt/u", "nt/v", "state/x"]
  assert layout.path_str(()) == ""
  path = jax.tree_util.tree_flatten_with_path(tree)[0][0][0]
  assert [layout.key_name(e) for e in path] == ["block_00", "attn", "qkv", "kernel"]
  # Index keys of pytrees registered without key names.
  assert layout.key_name(jax.tree_util.FlattenedIndexKey(2)) == "2"


# ---------------------------------------------------------------------------------------------
# Optimizers vs optax references
# ---------------------------------------------------------------------------------------------

SCHED = dict(warmup_steps=1, decay="cosine", end_factor=0.1, warmup_init_factor=0.5)


def _two_grads(grads):
  return [grads, jax.tree.map(lambda g: jnp.asarray(-0.5 * np.asarray(g) + 0.1), grads)]


def test_adamw_matches_optax(small):
  params, grads = small
  cfg = dict(name="adamw", lr=1e-2, b1=0.8, b2=0.99, eps=1e-7, weight_decay=0.05)
  tx, sched = optim.make_optimizer(cfg, SCHED, params, total_steps=10)
  ref = optax.adamw(sched, b1=0.8, b2=0.99, eps=1e-7, weight_decay=0.05,
                    mask=_kernel_mask(params))
  _assert_trees_close(_run(tx, params, _two_grads(grads)), _run(ref, params, _two_grads(grads)))


def test_lamb_matches_optax(small):
  params, grads = small
  cfg = dict(name="lamb", lr=1e-2, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.05)
  tx, sched = optim.make_optimizer(cfg, SCHED, params, total_steps=10)
  ref = optax.lamb(sched, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.05,
                   mask=_kernel_mask(params))
  _assert_trees_close(_run(tx, params, _two_grads(grads)), _run(ref, params, _two_grads(grads)))


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_optax_plus_decoupled_decay(small, nesterov):
  params, grads = small
  wd = 0.05
  cfg = dict(name="sgd", lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=wd)
  tx, sched = optim.make_optimizer(cfg, SCHED, params, total_steps=10)
  # Reference: plain optax.sgd, then the decoupled decay -lr(step) * wd * param by hand.
  ref = optax.sgd(sched, momentum=0.9, nesterov=nesterov)
  mask = _kernel_mask(params)

  @_jit
  def run_ref(p_ref, grads_seq):
    state = ref.init(p_ref)
    for step, g in enumerate(grads_seq):
      updates, state = ref.update(g, state, p_ref)
      lr = sched(step)  # the lr of this update (optax counts steps from 0)
      updates = jax.tree.map(lambda u, p, m: u - lr * wd * p * m, updates, p_ref, mask)
      p_ref = optax.apply_updates(p_ref, updates)
    return p_ref

  _assert_trees_close(_run(tx, params, _two_grads(grads)), run_ref(params, _two_grads(grads)))


def test_sgd_without_momentum(small):
  params, grads = small
  tx, sched = optim.make_optimizer(dict(name="sgd", lr=0.1, momentum=None), None, params, 10)
  _assert_trees_close(_run(tx, params, [grads]), _run(optax.sgd(sched), params, [grads]))


def test_default_config_is_adamw(small):
  params, grads = small
  tx, sched = optim.make_optimizer(optim.default_optim_config(),
                                   optim.default_schedule_config(), params, 10)
  ref = optax.adamw(sched, weight_decay=0.0)
  _assert_trees_close(_run(tx, params, [grads]), _run(ref, params, [grads]))


# ---------------------------------------------------------------------------------------------
# Weight-decay mask
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adamw", "sgd", "lamb"])
def test_weight_decay_only_on_kernels(params, name):
  lr, wd = 0.1, 0.5
  tx, _ = optim.make_optimizer(dict(name=name, lr=lr, weight_decay=wd),
                               dict(decay="constant"), params, 10)
  new = _run(tx, params, [jax.tree.map(jnp.zeros_like, params)])
  old_f, new_f = _flat(params), _flat(new)
  # The fixture holds every kind of leaf that must be left alone.
  for must in ["cls", "registers", "pos_embedding", "norm_pre/scale", "block_00/ls1/gamma",
               "block_02/ls2/gamma", "block_01/norm1/scale", "block_01/attn/qkv/bias",
               "fc_norm/scale", "map_head/probe", "pre_logits/bias", "head/bias"]:
    assert must in old_f, must
  for k in old_f:
    if k.endswith("kernel"):
      # lamb's trust ratio rescales the update to the param's norm: one step of -lr * param.
      factor = 1 - lr if name == "lamb" else 1 - lr * wd
      np.testing.assert_allclose(new_f[k], old_f[k] * factor, rtol=1e-6, atol=1e-8, err_msg=k)
    else:
      np.testing.assert_array_equal(new_f[k], old_f[k], err_msg=k)


def test_weight_decay_mask_paths(params):
  flat = _flat(optim.weight_decay_mask(params))
  assert flat["block_00/attn/qkv/kernel"] and flat["embedding/kernel"]
  assert flat["map_head/kv/kernel"] and flat["head/kernel"]
  assert not flat["block_00/attn/qkv/bias"] and not flat["map_head/probe"]
  assert not flat["pos_embedding"] and not flat["block_00/ls1/gamma"]
  assert all(jax.tree.leaves(optim.weight_decay_mask(params, None)))
  with pytest.raises(ValueError, match="decay_regex.*matches no parameter"):
    optim.make_optimizer(dict(weight_decay=0.1, decay_regex="nothing$"), None, params, 10)
  with pytest.raises(ValueError, match="decay_regex"):
    optim.make_optimizer(dict(decay_regex="(kernel"), None, params, 10)


# ---------------------------------------------------------------------------------------------
# Gradient clipping
# ---------------------------------------------------------------------------------------------


def test_clip_grad_norm(small):
  # sgd: adaptive optimizers are nearly invariant to the gradient scale, so clipping hardly shows.
  params, grads = small
  def np_norm(tree):
    return math.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree.leaves(tree)))

  huge = jax.tree.map(lambda g: 1e4 * np.asarray(g), grads)
  norm = np_norm(huge)
  pre_clipped = jax.tree.map(lambda g: g * (2.0 / norm), huge)
  np.testing.assert_allclose(np_norm(pre_clipped), 2.0, rtol=1e-6)
  small_grads = jax.tree.map(lambda g: g * (1.0 / norm), huge)  # under the limit
  huge, pre_clipped, small_grads = jax.tree.map(jnp.asarray, (huge, pre_clipped, small_grads))
  base = dict(name="sgd", lr=0.1, weight_decay=0.01)
  clipped, _ = optim.make_optimizer({**base, "clip_grad_norm": 2.0}, None, params, 10)
  plain, _ = optim.make_optimizer(base, None, params, 10)
  _assert_trees_close(_run(clipped, params, [huge]), _run(plain, params, [pre_clipped]))
  # Gradients already under the limit pass through untouched.
  _assert_trees_close(_run(clipped, params, [small_grads]), _run(plain, params, [small_grads]))


# ---------------------------------------------------------------------------------------------
# Layer-wise lr decay
# ---------------------------------------------------------------------------------------------


def test_layer_decay_multipliers_unscanned(params):
  ld = 0.5
  m = _flat(optim.layer_decay_multipliers(params, ld))
  assert m["embedding/kernel"] == ld ** 4 and m["cls"] == ld ** 4
  assert m["registers"] == ld ** 4 and m["pos_embedding"] == ld ** 4
  assert m["norm_pre/scale"] == ld ** 4
  assert m["block_00/attn/qkv/kernel"] == ld ** 3 and m["block_00/ls1/gamma"] == ld ** 3
  assert m["block_01/mlp/fc1/bias"] == ld ** 2
  assert m["block_02/mlp/fc2/kernel"] == ld ** 1
  for k in ["head/kernel", "head/bias", "fc_norm/scale", "map_head/probe", "pre_logits/kernel"]:
    assert m[k] == 1.0, k
  # An explicit depth that matches is accepted, a different one is not.
  optim.layer_decay_multipliers(params, ld, depth=DEPTH)
  with pytest.raises(ValueError, match="depth=5"):
    optim.layer_decay_multipliers(params, ld, depth=5)


def test_layer_decay_multipliers_scanned(params):
  m = _flat(optim.layer_decay_multipliers(layout.to_scanned(params), 0.5))
  qkv = m["blocks/attn/qkv/kernel"]
  assert qkv.shape == (DEPTH, 1, 1, 1, 1)
  np.testing.assert_allclose(qkv.ravel(), [0.125, 0.25, 0.5])
  assert m["blocks/ls1/gamma"].shape == (DEPTH, 1)
  assert m["embedding/kernel"] == 0.0625 and m["head/kernel"] == 1.0


def test_layer_decay_scales_updates(small):
  params, grads = small
  # sgd without momentum/decay: the step of each leaf is exactly -lr * multiplier * grad.
  cfg = dict(name="sgd", lr=0.1, momentum=None, layer_decay=0.5)
  tx, _ = optim.make_optimizer(cfg, dict(decay="constant"), params, 10)
  new, m = _flat(_run(tx, params, [grads])), _flat(optim.layer_decay_multipliers(params, 0.5))
  old, g = _flat(params), _flat(grads)
  for k in old:
    np.testing.assert_allclose(new[k], old[k] - 0.1 * m[k] * g[k], rtol=1e-5, atol=1e-7,
                               err_msg=k)


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_scanned_equals_unscanned(small, name):
  params, grads = small
  cfg = dict(name=name, lr=1e-2, weight_decay=0.05, layer_decay=0.65)
  steps = _two_grads(grads)
  tx_u, _ = optim.make_optimizer(cfg, SCHED, params, total_steps=10)
  new_u = _run(tx_u, params, steps)
  p_s = layout.to_scanned(params)
  tx_s, _ = optim.make_optimizer(cfg, SCHED, p_s, total_steps=10)
  new_s = _run(tx_s, p_s, [layout.to_scanned(g) for g in steps])
  _assert_trees_close(new_s, layout.to_scanned(new_u))
  # The stem's multiplier (0.65 ** 4) is small, but it must still train.
  assert not np.allclose(_flat(new_u)["embedding/kernel"], _flat(params)["embedding/kernel"])


def test_scanned_model_tree():
  """The tree `scan=True` builds (not just to_scanned) is accepted and placed the same way."""
  p_s = _params(scan=True)
  m = _flat(optim.layer_decay_multipliers(p_s, 0.5))
  assert m["blocks/mlp/fc1/kernel"].shape == (DEPTH, 1, 1)
  tx, _ = optim.make_optimizer(dict(name="lamb", layer_decay=0.5, weight_decay=0.1), None,
                               p_s, 10)
  new = _run(tx, p_s, [jax.tree.map(jnp.ones_like, p_s)])
  assert not np.allclose(_flat(new)["blocks/mlp/fc1/kernel"], _flat(p_s)["blocks/mlp/fc1/kernel"])


# ---------------------------------------------------------------------------------------------
# Config errors
# ---------------------------------------------------------------------------------------------


def test_config_errors(params):
  with pytest.raises(ValueError, match="'name'.*'adam'"):
    optim.make_optimizer(dict(name="adam"), None, params, 10)
  with pytest.raises(ValueError, match=r"weight_decy.*allowed keys.*weight_decay"):
    optim.make_optimizer(dict(weight_decy=0.1), None, params, 10)
  cfg = optim.default_optim_config()
  cfg.unlisted = 1
  with pytest.raises(ValueError, match="unlisted"):
    optim.make_optimizer(cfg, None, params, 10)
  for bad in [0.0, 1.5, -0.1, True]:
    with pytest.raises(ValueError, match="layer_decay"):
      optim.make_optimizer(dict(layer_decay=bad), None, params, 10)
  with pytest.raises(ValueError, match="clip_grad_norm"):
    optim.make_optimizer(dict(clip_grad_norm=0.0), None, params, 10)
  with pytest.raises(ValueError, match="'b2'"):
    optim.make_optimizer(dict(b2=1.0), None, params, 10)
  with pytest.raises(ValueError, match="'lr'"):
    optim.make_optimizer(dict(lr=-1.0), None, params, 10)
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.make_optimizer(None, dict(warmup_steps=20), params, 10)
  # Layer decay must know every top-level name and the depth.
  with pytest.raises(ValueError, match="'mystery'"):
    optim.make_optimizer(dict(layer_decay=0.5), None, {**params, "mystery": jnp.zeros(3)}, 10)
  with pytest.raises(ValueError, match="depth"):
    optim.make_optimizer(dict(layer_decay=0.5), None, {"head": {"kernel": jnp.zeros((2, 2))}}, 10)


def test_default_configs():
  o, s = optim.default_optim_config(), optim.default_schedule_config()
  assert o.to_dict() == dict(name="adamw", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, momentum=0.9,
                             nesterov=False, weight_decay=0.0, decay_regex=r"(^|/)kernel$",
                             clip_grad_norm=None, layer_decay=None, trainable_regex=None,
                             lr_scale=())
  assert s.to_dict() == dict(warmup_steps=0, decay="cosine", end_factor=0.0,
                             warmup_init_factor=0.0)
  o.clip_grad_norm, o.layer_decay = 1.0, 0.75  # placeholders take floats
  assert (o.clip_grad_norm, o.layer_decay) == (1.0, 0.75)
