"""Sharing a trained model: `module, params, config = vitoken.load(path)`.

`path` is a run's workdir, its checkpoints folder or one step (local or gs://). The model is
rebuilt from the config saved with the checkpoint (`vitoken.tasks.runs`); with `mesh=`, the
params are placed on it by the run's sharding rules.
"""
from typing import Any, Tuple

import jax

from vitoken.engine import sharding
from vitoken.tasks import runs


def load(path, *, mesh=None, **model_overrides) -> Tuple[Any, Any, Any]:
  """(module, params, config) of a trained run; `model_overrides` change how it runs (dtype,
  token_reduction, ...), `mesh` places the params with the run's sharding rules."""
  model, params, config = runs.load_model(path, model_overrides=model_overrides)
  if mesh is not None:
    rules = sharding.combined_rules(config.get("sharding", {}).get("rules", ()),
                                    model.sharding_rules())
    params = jax.device_put(params, sharding.tree_shardings(params, mesh, rules))
  return model, params, config
