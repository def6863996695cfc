"""Every ImageNet recipe in configs/imagenet/ launches as its docstring says, and each of its
SMOKE runs trains, evaluates and resumes on mock ImageNet.

The smoke runs read `imagenet2012` served by `tfds.testing.mock_data` through the recipe's own
`data_dir` argument, on this process's 8 fake CPU devices (conftest.py) with the mesh the recipe
sets (FSDP over 8 for L/16): two steps and an eval, then the same workdir again with one more
step, which must resume from step 2. A `<file:arg>` inside an argument stands for the workdir of
that file's smoke run with that arg (a dense run, a pretraining run, a teacher, a tokenizer),
trained first in this module.
"""
import glob
import os
import re
import time

import pytest
import tensorflow_datasets as tfds

from tests import smoke_runs
from vitoken.train import config as config_lib, trainer

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                       "imagenet")
NOT_RECIPES = ("__init__.py", "common.py")
MOCK_EXAMPLES = 16  # per split: half a runlocal batch, so evaluation pads


def _module(name):
  return smoke_runs.config_module(RECIPES, name)


def _recipes():
  return [os.path.basename(p) for p in sorted(glob.glob(os.path.join(RECIPES, "*.py")))
          if os.path.basename(p) not in NOT_RECIPES]


def _smoke_runs():
  return [pytest.param(name, arg, id=f"{name[:-3]}:{arg}")
          for name in _recipes() for arg in getattr(_module(name), "SMOKE", ("<no SMOKE>",))]


def _commands(name):
  """The `--config=configs/imagenet/<name>:<arg>` arguments of the docstring's commands."""
  doc = _module(name).__doc__ or ""
  return re.findall(rf"--config=configs/imagenet/{re.escape(name)}(?::(\S*))?", doc)


def test_every_recipe_cites_its_number_and_hardware_and_its_commands_build():
  assert len(_recipes()) >= 10
  for name in _recipes():
    module = _module(name)
    doc = module.__doc__ or ""
    assert "Should reproduce" in doc and "%" in doc, f"{name}: no paper number in its docstring"
    assert "Hardware" in doc, f"{name}: no hardware in its docstring"
    assert getattr(module, "SMOKE", None), f"configs/imagenet/{name} has no SMOKE list"
    commands = _commands(name)
    assert commands, f"{name}: its docstring shows no command"
    for arg in commands:
      config = module.get_config(arg)  # exactly as the command line passes it
      config_lib.check_keys(config)
      assert "runlocal" not in arg and config.batch_size >= 256, (name, arg)
      assert config.data.name == "imagenet2012" and config.data.image_size == 224, (name, arg)


def _check_small(config, where):
  assert config.total_steps <= 3 and config.batch_size <= 32, where


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))

  def build(module, arg):
    config = module.get_config(f"{arg},data_dir={data_dir}")
    config.progress_bar = False
    return config

  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    yield smoke_runs.SmokeRuns(tmp_path_factory, RECIPES, build, _check_small)


@pytest.mark.parametrize("name,arg", _smoke_runs())
def test_recipe_trains_evaluates_and_resumes(name, arg, runs):
  t0 = time.time()
  workdir, summary = runs.train(name, arg)
  config = runs.config(name, arg)
  assert summary["start_step"] == 0 and summary["steps_run"] == config.total_steps
  assert [k for k in summary if k.startswith("eval") and summary[k]], sorted(summary)
  want_mesh = {"data": 8 // config.mesh.fsdp, "fsdp": config.mesh.fsdp, "tensor": 1}
  assert summary["mesh"] == want_mesh and summary["devices"] == 8
  with config.unlocked():
    config.total_steps += 1
  resumed = trainer.run(config, workdir)
  assert resumed["start_step"] == summary["final_step"] > 0 and resumed["steps_run"] == 1
  print(f"{name}:{arg} {time.time() - t0:.1f}s (its dependencies included)")


@pytest.mark.parametrize("file", ["token_learners.py", "masked_modeling.py"])
def test_the_digits_configs_old_imagenet_presets_name_the_recipes_that_replaced_them(file):
  configs = os.path.dirname(RECIPES)
  module = smoke_runs.config_module(configs, file)
  for preset, replacement in module.MOVED_PRESETS.items():
    with pytest.raises(config_lib.ConfigError, match=f"preset={preset} moved to configs/imagenet/"):
      module.get_config(f"preset={preset}")
    named = re.findall(r"(\w+\.py)", replacement)
    assert named and all(os.path.exists(os.path.join(RECIPES, n)) for n in named), replacement
  with pytest.raises(config_lib.ConfigError, match="unknown preset 'im22k'"):
    module.get_config("preset=im22k")
