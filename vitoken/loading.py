"""Sharing a trained model: `module, params, config = vitoken.load(path)`.

`path` is a run's workdir, its checkpoints folder or one step (local or gs://). The model is
rebuilt from the config saved with the checkpoint (`vitoken.tasks.runs`); with `mesh=`, the
params are sharded on it by the run's sharding rules as they are read.
"""
from typing import Any, Tuple

from vitoken.tasks import runs


def load(path, *, mesh=None, **model_overrides) -> Tuple[Any, Any, Any]:
  """(module, params, config) of a trained run, written by any number of devices or
  processes; `model_overrides` change how it runs (dtype, token_reduction, ...), `mesh`
  shards the params as they are read, by the run's sharding rules (default: one device)."""
  return runs.load_model(path, model_overrides=model_overrides, mesh=mesh)
