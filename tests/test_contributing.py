"""CONTRIBUTING.md's examples run as written.

Every ```python block preceded by `<!-- example: NAME -->` is extracted and executed in a
fresh namespace, inside a fresh temporary directory (the current directory while it runs),
so an example may write files below the current directory. The examples register their
reducers and tasks under `contrib_*` names, guarded so that a second run in the same process
(a notebook cell, another test) does not raise.
"""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUIDE = ROOT / "CONTRIBUTING.md"
REQUIRED = ("reducer", "task", "modality", "dataset")

_EXAMPLE = re.compile(r"<!--\s*example:\s*([A-Za-z0-9_-]+)\s*-->\s*\n```python\n(.*?)^```",
                      re.DOTALL | re.MULTILINE)


def examples():
  """[(name, code)] in the order of the guide."""
  return [(m.group(1), m.group(2)) for m in _EXAMPLE.finditer(GUIDE.read_text())]


def run_example(name, code):
  namespace = {"__name__": f"contributing_{name}"}
  exec(compile(code, f"CONTRIBUTING.md:{name}", "exec"), namespace)  # pylint: disable=exec-used
  return namespace


def test_the_guide_has_an_example_per_section():
  names = [name for name, _ in examples()]
  assert len(names) >= 4, names
  assert len(set(names)) == len(names), f"example names repeat: {names}"
  assert set(REQUIRED) <= set(names), names
  # Every marker is followed by a python block (a marker before anything else is a typo).
  markers = re.findall(r"^<!--\s*example:", GUIDE.read_text(), re.MULTILINE)
  assert len(markers) == len(names)


@pytest.mark.parametrize("name", [name for name, _ in examples()])
def test_example_runs(name, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  run_example(name, dict(examples())[name])


def test_examples_that_register_tolerate_a_second_run(tmp_path, monkeypatch):
  """Registering again in the same process (a notebook re-run) must not raise."""
  from vitoken import tasks  # pylint: disable=import-outside-toplevel
  from vitoken.models.reducers import base  # pylint: disable=import-outside-toplevel

  monkeypatch.chdir(tmp_path)
  for name, code in examples():
    if "register(" not in code:
      continue
    first = run_example(name, code)
    second = run_example(name, code)
    registered = first["NAME"]
    assert registered.startswith("contrib_"), registered
    assert registered in base.registered_methods() + tasks.registered_tasks()
    assert second["NAME"] == registered


def test_paths_the_guide_names_exist():
  text = GUIDE.read_text()
  paths = set(re.findall(r"`((?:vitoken|tests|docs|configs|\.ci)/[A-Za-z0-9_./]*)(?:`|::|#)", text))
  paths |= {p for p in re.findall(r"\]\(([^)#]+)", text) if not p.startswith("http")}
  missing = sorted(p for p in paths if not (ROOT / p).exists())
  assert not missing, f"CONTRIBUTING.md names paths that do not exist: {missing}"
