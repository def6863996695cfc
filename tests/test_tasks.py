"""Tasks chosen by config: a label-free toy task with pipeline-made batch fields (trained end
to end, checkpointed and resumed), distillation from a teacher workdir or converted
checkpoint, training progress reaching the reducers, eval rngs for random reducers, and the
parameters that reducers declare (layer-decay group, sharding rules)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from configs import quickstart
from tests.test_train_loop import losses, run_preempted, smoke_config
from vitoken import tasks
from vitoken.convert import to_big_vision
from vitoken.data import pipeline
from vitoken.engine.metrics import read_jsonl
from vitoken.models import vit
from vitoken.models.reducers import base as rbase
from vitoken.tasks import distillation, teacher as teacher_lib
from vitoken.train import trainer

PATCH = 8  # the runlocal quickstart: 64x64 images, 8x8 patches, gap pooling, no class token


# ------------------------------------------------------------------ a label-free toy task


class PatchMask:
  """Batch fields: a random [B, patches] mask per batch, drawn from grain's generator."""

  def __init__(self, num_patches: int, ratio: float):
    self.num_patches, self.ratio = num_patches, ratio

  def __call__(self, batch, rng):
    assert "labels" not in batch, "a label-free task must get batches without labels"
    b = batch["image"].shape[0]
    batch["patch_mask"] = rng.random((b, self.num_patches)) < self.ratio
    return batch


@rbase.register("test_task_mask_token")
class MaskToken(rbase.Reducer):
  """Embedding-level: masked patches become a learned mask token before positions are added."""
  stages = (rbase.PRE_POSEMB,)
  changes_shape = False

  @classmethod
  def layer_settings(cls, depth):
    return {rbase.EMBED_LAYER: {}}

  @nn.compact
  def __call__(self, state, info, *, train=False):
    token = self.param("token", nn.initializers.normal(0.02), (self.context.width,),
                       self.context.param_dtype)
    p = state.num_prefix
    mask = info.inputs["patch_mask"][..., None]
    patches = jnp.where(mask, token.astype(state.x.dtype), state.x[:, p:])
    return state.replace(x=state.x.at[:, p:].set(patches)), {}


def patchify(images, patch):
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


