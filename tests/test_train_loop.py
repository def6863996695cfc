"""End-to-end training runs in-process: outputs, meshes, resume, init_from, errors, NaN."""
import json
import os

import jax
import numpy as np
import pytest

from configs import quickstart
from vitoken.engine import checkpoint as ckpt_lib
from vitoken.engine.metrics import read_jsonl
from vitoken.train import config as config_lib, trainer


def override(c, **overrides):
  """Sets dotted keys ("optim.lr"=0.1) of a config in place; returns it."""
  for key, value in overrides.items():
    target = c
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c


def smoke_config(**overrides):
  c = quickstart.get_config("runlocal")
  c.progress_bar = False
  c.checkpoint.async_save = False
  c.log_every_steps = 1
  return override(c, **overrides)


def losses(workdir, split="train", key="loss"):
  return [r[key] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == split]


def run_preempted(monkeypatch, config, workdir, *, at_call: int):
  """Runs `config` in `workdir` and interrupts it at its `at_call`-th step, as a preemption."""
  original_init = trainer.Trainer.__init__

  def init_then_preempt(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    step_fn, calls = self.train_step, []

    def step(state, *args):
      calls.append(1)
      if len(calls) == at_call:
        raise RuntimeError(f"preempted at step {at_call}")
      return step_fn(state, *args)
    self.train_step = step

  with monkeypatch.context() as m:
    m.setattr(trainer.Trainer, "__init__", init_then_preempt)
    with pytest.raises(RuntimeError, match=f"preempted at step {at_call}"):
      trainer.run(config, str(workdir))


def test_smoke_run_writes_everything(tmp_path):
  summary = trainer.run(smoke_config(), str(tmp_path))
  assert summary["final_step"] == 12 and summary["steps_run"] == 12
  assert 0.0 <= summary["eval"]["accuracy"] <= 1.0 and summary["eval"]["examples"] == 256
  files = set(os.listdir(tmp_path))
  assert {"metrics.jsonl", "summary.json", "checkpoints", "tensorboard"} <= files
  assert json.load(open(tmp_path / "summary.json"))["final_step"] == 12
  train = losses(tmp_path)
  assert len(train) == 12 and all(np.isfinite(train))
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [4, 8, 12]
  evals = [r["step"] for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if r["split"] == "eval"]
  assert evals == [6, 12]


@pytest.mark.parametrize("mesh", [(8, 1, 1), (4, 2, 1), (2, 2, 2)], ids=lambda m: "x".join(map(str, m)))
def test_meshes_give_the_single_device_loss_curve(tmp_path, mesh):
  assert jax.device_count() == 8
  kw = {"batch_size": 32, "total_steps": 6, "eval_every_steps": 0, "model.num_heads": 2}
  ref_dir, mesh_dir = tmp_path / "one", tmp_path / "mesh"
  trainer.run(smoke_config(**kw, mesh=dict(data=1, fsdp=1, tensor=1)), str(ref_dir))
  trainer.run(smoke_config(**kw, mesh=dict(zip(("data", "fsdp", "tensor"), mesh))), str(mesh_dir))
  np.testing.assert_allclose(losses(mesh_dir), losses(ref_dir), atol=1e-5, rtol=0)


def test_resume_continues_and_matches_uninterrupted_run(tmp_path, monkeypatch):
  full, part = tmp_path / "full", tmp_path / "part"
  trainer.run(smoke_config(), str(full))
  # Interrupt the same config after step 9 (the last checkpoint is step 8).
  run_preempted(monkeypatch, smoke_config(), part, at_call=9)
  # Resume onto another mesh: the checkpoint was written with the default (8, 1, 1) layout.
  summary = trainer.run(smoke_config(mesh=dict(data=2, fsdp=2, tensor=2)), str(part))
  assert summary["start_step"] == 8 and summary["steps_run"] == 4
  np.testing.assert_allclose(losses(part), losses(full), atol=1e-5)
  assert [r["step"] for r in read_jsonl(str(part / "metrics.jsonl")) if r["split"] == "train"] == list(range(1, 13))
  # Running the finished run again trains nothing and keeps the summary it wrote.
  again = trainer.run(smoke_config(mesh=dict(data=2, fsdp=2, tensor=2)), str(part))
  assert again["steps_run"] == 4 and again["wall_time_s"] == pytest.approx(summary["wall_time_s"])


def test_grad_accumulation_matches_one_big_batch(tmp_path):
  one, accum = tmp_path / "one", tmp_path / "accum"
  kw = {"total_steps": 3, "eval_every_steps": 0}
  trainer.run(smoke_config(**kw), str(one))
  trainer.run(smoke_config(**kw, grad_accum_steps=2, mesh=dict(data=4, fsdp=1, tensor=1)), str(accum))
  # Dropout-free model: the mean of micro-batch gradients is the full-batch gradient.
  np.testing.assert_allclose(losses(accum, key="loss/ce"), losses(one, key="loss/ce"), atol=1e-5)


def test_ema_is_evaluated(tmp_path):
  summary = trainer.run(smoke_config(ema_decay=0.9, total_steps=4, eval_every_steps=4), str(tmp_path))
  assert "eval_ema" in summary and summary["eval_ema"]["examples"] == 256


def test_init_from_copies_params_except_excluded_and_resizes_posemb(tmp_path):
  src, dst = tmp_path / "src", tmp_path / "dst"
  trainer.run(smoke_config(total_steps=4, **{"model.posemb": "learn"}), str(src))
  c = smoke_config(**{"model.posemb": "learn", "data.image_size": 32, "init_from.path": str(src),
                      "init_from.exclude": "^head/"})
  t = trainer.Trainer(c, str(dst))
  _, state = t.initial_state(None)
  source = ckpt_lib.load_params(str(src))
  got = jax.device_get(state["params"])
  np.testing.assert_array_equal(got["block_01"]["mlp"]["fc1"]["kernel"], source["block_01"]["mlp"]["fc1"]["kernel"])
  assert got["pos_embedding"].shape == (1, 16, 64) and source["pos_embedding"].shape == (1, 64, 64)
  assert not np.array_equal(got["head"]["bias"], source["head"]["bias"]) or not source["head"]["bias"].any()
  np.testing.assert_array_equal(got["head"]["kernel"], np.zeros_like(got["head"]["kernel"]))  # fresh zero-init head
  t.checkpointer.close()


def test_corrupt_latest_checkpoint_falls_back_and_says_so(tmp_path, caplog):
  trainer.run(smoke_config(total_steps=8), str(tmp_path))
  step_dir = tmp_path / "checkpoints" / "8" / "state"
  for root, _, names in os.walk(step_dir):
    for name in names:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  summary = trainer.run(smoke_config(), str(tmp_path))
  assert summary["start_step"] == 4
  warnings = [r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage()]
  # One short line that names the step and where it went (not TensorStore's whole spec).
  assert len(warnings) == 1 and "\n" not in warnings[0], warnings
  assert len(warnings[0].replace(str(tmp_path), "W")) < 300, warnings
  assert "checkpoint at step 8 is unreadable" in warnings[0] and "unreadable/8" in warnings[0]
  assert os.path.isdir(tmp_path / "checkpoints" / "unreadable" / "8")


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  original = trainer.Trainer._train_step

  def poisoned(self, state, *args):
    new, metrics = original(self, state, *args)
    metrics["loss"] = jax.numpy.where(state["step"] >= 5, jax.numpy.nan, metrics["loss"])
    return new, metrics

  monkeypatch.setattr(trainer.Trainer, "_train_step", poisoned)
  with pytest.raises(trainer.TrainingDiverged, match=r"loss is nan at step 6; stopping. The last good checkpoint is step 4"):
    trainer.run(smoke_config(), str(tmp_path))
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [4]


@pytest.mark.parametrize("overrides,error,pattern", [
    ({"batch_size": 30}, ValueError, "batch_size 30 .* not divisible by the 8 devices"),
    ({"grad_accum_steps": 3}, ValueError, "not divisible by grad_accum_steps 3"),
    ({"data.name": "cifar10", "data.data_dir": "{tmp}/empty", "data.build": False}, Exception, "cifar10"),
    ({"mesh": {"data": 3}}, ValueError, "mesh .* needs 3 devices|does not fit"),
    ({"model.colour": "red"}, ValueError, "unknown ViT option"),
], ids=["batch", "accum", "missing_dataset", "mesh", "model_key"])
def test_bad_configs_fail_clearly(tmp_path, overrides, error, pattern):
  overrides = {k: (v.format(tmp=tmp_path) if isinstance(v, str) else v) for k, v in overrides.items()}
  with pytest.raises(error, match=pattern):
    trainer.run(smoke_config(**overrides), str(tmp_path / "w"))


def test_unknown_config_keys_are_named_with_a_suggestion():
  c = smoke_config()
  c.unlock()
  c.totl_steps = 5
  with pytest.raises(ValueError, match=r"unknown config key 'totl_steps'; did you mean 'total_steps'"):
    config_lib.check_keys(c)
  c = smoke_config()
  c.checkpoint.unlock()
  c.checkpoint.evry = 5
  with pytest.raises(ValueError, match=r"unknown config key 'checkpoint.evry'"):
    config_lib.check_keys(c)


def test_unwritable_workdir_is_named(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(ValueError, match="workdir .*file/sub is not writable"):
    trainer.run(smoke_config(), str(blocker / "sub"))


def test_parse_arg_types_and_rejects_unknown():
  arg = config_lib.parse_arg("variant=S/16,runlocal,steps=5", variant="B/16", runlocal=False, steps=1)
  assert (arg.variant, arg.runlocal, arg.steps) == ("S/16", True, 5)
  with pytest.raises(ValueError, match="unknown config argument 'size'"):
    config_lib.parse_arg("size=3", variant="B/16")
  assert config_lib.parse_arg("runlocal=Off", runlocal=True).runlocal is False
  assert config_lib.parse_arg("runlocal=YES", runlocal=False).runlocal is True
  with pytest.raises(ValueError, match=r"config argument runlocal='ture' is not a boolean"):
    config_lib.parse_arg("runlocal=ture", runlocal=False)
  with pytest.raises(ValueError, match=r"config argument steps='5k' is not an int"):
    config_lib.parse_arg("steps=5k", steps=1)
  with pytest.raises(ValueError, match=r"config argument lr='fast' is not a float"):
    config_lib.parse_arg("lr=fast", lr=0.1)


def test_grad_accumulation_averages_the_micro_batch_gradients(tmp_path):
  """Plain SGD moves params by exactly lr * grad, so accumulating micro-batch gradients must
  give the one-batch step: their mean, not their sum (AdamW, above, is blind to that scale)."""
  kw = {"total_steps": 2, "eval_every_steps": 0, "checkpoint.every_steps": 2,
        "optim.name": "sgd", "optim.momentum": 0.0, "optim.lr": 0.5, "optim.weight_decay": 0.0,
        "schedule.warmup_steps": 0, "schedule.decay": "constant",
        "model.depth": 1, "data.image_size": 32, "data.train_examples": 64,
        "data.eval_examples": 32}
  t = trainer.Trainer(smoke_config(**kw), str(tmp_path / "init"))
  _, state = t.initial_state(None)
  init = jax.device_get(state["params"])
  t.checkpointer.close()
  deltas, grad_norms = {}, {}
  for accum in (1, 2):
    workdir = tmp_path / f"accum{accum}"
    trainer.run(smoke_config(**kw, grad_accum_steps=accum), str(workdir))
    deltas[accum] = jax.tree.map(lambda p, p0: np.asarray(p, np.float64) - p0,
                                 ckpt_lib.load_params(str(workdir)), init)
    grad_norms[accum] = losses(workdir, key="grad_norm")
  # Dropout-free model, same global batch: both steps are the same up to float rounding.
  flat_one = jax.tree_util.tree_leaves_with_path(deltas[1])
  flat_two = dict(jax.tree_util.tree_leaves_with_path(deltas[2]))
  assert max(np.abs(d).max() for _, d in flat_one) > 1e-3  # the steps moved the params
  for path, d_one in flat_one:
    np.testing.assert_allclose(flat_two[path], d_one, rtol=1e-3,
                               atol=1e-4 * np.abs(d_one).max() + 1e-9,
                               err_msg=jax.tree_util.keystr(path))
  assert len(grad_norms[1]) == 2  # logged every step
  np.testing.assert_allclose(grad_norms[2], grad_norms[1], rtol=1e-4)


def test_logged_lr_is_the_rate_at_the_logged_step_and_images_per_s_is_logged(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator
  c = smoke_config(log_every_steps=4)
  summary = trainer.run(c, str(tmp_path))
  schedule = trainer.Trainer(c, str(tmp_path / "other")).schedule
  train = [r for r in read_jsonl(os.path.join(tmp_path, "metrics.jsonl")) if r["split"] == "train"]
  assert [r["step"] for r in train] == [4, 6, 8, 12]
  # The step's own rate (the update that produced step s used schedule(s - 1)), not the
  # window's mean, which differs while the rate moves every step.
  np.testing.assert_allclose([r["lr"] for r in train], [schedule(r["step"] - 1) for r in train],
                             rtol=1e-5)
  assert all(r["images_per_s"] > 0 for r in train) and summary["images_per_s"] > 0
  events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard" / "train"))
  events.Reload()
  assert [e.step for e in events.Scalars("images_per_s")] == [4, 6, 8, 12]
