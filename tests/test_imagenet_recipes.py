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
import importlib.util
import os
import re
import time

import pytest
import tensorflow_datasets as tfds

from vitoken.train import config as config_lib, trainer

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                       "imagenet")
NOT_RECIPES = ("__init__.py", "common.py")
MOCK_EXAMPLES = 16  # per split: half a runlocal batch, so evaluation pads
_MODULES = {}


def _module(name):
  if name not in _MODULES:
    spec = importlib.util.spec_from_file_location(f"imagenet_recipe_{name[:-3]}",
                                                  os.path.join(RECIPES, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _MODULES[name] = module
  return _MODULES[name]


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


class _Runs:
  """Smoke runs trained in this module, by (file, arg): workdir and first summary."""

  def __init__(self, factory, data_dir):
    self.factory, self.data_dir, self.done = factory, data_dir, {}

  def resolve(self, arg):
    """`arg` with each outermost `<file:arg>` replaced by that run's workdir (trained first)."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(arg):
      if ch == "<":
        depth, start = depth + 1, (i if depth == 0 else start)
      elif ch == ">":
        depth -= 1
        if depth == 0:
          name, _, dependency = arg[start + 1:i].partition(":")
          out.append(self.train(name, dependency)[0])
      elif depth == 0:
        out.append(ch)
    return "".join(out)

  def config(self, name, arg):
    config = _module(name).get_config(f"{self.resolve(arg)},data_dir={self.data_dir}")
    config.progress_bar = False
    return config

  def train(self, name, arg):
    if (name, arg) not in self.done:
      assert arg in getattr(_module(name), "SMOKE", ()), (
          f"a dependency names {name}:{arg}, which is not among that file's SMOKE runs")
      config = self.config(name, arg)
      assert config.total_steps <= 3 and config.batch_size <= 32, (name, arg)
      workdir = str(self.factory.mktemp(re.sub(r"\W+", "_", f"{name[:-3]}_{arg}")[:60]))
      self.done[(name, arg)] = workdir, trainer.run(config, workdir)
    return self.done[(name, arg)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    yield _Runs(tmp_path_factory, str(data_dir))


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
