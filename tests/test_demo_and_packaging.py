"""The README's first command (the parity demo) and the install metadata."""
import importlib.metadata
import re

import vitoken
from vitoken import demo


def test_demo_passes_and_reports_parity(capsys):
  assert demo.main(["--model", "vit_tiny_patch16_224", "--batch", "2"]) == 0
  out = capsys.readouterr().out
  diff = float(re.search(r"max \|logits_vitoken - logits_timm\| = (\S+)", out).group(1))
  assert diff < 1e-4 and out.strip().endswith("PASS")


def test_demo_fails_loudly_when_parity_is_off(capsys):
  assert demo.main(["--model", "vit_tiny_patch16_224", "--batch", "2", "--tol", "1e-12"]) == 1
  assert capsys.readouterr().out.strip().endswith("FAIL")


def test_installed_metadata_needs_no_tensorflow():
  assert importlib.metadata.version("vitoken") == vitoken.__version__
  requires = importlib.metadata.requires("vitoken")
  names = {re.split(r"[ <>=!;\[]", r)[0].lower() for r in requires}
  for needed in ("jax", "flax", "optax", "orbax-checkpoint", "ml-collections", "tensorflow-datasets",
                 "array-record", "grain", "timm", "torch", "pytest"):
    assert needed in names, needed
  assert "tensorflow" not in names
  extras = {r.split("extra == ")[-1].strip("'\"") for r in requires if "extra ==" in r}
  assert {"test", "gpu"} <= extras


def _setup_kwargs(monkeypatch, keep_jax: str):
  import os
  import runpy

  import setuptools
  captured = {}
  monkeypatch.setenv("VITOKEN_KEEP_JAX", keep_jax)
  monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
  runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(__file__)), "setup.py"))
  return captured


def test_setup_has_a_tpu_extra_and_can_keep_an_installed_jax(monkeypatch):
  names = lambda reqs: {re.split(r"[ <>=!;\[]", r)[0].lower() for r in reqs}
  default = _setup_kwargs(monkeypatch, "")
  assert {"jax", "jaxlib", "flax"} <= names(default["install_requires"])
  assert any(r.startswith("jax[tpu]") for r in default["extras_require"]["tpu"])
  kept = _setup_kwargs(monkeypatch, "1")
  assert names(kept["install_requires"]) == names(default["install_requires"]) - {"jax", "jaxlib"}