@tasks.register("test_masked_patches")
class MaskedPatches(tasks.Task):
  """Predicts the pixels of masked patches (SimMIM-like, as small as it gets)."""
  uses_labels = False
  headline = "mse"

  def __init__(self, config, info, mask_ratio: float = 0.5):
    super().__init__(config, info)
    self.mask_ratio = mask_ratio
    self.num_patches = (info.image_shape[0] // PATCH) * (info.image_shape[1] // PATCH)

  def models(self):
    model = tasks.vit_from_config(
        {**self.config.model.to_dict(), "num_classes": PATCH * PATCH * self.info.image_shape[-1],
         "pool_type": "none", "token_reduction": {"method": "test_task_mask_token"}}, self.info)
    return model, model

  def batch_fields(self):
    return PatchMask(self.num_patches, self.mask_ratio)

  def _mse(self, pred, batch):
    target = patchify(batch["image"], PATCH)
    mask = batch["patch_mask"].astype(jnp.float32)
    per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
    return jnp.sum(per_patch * mask, axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)

  def loss(self, params, frozen, batch, rng, step, progress):
    pred, aux = self.apply(params, batch, rng, train=True, step=step, progress=progress)
    mse = self._mse(pred, batch).mean()
    return mse, {"loss": mse, "masked_fraction": batch["patch_mask"].mean()}

  def eval_sums(self, params, frozen, batch, rng):
    pred, _ = self.apply(params, batch, rng, train=False)
    valid = batch["mask"].astype(jnp.float32)
    return {"mse_sum": jnp.sum(self._mse(pred, batch) * valid), "count": valid.sum()}


def _label_free_config(**kw):
  c = smoke_config(**kw)
  c.task = {"name": "test_masked_patches", "mask_ratio": 0.5}
  c.optim.layer_decay = 0.75  # the mask token is a new top-level parameter: it declares "stem"
  return c


def test_label_free_task_trains_checkpoints_and_resumes_exactly(tmp_path, monkeypatch):
  full, part = tmp_path / "full", tmp_path / "part"
  summary = trainer.run(_label_free_config(), str(full))
  assert summary["task"] == "test_masked_patches" and summary["headline"] == "mse"
  assert np.isfinite(summary["eval"]["mse"]) and summary["eval"]["examples"] == 256
  fractions = losses(full, key="masked_fraction")
  assert all(0.3 < f < 0.7 for f in fractions) and len(set(fractions)) > 1  # fresh masks per batch
  run_preempted(monkeypatch, _label_free_config(), part, at_call=7)
  resumed = trainer.run(_label_free_config(), str(part))
  assert resumed["start_step"] == 4
  # Same masks after the resume (they come from the data position), so the same losses.
  np.testing.assert_allclose(losses(part), losses(full), atol=1e-6)
  np.testing.assert_array_equal(losses(part, key="masked_fraction"), fractions)
  np.testing.assert_allclose(resumed["eval"]["mse"], summary["eval"]["mse"], rtol=1e-6)


def test_label_free_batches_have_no_labels_and_fields_are_positional():
  cfg = smoke_config().data
  fields = PatchMask(64, 0.5)
  a = pipeline.train_iterator(cfg, global_batch_size=8, seed=0, labels=False, batch_fields=fields)
  batches = [next(a) for _ in range(3)]
  assert set(batches[0]) == {"image", "patch_mask"}
  b = pipeline.train_iterator(cfg, global_batch_size=8, seed=0, labels=False, batch_fields=fields)
  next(b)
  state = b.get_state()
  c = pipeline.train_iterator(cfg, global_batch_size=8, seed=0, labels=False, batch_fields=fields)
  c.set_state(state)
  np.testing.assert_array_equal(next(c)["patch_mask"], batches[1]["patch_mask"])
  evals = list(pipeline.eval_iterator(cfg, global_batch_size=64, labels=False, batch_fields=fields))
  again = list(pipeline.eval_iterator(cfg, global_batch_size=64, labels=False, batch_fields=fields))
  assert set(evals[0]) == {"image", "mask", "patch_mask"}
  for x, y in zip(evals, again):
    np.testing.assert_array_equal(x["patch_mask"], y["patch_mask"])


# ------------------------------------------------------------------ distillation


def test_distillation_losses_match_numpy():
  rng = np.random.RandomState(0)
  s, t = rng.randn(4, 10).astype(np.float32), rng.randn(4, 10).astype(np.float32)
  temp = 2.0
  log_sm = lambda z: z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
  pt, ls, lt = np.exp(log_sm(t / temp)), log_sm(s / temp), log_sm(t / temp)
  want = temp ** 2 * (pt * (lt - ls)).sum(-1)
  np.testing.assert_allclose(distillation.kl_to_teacher(s, t, temp), want, rtol=1e-5, atol=1e-6)
  # Tokens: the student kept patches 5, 0, 3 (in that order) plus one learned token, after
  # one class token; the teacher has two prefix tokens (class + register).
  student_x = rng.randn(2, 5, 6).astype(np.float32)
  teacher_x = rng.randn(2, 2 + 8, 6).astype(np.float32)
  ids = np.array([[0, 6, 1, 4, rbase.LEARNED_ID]] * 2, np.int32)
  policy = np.array([[1.0, 1.0, 0.5, 0.25, 1.0]] * 2, np.float32)
  state = rbase.TokenState(x=jnp.asarray(student_x), size=jnp.ones((2, 5)), ids=jnp.asarray(ids),
                           policy=jnp.asarray(policy), num_prefix=1, grid=(2, 4))
  got = distillation.token_distillation(state, jnp.asarray(student_x), jnp.asarray(teacher_x), 2)
  num = den = 0.0
  for b in range(2):
    for j in range(1, 4):
      patch = ids[b, j] - 1
      err = np.mean((student_x[b, j] - teacher_x[b, 2 + patch]) ** 2)
      num, den = num + policy[b, j] * err, den + policy[b, j]
  np.testing.assert_allclose(got, num / den, rtol=1e-5)


def test_distillation_from_a_teacher_workdir(tmp_path):
  teacher_dir = tmp_path / "teacher"
  trainer.run(smoke_config(), str(teacher_dir))
  # A student initialised from its teacher agrees with it: both distillation terms are 0 at
  # the first step, so the task really reads the teacher's logits and tokens.
  c = quickstart.get_config(f"runlocal,distill_from={teacher_dir}")  # the README's way
  assert c.task.name == "distillation" and c.task.teacher.path == str(teacher_dir)
  c = smoke_config(**{"init_from.path": str(teacher_dir), "task": c.task})
  c.task.update(ce_weight=0.0, logit_weight=1.0, token_weight=1.0)
  trainer.run(c, str(tmp_path / "same"))
  first = read_jsonl(str(tmp_path / "same" / "metrics.jsonl"))[0]
  assert first["loss/distill_logits"] < 1e-6 and first["loss/distill_tokens"] < 1e-10
  assert first["teacher_agreement"] == 1.0
  # A fresh student: the terms are positive and the weights combine them.
  c = smoke_config()
  c.task = {"name": "distillation", "teacher": {"path": str(teacher_dir)}, "ce_weight": 0.25,
            "logit_weight": 0.5, "temperature": 2.0, "token_weight": 2.0}
  summary = trainer.run(c, str(tmp_path / "fresh"))
  rec = read_jsonl(str(tmp_path / "fresh" / "metrics.jsonl"))[0]
  assert rec["loss/distill_logits"] > 1e-4 and rec["loss/distill_tokens"] > 1e-4
  np.testing.assert_allclose(rec["loss"], 0.25 * rec["loss/ce"] + 0.5 * rec["loss/distill_logits"]
                             + 2.0 * rec["loss/distill_tokens"], rtol=1e-5)
  assert 0 <= summary["eval"]["accuracy"] <= 1


def test_teacher_from_a_converted_checkpoint_matches_its_source(tmp_path):
  info = pipeline.DataInfo(num_classes=10, image_shape=(32, 32, 3), train_examples=1, eval_examples=1)
  model = vit.Model(10, variant="Ti/16", depth=2, head_zeroinit=False, gelu_approximate=True)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  params = model.init(jax.random.key(1), images)["params"]
  path = str(tmp_path / "teacher.npz")
  np.savez(path, **to_big_vision(model, params))
  t_model, t_params = teacher_lib.load({"path": path, "model": {"variant": "Ti/16"}}, info)
  np.testing.assert_allclose(t_model.apply({"params": t_params}, images)[0],
                             model.apply({"params": params}, images)[0], atol=1e-5)


def test_teacher_that_does_not_fit_is_named(tmp_path):
  teacher_dir = tmp_path / "teacher"
  trainer.run(smoke_config(), str(teacher_dir))
  info = pipeline.dataset_info(smoke_config().data)
  with pytest.raises(ValueError, match="(?s)does not fit the model.*unexpected block_01"):
    teacher_lib.load({"path": str(teacher_dir), "model": {"depth": 1}}, info)
  with pytest.raises(ValueError, match="unknown teacher config key 'pth'"):
    teacher_lib.load({"pth": str(teacher_dir)}, info)


@pytest.mark.parametrize("task,pattern", [
    ({"name": "nope"}, r"unknown task 'nope'; known: \[.*'classification'"),
    ({"name": "classification", "weight": 1}, r"unknown task 'classification' key 'weight'"),
    ({"name": "distillation"}, r"distillation .* needs a dense teacher: set config.task.teacher"),
    ({"name": "distillation", "teacher": {"path": "/nonexistent"}}, "does not exist"),
])
def test_bad_task_configs_are_named(tmp_path, task, pattern):
  c = smoke_config()
  c.task = task
  with pytest.raises((ValueError, FileNotFoundError), match=pattern):
    trainer.run(c, str(tmp_path))


# ------------------------------------------------------------------ progress, eval rngs, rules


@rbase.register("test_task_progress_probe")
class ProgressProbe(rbase.Reducer):
  """Reports the training step and progress it is given as (constant) losses."""
  stages = (rbase.POST_ATTN,)
  changes_shape = False

  @classmethod
  def layer_settings(cls, depth):
    return {0: {}}

  def __call__(self, state, info, *, train=False):
    step = jnp.float32(-1.0) if info.step is None else info.step.astype(jnp.float32)
    return state, {"losses": {"progress": jnp.asarray(info.progress, jnp.float32), "step": step}}


def test_training_step_and_progress_reach_the_reducers(tmp_path):
  c = smoke_config(**{"model.token_reduction": {"method": "test_task_progress_probe"}})
  trainer.run(c, str(tmp_path))
  steps = losses(tmp_path, key="loss/block_00/test_task_progress_probe/step")
  progress = losses(tmp_path, key="loss/block_00/test_task_progress_probe/progress")
  np.testing.assert_array_equal(steps, np.arange(12))  # the optimizer step before the update
  np.testing.assert_allclose(progress, np.arange(12) / 12, rtol=1e-6)


def test_random_matching_runs_in_eval_and_is_repeatable(tmp_path):
  c = smoke_config(eval_every_steps=0, **{"model.head_zeroinit": False})
  c.eval_model_overrides = {"token_reduction": {"method": "tome", "r": 8, "matching": "random"}}
  t = trainer.Trainer(c, str(tmp_path))
  _, state = t.initial_state(None)
  first, second = t.evaluate(state["params"]), t.evaluate(state["params"])
  assert first == second and first["examples"] == 256
  c.eval_model_overrides = {}
  dense = trainer.Trainer(c, str(tmp_path / "dense")).evaluate(state["params"])
  assert dense["loss"] != first["loss"]  # the merging really ran


@rbase.register("test_task_sharded_proj")
class ShardedProj(rbase.Reducer):
  """A shape-preserving learned projection that declares how its kernel is sharded."""
  stages = (rbase.POST_BLOCK,)
  changes_shape = False
  sharding_rules = ((r"proj/kernel$", ("fsdp", "tensor")),)

  @classmethod
  def layer_settings(cls, depth):
    return {depth - 1: {}}

  @nn.compact
  def __call__(self, state, info, *, train=False):
    return state.replace(x=state.x + self.context.dense(self.context.width, name="proj")(state.x)), {}


def test_declared_and_configured_sharding_rules_place_parameters(tmp_path):
  c = smoke_config(mesh={"data": 2, "fsdp": 2, "tensor": 2})
  c.model.token_reduction = {"method": "test_task_sharded_proj"}
  c.sharding.rules = ((r"(^|/)head/kernel$", (None, "tensor")),)
  t = trainer.Trainer(c, str(tmp_path))
  params = t.state_shardings["params"]
  assert params["block_01"]["test_task_sharded_proj"]["proj"]["kernel"].spec == P("fsdp", "tensor")
  assert params["head"]["kernel"].spec == P(None, "tensor")
  assert params["block_01"]["mlp"]["fc1"]["kernel"].spec == P("fsdp", "tensor")  # ViT rules hold
  mu = t.state_shardings["opt_state"][0].mu
  assert mu["block_01"]["test_task_sharded_proj"]["proj"]["kernel"].spec == P("fsdp", "tensor")
  c.sharding.rules = ((r"head", ("model",)),)
  with pytest.raises(ValueError, match=r"unknown mesh axes \['model'\]"):
    trainer.Trainer(c, str(tmp_path / "bad"))


# ------------------------------------------------------------------ eval over padded batches


def _classifier_predicting(cls: int, *, num_classes: int = 10):
  """The quickstart classification task and params whose model predicts class `cls` for every
  image: zero head kernel, a head bias peaked at `cls` (the logits are the bias)."""
  info = pipeline.DataInfo(num_classes=num_classes, image_shape=(64, 64, 1), train_examples=1,
                           eval_examples=1)
  task = tasks.build(smoke_config(), info)
  params = task.init_params(jax.random.key(0), task.example_batch(2))
  bias = np.linspace(-1.0, 1.0, num_classes, dtype=np.float32)
  bias[cls] = 3.0
  params = {**params, "head": {"kernel": jnp.zeros_like(params["head"]["kernel"]),
                               "bias": jnp.asarray(bias)}}
  return task, params, bias


def test_eval_accuracy_and_loss_leave_out_padding_rows_even_when_they_are_predicted_right():
  # The pipeline's padding rows (mask False) hold a zero image and an all-zero label row, whose
  # argmax is class 0. The model predicts class 0 for every row, padding included, so a padding
  # row that reached the sums would be counted correct: only mask-True rows may count.
  task, params, bias = _classifier_predicting(0)
  labels = np.array([0, 3, 0, 7, 2])  # 5 real rows, 2 of them class 0 (right)
  real, pad = len(labels), 3
  rng = np.random.default_rng(0)
  images = np.concatenate([rng.normal(size=(real, 64, 64, 1)), np.zeros((pad, 64, 64, 1))])
  batch = {"image": images.astype(np.float32),
           "labels": np.concatenate([np.eye(10, dtype=np.float32)[labels],
                                     np.zeros((pad, 10), np.float32)]),
           "mask": np.array([True] * real + [False] * pad)}
  logits, _ = task.apply(params, batch, None, train=False)
  assert np.all(np.asarray(logits).argmax(-1) == 0)  # the padding rows are "predicted right"
  sums = jax.jit(task.eval_sums)(params, {}, batch, jax.random.key(1))
  assert float(sums["count"]) == real
  assert float(sums["accuracy_sum"]) == 2.0
  # Loss: the integer-label cross-entropy of the real rows only.
  want = float(np.sum(np.log(np.sum(np.exp(bias))) - bias[labels]))
  np.testing.assert_allclose(float(sums["loss_sum"]), want, rtol=1e-6)
  summary = task.eval_summary(jax.device_get(sums))
  assert summary["examples"] == real and summary["accuracy"] == 2 / 5
  # Where the padding rows sit does not matter: interleaved with the real ones, same sums.
  order = np.array([5, 0, 1, 6, 2, 3, 7, 4])
  shuffled = jax.jit(task.eval_sums)(params, {}, {k: v[order] for k, v in batch.items()},
                                     jax.random.key(1))
  assert float(shuffled["accuracy_sum"]) == 2.0 and float(shuffled["count"]) == real
