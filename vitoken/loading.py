"""Sharing a trained model: `module, params, config = vitoken.load(path)`.

`path` is a run's workdir, its checkpoints folder or one step (local or gs://). The model is
rebuilt from the config saved with the checkpoint; with `mesh=`, the params are placed on it
by the run's sharding rules.
"""
from typing import Any, Dict, Optional, Tuple

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from vitoken import settings as settings_lib


def load_run_model(path, info=None, *, model_overrides: Optional[Dict[str, Any]] = None,
                   what: str = "checkpoint"):
  """(model, params, run config) of a run's checkpoint; names every param that does not fit.
  The model is the run's ViT, or the model its task builds around the ViT (a masked-modeling
  pretraining run's MAE / SimMIM / BEiT model; BEiT's also loads its tokenizer).

  `info` (a pipeline.DataInfo) gives the image shape and classes; without it they come from
  the saved config and the params themselves.
  """
  from vitoken.data import pipeline  # pylint: disable=import-outside-toplevel
  from vitoken.tasks import base  # pylint: disable=import-outside-toplevel
  from vitoken.engine import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  config = ckpt_lib.load_run_config(path)
  params = ckpt_lib.load_params(path)
  task_cls = base.task_class((config.get("task") or {}).get("name", "classification"))
  scope = task_cls.backbone_scope  # None: the run's model is its ViT
  if info is None:
    size = int(config.data.image_size)
    stem = params[scope] if scope and scope in params else params
    channels = int(np.shape(stem["embedding"]["kernel"])[2])
    classes = int(np.shape(params["head"]["kernel"])[-1]) if "head" in params else 0
    info = pipeline.DataInfo(num_classes=classes, image_shape=(size, size, channels),
                             train_examples=0, eval_examples=0)
  fields = {**settings_lib.as_dict(config.model, "model config"), **(model_overrides or {})}
  if scope:
    # A model around the ViT (a pretraining run's encoder + decoder): its task builds it.
    import ml_collections  # pylint: disable=import-outside-toplevel
    task = base.build(ml_collections.ConfigDict(
        {"model": fields, "task": settings_lib.as_dict(config.task, "task")}), info)
    model, dtype = task.model, task.backbone().param_dtype
    expected = jax.eval_shape(task.init_params, jax.random.key(0), task.example_batch())
  else:
    model = base.vit_from_config(fields, info)
    dtype = model.param_dtype
    images = jax.ShapeDtypeStruct((1, *info.image_shape), jnp.float32)
    expected = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(expected, sep="/").items()}
  have = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
  problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
  problems += [f"{k}: checkpoint {have[k]} vs model {want[k]}"
               for k in sorted(set(want) & set(have)) if want[k] != have[k]]
  if problems:
    raise ValueError(f"{what} {path} does not fit the model its config describes (check the "
                     "model overrides and the data's image size and classes):\n  "
                     + "\n  ".join(problems[:10]))
  return model, jax.tree.map(lambda x: jnp.asarray(x, dtype), params), config


def load(path, *, mesh=None, **model_overrides) -> Tuple[Any, Any, Any]:
  """(module, params, config) of a trained run; `model_overrides` change how it runs (dtype,
  token_reduction, ...), `mesh` places the params with the run's sharding rules."""
  from vitoken.engine import sharding  # pylint: disable=import-outside-toplevel
  model, params, config = load_run_model(path, model_overrides=model_overrides)
  if mesh is not None:
    rules = sharding.combined_rules(config.get("sharding", {}).get("rules", ()),
                                    model.sharding_rules())
    params = jax.device_put(params, sharding.tree_shardings(params, mesh, rules))
  return model, params, config
