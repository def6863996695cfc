"""The package's layout: floors that import only downwards, no import circles, and
function-local imports only where they keep a heavy optional dependency out of `import vitoken`.

The floors (top-down) are those of docs/layout.md. A module may import its own floor and the
floors below it, never one above.
"""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "vitoken"

# Floor of each top-level part of the package; higher floors stand on lower ones.
FLOORS = {
    "settings": 0, "paths": 0, "errors": 0, "cli": 0,
    "data": 1,
    "models": 2, "visualize": 2,
    "convert": 3, "vlm": 3,
    "engine": 4,
    "bench": 5, "tasks": 5,
    "train": 6, "loading": 6, "evaluate": 6,
    "tokenizers": 7, "demo": 7, "__init__": 7,
}

# Function-local imports allowed: (module, imported) pairs, each keeping something heavy or
# optional out of the import of its module (the reason is the comment beside it in the code).
LOCAL_IMPORTS_ALLOWED = {
    ("vitoken", "vitoken.loading"),  # `import vitoken` stays light: vitoken.load loads lazily
    ("vitoken.convert.torch_reference", "torch"),
    ("vitoken.demo", "torch"),
    ("vitoken.bench.torch_baselines", "torch"),
    ("vitoken.bench.torch_baselines", "tome"),
    ("vitoken.engine.metrics.tensorboard", "tensorboardX"),
    ("vitoken.engine.metrics.tensorboard", "tensorboardX.proto"),
    ("vitoken.models.posemb", "scipy.ndimage"),
    ("vitoken.data.cluttered_digits", "sklearn"),
    ("vitoken.visualize", "matplotlib"),
    ("vitoken.visualize", "matplotlib.pyplot"),
    # The reducer registry fills itself with the built-in methods on first lookup; they
    # import the contract module, so a top-level import would be a circle.
    ("vitoken.models.reducers.plan", "vitoken.models.reducers"),
}


def _module_name(path: pathlib.Path) -> str:
  parts = ("vitoken",) + path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
  return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(path: pathlib.Path, module: str):
  """(top-level imports, function-local import statements) of a file, as absolute module
  names (a statement as the tuple of the names it may import)."""
  tree = ast.parse(path.read_text())
  top, local = set(), set()

  def names(node):
    if isinstance(node, ast.Import):
      return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative import
      pkg = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
      base = ".".join(pkg + ([base] if base else []))
    # `from pkg import sub` imports the submodule `pkg.sub` when there is one.
    return [base] + [f"{base}.{a.name}" for a in node.names]

  for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      if node.col_offset:
        local.add(tuple(names(node)))
      else:
        top.update(names(node))
  return top, local


def _part(module: str) -> str:
  parts = module.split(".")
  return "__init__" if len(parts) == 1 else parts[1]


def _graph():
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    top, _ = _imports(path, name)
    graph[name] = sorted(m for m in top if m in modules and m != name)
  return graph


def test_every_part_has_a_floor():
  parts = {_part(m) for m in _modules()}
  assert parts <= set(FLOORS), f"parts with no floor: {sorted(parts - set(FLOORS))}"


def test_imports_point_down():
  upward = []
  for module, deps in _graph().items():
    for dep in deps:
      if dep == "vitoken":
        continue
      if FLOORS[_part(dep)] > FLOORS[_part(module)]:
        upward.append(f"{module} -> {dep}")
  assert not upward, "imports running up a floor:\n  " + "\n  ".join(upward)


def test_no_import_circles():
  graph = _graph()
  # A package's __init__ importing its own submodules is how packages work, not a circle.
  edges = {m: [d for d in deps if not m.startswith(d + ".") and d != "vitoken"]
           for m, deps in graph.items()}
  state, cycles = {}, []

  def visit(node, stack):
    state[node] = "open"
    for dep in edges.get(node, ()):
      if state.get(dep) == "open":
        cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
      elif dep not in state:
        visit(dep, stack + [dep])
    state[node] = "done"

  for node in sorted(edges):
    if node not in state:
      visit(node, [node])
  assert not cycles, "import circles:\n  " + "\n  ".join(cycles)


def test_function_local_imports_only_for_heavy_optional_dependencies():
  unexpected = []
  for name, path in _modules().items():
    _, local = _imports(path, name)
    for statement in local:
      if not any((name, dep) in LOCAL_IMPORTS_ALLOWED for dep in statement):
        unexpected.append(f"{name} imports {statement[-1]} inside a function")
  assert not unexpected, "\n".join(sorted(unexpected))


def test_a_planted_upward_import_is_caught(tmp_path, monkeypatch):
  # The checker itself: a models module importing the trainer must be reported.
  fake = tmp_path / "vitoken"
  (fake / "models").mkdir(parents=True)
  (fake / "train").mkdir()
  for p in ("__init__.py", "models/__init__.py", "train/__init__.py", "train/trainer.py"):
    (fake / p).write_text("")
  (fake / "models" / "bad.py").write_text("from vitoken.train import trainer\n")
  monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
  with pytest.raises(AssertionError, match="vitoken.models.bad -> vitoken.train.trainer"):
    test_imports_point_down()


@pytest.mark.parametrize("first", ["vitoken.tokenizers", "vitoken.tasks.runs", "vitoken.loading",
                                   "vitoken.models.tokenizers.kmeans", "vitoken.engine.checkpoint",
                                   "vitoken.tasks.teacher", "vitoken.train.trainer"])
def test_each_entry_point_imports_first_in_a_fresh_interpreter(first):
  # A circle hidden by import order shows up when its far end is imported first.
  code = (f"import sys, {first}, vitoken.train, vitoken.tokenizers, vitoken.loading; "
          "print(sorted({'torch', 'matplotlib', 'timm'} & set(sys.modules)))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == "[]", f"heavy optional libraries imported: {out.stdout}"


def test_old_public_names_keep_working():
  import vitoken  # pylint: disable=import-outside-toplevel
  from vitoken import convert, models, tokenizers  # pylint: disable=import-outside-toplevel
  from vitoken.models.reducers import base  # pylint: disable=import-outside-toplevel
  assert callable(vitoken.load)
  for name in ("from_timm", "from_big_vision", "to_big_vision", "from_mae"):
    assert callable(getattr(convert, name))
  assert callable(models.Model) and callable(models.decode_variant)
  assert callable(tokenizers.load) and callable(tokenizers.fit)
  assert base.TokenState is not None and base.BlockInfo is not None
  for module in ("vitoken.train", "vitoken.tokenizers"):
    out = subprocess.run([sys.executable, "-m", module, "--helpfull"], capture_output=True,
                         text=True, check=False)
    # absl prints the flags and exits (with 1 for --helpfull); no traceback on the way.
    assert "--config" in out.stdout and "Traceback" not in out.stderr, out.stderr[-2000:]
