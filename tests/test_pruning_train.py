"""Training with token pruning: every method learns, EViT's schedule compiles one step per
phase in the trainer, DynamicViT's recipe pieces (lr_scale rules, a named missing teacher, no
gradient through the distillation weights)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import token_pruning
from vitoken.engine import optim
from vitoken.models import vit
from vitoken.models.reducers import base as rbase
from vitoken.tasks import distillation
from vitoken.train import trainer

METHODS = {
    "topk": {"method": "topk", "keep_rate": 0.5, "layers": [1, 2]},
    "evit": {"method": "evit", "keep_rate": 0.6, "layers": [1, 2]},
    "dynamicvit": {"method": "dynamicvit", "keep_rate": 0.7, "layers": [1, 2]},
    "evit_then_tome": [{"method": "evit", "keep_rate": 0.7, "layers": [1]},
                       {"method": "tome", "r": [0, 0, 3, 3]}],
}


def _toy_data(n=64, seed=0):
  """Images whose class is where a bright square sits (top or bottom half): attention must
  find it, and pruning must keep it."""
  rng = np.random.default_rng(seed)
  images = rng.normal(0, 0.1, (n, 16, 16, 1)).astype(np.float32)
  labels = rng.integers(0, 2, n)
  for i, y in enumerate(labels):
    r, c = (rng.integers(0, 6) + 8 * y, rng.integers(0, 14))
    images[i, r:r + 2, c:c + 2] += 1.0
  return jnp.asarray(images), jnp.asarray(labels)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_learns(name):
  model = vit.Model(2, patch_size=(4, 4), width=32, depth=4, num_heads=2, mlp_dim=64, channels=1,
                    token_reduction=METHODS[name])
  images, labels = _toy_data()
  params = model.init(jax.random.key(0), images[:2])["params"]
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  def loss_fn(p, key):
    logits, aux = model.apply({"params": p}, images, train=True,
                              rngs={"dropout": key, "reduction": key})
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return ce + sum(aux["losses"].values()), ce

  @jax.jit
  def step(p, o, key):
    (_, ce), g = jax.value_and_grad(loss_fn, has_aux=True)(p, key)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, ce

  first = None
  for i in range(60):
    params, opt, ce = step(params, opt, jax.random.key(i))
    first = float(ce) if first is None else first
  logits, _ = model.apply({"params": params}, images)  # inference: pruned by gathers
  acc = float((logits.argmax(-1) == labels).mean())
  assert float(ce) < 0.6 * first and acc > 0.8, (name, first, float(ce), acc)


def test_evit_shrink_schedule_compiles_one_train_step_per_phase(tmp_path):
  c = token_pruning.get_config("method=evit,keep=0.5,shrink=0.25/0.75,levels=1,runlocal")
  c.model.update(width=16, depth=2, mlp_dim=32)  # small: three compiles
  c.model.token_reduction.layers = [1]
  c.total_steps = 4
  c.eval_every_steps = c.checkpoint.every_steps = 4
  c.progress_bar = False
  t = trainer.Trainer(c, str(tmp_path / "run"))
  assert t.phase_starts == (0.25, 0.75)
  assert [t.phase(s) for s in range(4)] == [0.0, 0.25, 0.25, 0.75]
  t.run()
  # Keep everything, then the mid-phase cosine value, then ρ: three static programs.
  assert t.train_step._cache_size() == 3


def test_phase_sets_the_token_counts_of_the_traced_program():
  spec = {"method": "evit", "keep_rate": 0.5, "layers": [1], "shrink": (0.2, 0.6),
          "shrink_levels": 2, "fuse_token": False}
  model = vit.Model(2, patch_size=(4, 4), width=32, depth=2, num_heads=2, channels=1,
                    token_reduction=spec)
  images = jnp.zeros((1, 16, 16, 1))
  params = model.init(jax.random.key(0), images)["params"]

  def tokens(phase, train=True):
    _, aux = jax.eval_shape(lambda p: model.apply({"params": p}, images, train=train, phase=phase,
                                                  rngs={"dropout": jax.random.key(0)}), params)
    return aux["blocks"]["block_01"].shape[1] - 1
  # Phase midpoints 0.3 and 0.5: rates 0.5 + 0.5 (cos(pi/4) + 1) / 2 and 0.5 + 0.5 (cos(3pi/4) + 1) / 2.
  mid = [0.5 + 0.5 * (np.cos(np.pi * f) + 1) / 2 for f in (0.25, 0.75)]
  assert tokens(0.0) == 16
  assert tokens(0.2) == int(np.ceil(mid[0] * 16)) and tokens(0.4) == int(np.ceil(mid[1] * 16))
  assert tokens(0.6) == 8 and tokens(None) == 8 and tokens(0.0, train=False) == 8


def test_lr_scale_multiplies_the_matching_params_lr():
  params = {"block_02": {"dynamicvit": {"w": jnp.ones(3)}, "mlp": {"w": jnp.ones(2)}},
            "head": {"b": jnp.ones(1)}}
  c = optim.default_optim_config()
  c.name, c.momentum, c.lr = "sgd", None, 0.5
  c.lr_scale = ((r"(^|/)dynamicvit/", 1.0), (r"^head/", 0.1), (".*", 0.01))
  s = optim.default_schedule_config()
  s.warmup_steps, s.decay = 0, "constant"
  tx, _ = optim.make_optimizer(c, s, params, 10)
  u, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  np.testing.assert_allclose(u["block_02"]["dynamicvit"]["w"], -0.5)
  np.testing.assert_allclose(u["block_02"]["mlp"]["w"], -0.005)
  np.testing.assert_allclose(u["head"]["b"], -0.05)
  c.lr_scale = (("^nothing/", 2.0),)
  with pytest.raises(ValueError, match="matches no parameter"):
    optim.make_optimizer(c, s, params, 10)
  c.lr_scale = (("head", -1.0),)
  with pytest.raises(ValueError, match="must be >= 0"):
    optim.make_optimizer(c, s, params, 10)


def test_dynamicvit_distillation_without_a_teacher_names_the_fix(tmp_path):
  c = token_pruning.get_config("method=dynamicvit,runlocal")
  with pytest.raises(ValueError, match="needs a dense teacher.*teacher"):
    trainer.Trainer(c, str(tmp_path / "run"))


def test_token_distillation_weights_carry_no_gradient_to_the_policy():
  b, n, c = 2, 5, 4
  rng = np.random.default_rng(0)
  student = jnp.asarray(rng.normal(size=(b, n, c)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(b, n, c)), jnp.float32)
  state = rbase.TokenState.create(student, num_prefix=1, grid=(2, 2))

  def loss(policy):
    return distillation.token_distillation(state.replace(policy=policy), student, teacher, 1)
  policy = jnp.asarray([[1, 1, 0, 1, 0], [1, 0, 1, 1, 1]], jnp.float32)
  np.testing.assert_array_equal(jax.grad(loss)(policy), 0.0)
  # The value is DynamicViT's: MSE over the kept tokens (policy 1) and channels only.
  keep = np.asarray(policy)[:, 1:] > 0.5
  ref = np.mean((np.asarray(student)[:, 1:][keep] - np.asarray(teacher)[:, 1:][keep]) ** 2)
  np.testing.assert_allclose(loss(policy), ref, rtol=1e-6)
