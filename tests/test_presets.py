"""Every preset's smoke mode runs, and a dataset TFDS cannot build says why first.

Each config file lists its smoke runs in `SMOKE` (argument strings built from its own methods,
stages and presets, so a new one is picked up); a `<file:arg>` inside an argument stands for the
workdir of that file's smoke run with that argument (a pretraining run to fine-tune, a teacher, a
tokenizer), trained first in the same test process when it is not yet.
"""
import glob
import os
import time

import pytest
import tensorflow_datasets as tfds

from tests import smoke_runs
from vitoken import bench, errors
from vitoken.data import pipeline

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _config_module(name):
  return smoke_runs.config_module(CONFIGS, name)


def _smoke_runs(trained_only=False):
  """Every file's SMOKE runs; `trained_only`: its named presets (preset=...) and its first run,
  the ones the slow test trains (each method's run is built and checked in the fast tier, and
  trained by the method's own tests)."""
  runs = []
  for path in sorted(glob.glob(os.path.join(CONFIGS, "*.py"))):
    name = os.path.basename(path)
    # A config file without SMOKE still gets a case, which fails naming it.
    smoke = getattr(_config_module(name), "SMOKE", ("<no SMOKE list>",))
    for i, arg in enumerate(smoke):
      if trained_only and not (i == 0 or "preset=" in arg or name == "bench.py"):
        continue
      runs.append(pytest.param(name, arg, id=f"{name[:-3]}:{arg}"))
  return runs


def _build(module, arg):
  config = module.get_config(arg)
  if "total_steps" in config:
    config.progress_bar = False
  return config


def _config(name, arg, workdir_of):
  """The file's config for `arg`, each `<file:arg>` replaced by `workdir_of(file, arg)`."""
  return _build(_config_module(name), smoke_runs.substitute(arg, workdir_of))


def _check_small(config, where):
  """A smoke config a CPU trains in seconds, its schedule consistent with its length."""
  assert config.total_steps <= 20 and config.batch_size <= 32, where
  assert config.schedule.warmup_steps < config.total_steps, where
  assert config.eval_every_steps <= config.total_steps, where
  assert config.data.image_size <= 64, where
  assert config.data.name in ("cluttered_digits", "moving_digits/tiny", "digit_scenes/tiny"), where
  model = config.model.to_dict()
  assert model.get("width", 0) <= 64 and model.get("depth", 0) <= 8, where


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return smoke_runs.SmokeRuns(tmp_path_factory, CONFIGS, _build, _check_small)


def _bench(config):
  with config.unlocked():
    config.torch.enabled = False  # timm's side has its own tests (test_bench.py)
  rows, _ = bench.run(config)
  assert {(r["variant"], r["mode"]) for r in rows} == {
      (v, m) for v in config.variants for m in config.modes}
  for row in rows:
    assert row["status"] == "ok" and row["img/s"] > 0, row


def test_every_smoke_config_is_small_and_reads_no_imagenet():
  """What the training test below checks before it trains, for the fast tier: built alone."""
  for param in _smoke_runs():
    name, arg = param.values
    assert "SMOKE" in vars(_config_module(name)), f"configs/{name} has no SMOKE list"
    config = _config(name, arg, lambda *_: "/a/workdir")
    if "backbones" in config:
      assert max(config.batch_sizes) <= 8 and config.image_size <= 64, (name, arg)
    else:
      _check_small(config, f"{name}:{arg}")


@pytest.mark.parametrize("name,arg", _smoke_runs(trained_only=True))
def test_every_preset_smoke_mode_trains_and_evaluates(name, arg, runs):
  assert "SMOKE" in vars(_config_module(name)), (
      f"configs/{name} has no SMOKE list of its presets' smoke runs (see this test's docstring)")
  t0 = time.time()
  config = _config(name, arg, lambda *_: "unused")
  if "backbones" in config:  # configs/bench.py: run the way `python -m vitoken.bench` runs it
    _bench(config)
  else:
    _, summary = runs.train(name, arg)
    assert summary["final_step"] == summary["steps_run"] > 0
    evaluated = [k for k in summary if k.startswith("eval") and summary[k]]
    assert evaluated, f"{name}:{arg} did not evaluate: {sorted(summary)}"
  print(f"{name}:{arg} {time.time() - t0:.1f}s (its dependencies included)")


# ----------------------------------------------------------------------------- ImageNet via TFDS


def _manual_files(data_dir):
  manual = data_dir / "downloads" / "manual"
  manual.mkdir(parents=True)
  for file in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
    (manual / file).write_bytes(b"")
  return manual


def test_imagenet_build_without_tensorflow_says_so_first(tmp_path, monkeypatch):
  _manual_files(tmp_path)

  def build_without_tensorflow(self, **kwargs):
    # What TFDS's imagenet2012 build raises where TensorFlow is not installed: its lazy
    # `tensorflow` import (tensorflow_datasets/core/utils/lazy_imports_utils.py) fails at the
    # builder's first `tf.io.gfile` call.
    raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", build_without_tensorflow)
  with pytest.raises(errors.DataError) as raised:
    pipeline.dataset_info({"name": "imagenet2012", "data_dir": str(tmp_path),
                           "eval_split": "validation"})
  message = str(raised.value)
  print(message)
  assert message.startswith("TensorFlow is not installed, and TFDS needs it to build dataset "
                            f"'imagenet2012' into data_dir {tmp_path} (ModuleNotFoundError: "
                            "No module named 'tensorflow')")
  for hint in ("pip install tensorflow", "tfds build imagenet2012", "data.folder", "README"):
    assert hint in message
  assert "manual download" not in message  # the files are in place


def test_any_other_build_failure_comes_before_the_hint(tmp_path, monkeypatch):
  _manual_files(tmp_path)

  def broken(self, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", broken)
  with pytest.raises(errors.DataError, match=r"^OSError: disk full \(building dataset "
                                             rf"'imagenet2012' into data_dir {tmp_path}\)\. "):
    pipeline.dataset_info({"name": "imagenet2012", "data_dir": str(tmp_path)})


def test_imagenet_without_its_manual_files_names_them(tmp_path):
  with pytest.raises(errors.MissingPathError,
                     match=rf"(?s)'imagenet2012' is not in data_dir {tmp_path} and needs a manual "
                           rf"download: put its files in {tmp_path}/downloads/manual.*"
                           "ILSVRC2012_img_train.tar and.*ILSVRC2012_img_val.tar"):
    pipeline.dataset_info({"name": "imagenet2012", "data_dir": str(tmp_path)})
