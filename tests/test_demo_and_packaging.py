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
