"""The budget picker: the least aggressive training-free setting meeting a FLOPs or speed target."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_train_loop import smoke_config
import vitoken
from vitoken.bench import budget, flops as flops_lib
from vitoken.data import pipeline
from vitoken.errors import ConfigError
from vitoken.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = 0.7


# Named `run` as test_loading's 4-step run is, which tests/tiers.py lists as a trained-run
# fixture: every test here trains, so it belongs to the slow tier.
@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("dense_run")
  # A class token (top-k ranks by its attention) and a non-zero head (logits that differ).
  config = smoke_config(total_steps=4, **{"model.class_token": True, "model.head_zeroinit": False})
  config.eval_every_steps = config.checkpoint.every_steps = 4
  summary = trainer.run(config, str(workdir))
  return str(workdir), summary


@pytest.fixture(scope="module")
def picked(run):
  return budget.pick(run[0], flops_fraction=TARGET)


def _flops(workdir, setting):
  model, params, config = vitoken.load(workdir, token_reduction=setting)
  size = config.data.image_size
  images = jax.ShapeDtypeStruct((1, size, size, model.channels), jnp.float32)
  return flops_lib.summary(model, params, images)["analytic GFLOPs/img"]


def test_each_pick_is_the_least_aggressive_setting_under_the_flops_target(run, picked):
  workdir, _ = run
  dense = _flops(workdir, None)
  assert picked.dense.gflops == pytest.approx(dense)
  by_family = {p.family: p for p in picked.picks}
  assert set(by_family) == {"tome", "tome decreasing", "topk"}
  for family, pick in by_family.items():
    chosen = pick.chosen.setting
    assert _flops(workdir, chosen) <= TARGET * dense, family
    if chosen["method"] == "tome":
      r = chosen["r"]
      assert r > 1  # r - 1 is a setting, not dense
      assert _flops(workdir, {**chosen, "r": r - 1}) > TARGET * dense, family
    else:
      grid = budget.TOPK_KEEP_RATES
      before = grid[grid.index(chosen["keep_rate"]) - 1]
      assert _flops(workdir, {**chosen, "keep_rate": before}) > TARGET * dense
    assert chosen in [c.setting for c in pick.tried] and pick.chosen.meets


def test_reported_accuracy_is_that_of_the_setting_on_the_eval_split(run, picked):
  workdir, summary = run
  assert picked.dense_accuracy == summary["eval"]["accuracy"]
  assert picked.examples == summary["eval"]["examples"] == 256
  for pick in picked.picks:
    model, params, config = vitoken.load(workdir, token_reduction=pick.chosen.setting)
    predict = jax.jit(lambda x, m=model, p=params: m.apply({"params": p}, x)[0])
    correct = total = 0
    for b in pipeline.eval_iterator(config.data, global_batch_size=64):
      hit = np.asarray(predict(b["image"])).argmax(-1) == b["labels"].argmax(-1)
      correct, total = correct + int((hit & b["mask"]).sum()), total + int(b["mask"].sum())
    assert total == 256 and pick.accuracy == correct / total, pick.family


def test_a_target_no_setting_meets_and_bad_targets_are_config_errors(run):
  workdir, _ = run
  with pytest.raises(ConfigError, match="no setting .* meets analytic FLOPs <= 0.05"):
    budget.pick(workdir, flops_fraction=0.05, methods=("topk",))
  for kwargs, match in [({}, "exactly one target"),
                        ({"flops_fraction": 0.5, "speedup": 2.0}, "exactly one target"),
                        ({"flops_fraction": 1.0}, "in \\(0, 1\\)"),
                        ({"speedup": 0.9}, "over 1"),
                        ({"flops_fraction": 0.5, "methods": ("evit",)}, "training-free")]:
    with pytest.raises(ConfigError, match=match):
      budget.pick(workdir, **kwargs)


def test_speed_target_times_settings_against_dense(run):
  workdir, _ = run
  result = budget.pick(workdir, speedup=1.05, methods=("topk",), keep_rates=(0.6, 0.3),
                       time_batch=32, eval_examples=64, windows=2, iters=2, warmup=1)
  (pick,) = result.picks
  assert result.dense.speedup == 1.0 and result.examples == 64
  timed = [c for c in pick.tried if c.speedup is not None]
  assert timed and all(c.images_per_s > 0 and c.meets == (c.speedup >= 1.05) for c in timed)
  assert pick.chosen in timed and pick.chosen.meets and 0.0 <= pick.accuracy <= 1.0
  assert "x dense img/s" in budget.markdown(result)


def test_command_line_prints_the_table_and_errors_in_one_line(run):
  workdir, _ = run
  env = {**os.environ, "PYTHONPATH": ROOT}
  cmd = [sys.executable, "-m", "vitoken.bench.budget", f"--workdir={workdir}", "--methods=topk"]
  ok = subprocess.run(cmd + ["--flops=0.7"], capture_output=True, text=True, env=env, cwd=ROOT,
                      timeout=120)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "| topk | keep=0.6 |" in ok.stdout and "target: analytic FLOPs <= 0.7 x dense" in ok.stdout
  bad = subprocess.run(cmd + ["--flops=0.05"], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=120)
  assert bad.returncode == 1 and bad.stderr.splitlines()[-1].startswith("error: budget: no setting")
