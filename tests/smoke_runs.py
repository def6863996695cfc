"""Config files' SMOKE runs, shared by the tests that train them (test_presets.py for configs/,
test_imagenet_recipes.py for configs/imagenet/): a config file loaded by path, and its smoke runs
trained once per test module with the runs they depend on trained first.

A `<file:arg>` inside a smoke argument stands for the workdir of that file's smoke run with that
argument (a pretraining run to fine-tune, a teacher, a tokenizer); dependencies may nest.
"""
import importlib.util
import os
import re
from typing import Callable, Dict, Optional, Tuple

from vitoken.train import trainer

_MODULES: Dict[str, object] = {}


def config_module(directory: str, name: str):
  """The config file `directory/name` as a module (loaded once per process)."""
  path = os.path.join(directory, name)
  if path not in _MODULES:
    tag = re.sub(r"\W+", "_", os.path.relpath(path))[:-3]
    spec = importlib.util.spec_from_file_location(f"smoke_{tag}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _MODULES[path] = module
  return _MODULES[path]


def substitute(arg: str, workdir_of: Callable[[str, str], str]) -> str:
  """`arg` with each outermost `<file:arg>` replaced by `workdir_of(file, arg)`."""
  out, depth, start = [], 0, 0
  for i, ch in enumerate(arg):
    if ch == "<":
      depth, start = depth + 1, (i if depth == 0 else start)
    elif ch == ">":
      depth -= 1
      if depth == 0:
        name, _, dependency = arg[start + 1:i].partition(":")
        out.append(workdir_of(name, dependency))
    elif depth == 0:
      out.append(ch)
  return "".join(out)


class SmokeRuns:
  """Smoke runs of the config files in `directory`, trained in this process by (file, arg).

  `build(module, arg)` turns a file and its dependency-free argument into the config to train;
  `check(config, where)` asserts what every smoke config must be before it trains.
  """

  def __init__(self, tmp_path_factory, directory: str, build: Callable,
               check: Optional[Callable] = None):
    self.factory, self.directory, self.build, self.check = tmp_path_factory, directory, build, check
    self.done: Dict[Tuple[str, str], Tuple[str, Dict]] = {}

  def config(self, name: str, arg: str):
    module = config_module(self.directory, name)
    return self.build(module, substitute(arg, self.workdir))

  def workdir(self, name: str, arg: str) -> str:
    return self.train(name, arg)[0]

  def train(self, name: str, arg: str) -> Tuple[str, Dict]:
    """(workdir, the first run's summary) of the smoke run, trained now if it is not yet."""
    if (name, arg) not in self.done:
      assert arg in getattr(config_module(self.directory, name), "SMOKE", ()), (
          f"a dependency names {name}:{arg}, which is not among that file's SMOKE runs")
      config = self.config(name, arg)
      if self.check is not None:
        self.check(config, f"{name}:{arg}")
      workdir = str(self.factory.mktemp(re.sub(r"\W+", "_", f"{name[:-3]}_{arg}")[:60]))
      self.done[(name, arg)] = workdir, trainer.run(config, workdir)
    return self.done[(name, arg)]
