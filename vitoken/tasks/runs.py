"""Rebuilding a trained run: its model (or tokenizer) and params, from the config saved with
its checkpoint. `vitoken.load`, a distillation teacher and BEiT's tokenizer all come here."""
from typing import Any, Dict, Optional, Tuple

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vitoken import errors, paths, settings as settings_lib
from vitoken.convert import from_big_vision, inflate
from vitoken.data import pipeline
from vitoken.engine import checkpoint as ckpt_lib, sharding
from vitoken.tasks import base

TOKENIZER_TASKS = ("kmeans_tokenizer", "fsq_tokenizer")


def _shape_problems(expected, params):
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(expected, sep="/").items()}
  have = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
  problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
  problems += [f"{k}: checkpoint {have[k]} vs model {want[k]}"
               for k in sorted(set(want) & set(have)) if want[k] != have[k]]
  return problems


def load_model(path, info=None, *, model_overrides: Optional[Dict[str, Any]] = None,
               what: str = "checkpoint", mesh=None):
  """(model, params, run config) of a run's checkpoint; names every param that does not fit.
  The model is the run's ViT, or the model its task builds around the ViT (a masked-modeling
  pretraining run's MAE / SimMIM / BEiT model; BEiT's also loads its tokenizer).

  Only the params are read, on this machine's devices whatever wrote them: onto the default
  device, or with `mesh` sharded as they are read by the run's sharding rules. `info` (a
  pipeline.DataInfo) gives the image shape and classes; without it they come from the saved
  config and the params' shapes.
  """
  config = ckpt_lib.load_run_config(path)
  shapes = ckpt_lib.params_shapes(path)
  task_cls = base.task_class((config.get("task") or {}).get("name", "classification"))
  scope = task_cls.backbone_scope  # None: the run's model is its ViT
  if info is None:
    size = int(config.data.image_size)
    stem = shapes[scope] if scope and scope in shapes else shapes
    kernel = stem["embedding"]["kernel"].shape  # [ph, pw, C, D], or [t, ph, pw, C, D]
    image_shape = (size, size, int(kernel[-2]))
    if len(kernel) == 5:  # a video model: the clips' frames are the data's
      image_shape = (pipeline.dataset_info(config.data).image_shape[0],) + image_shape
    classes = int(shapes["head"]["kernel"].shape[-1]) if "head" in shapes else 0
    info = pipeline.DataInfo(num_classes=classes, image_shape=image_shape,
                             train_examples=0, eval_examples=0)
  fields = {**settings_lib.as_dict(config.model, "model config"), **(model_overrides or {})}
  if scope:
    # A model around the ViT (a pretraining run's encoder + decoder): its task builds it.
    task = base.build(ml_collections.ConfigDict(
        {"model": fields, "task": settings_lib.as_dict(config.task, "task")}), info)
    model, dtype, rules = task.model, task.backbone().param_dtype, task.sharding_rules()
    expected = jax.eval_shape(task.init_params, jax.random.key(0), task.example_batch())
  else:
    model = base.vit_from_config(fields, info)
    dtype, rules = model.param_dtype, model.sharding_rules()
    images = jax.ShapeDtypeStruct((1, *info.image_shape), jnp.float32)
    expected = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  problems = _shape_problems(expected, shapes)
  if problems:
    raise errors.CheckpointError(
        f"{what} {path} does not fit the model its config describes (check the model "
        "overrides and the data's image size and classes):\n  " + "\n  ".join(problems[:10]))
  if mesh is None:
    placement = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  else:
    rules = sharding.combined_rules(config.get("sharding", {}).get("rules", ()), rules)
    placement = sharding.tree_shardings(shapes, mesh, rules)
  params = ckpt_lib.load_params(path, shardings=placement)
  return model, jax.tree.map(lambda x: x.astype(dtype), params), config


def inflated_params(path, video_model, clip_shape, *, kernel: str = "central"):
  """The params of the image model at `path` (a run's workdir or checkpoint, or a big_vision
  .npz) inflated for `video_model` (`vitoken.convert.inflate`) on clips of `clip_shape`
  (T, H, W, C): its tubelet, table type and class-token rule are the video model's. Host numpy
  arrays, for a run's `init_from` (which then fits them to the run's params by name)."""
  patch = tuple(video_model.patch_size)
  if len(patch) != 3 or len(clip_shape) != 4:
    raise errors.ConfigError(f"init_from.inflate makes a video model from an image model, but "
                             f"this run's model has patch_size {patch} for inputs "
                             f"{tuple(clip_shape)}: inflate needs a (t, p, p) patch and clips")
  if str(path).endswith(".npz"):
    image_model, params = from_big_vision(path, image_size=tuple(clip_shape[1:3]))
  else:
    image_model, params, _ = load_model(path, what="init_from.path (an image model to inflate)")
  if tuple(image_model.patch_size) != patch[1:]:
    raise errors.ConfigError(f"init_from.inflate: the image model at {path} has "
                             f"{tuple(image_model.patch_size)} patches, the video model "
                             f"{patch[1:]} spatially; inflating keeps the patch size")
  _, inflated = inflate(image_model, jax.tree.map(np.asarray, params), num_frames=clip_shape[0],
                        tubelet=patch[0], kernel=kernel, image_size=tuple(clip_shape[1:3]),
                        posemb=video_model.posemb,
                        prefix_per_slice=video_model.prefix_per_slice)
  return inflated


def load_tokenizer(path, info=None) -> Tuple[Any, Any]:
  """(tokenizer, params) of a tokenizer's workdir or checkpoint; `tokenizer.encode(params,
  images)` gives the codes. `info` (a pipeline.DataInfo) defaults to the run's own data."""
  if not path:
    raise errors.ConfigError("the tokenizer needs a `path`: the workdir of `python -m vitoken.tokenizers`")
  if not paths.resolve(path).exists():
    raise errors.MissingPathError(f"tokenizer: {path} does not exist (fit one with `python -m "
                            "vitoken.tokenizers --config=configs/visual_tokenizer.py --workdir=...`)")
  config = ckpt_lib.load_run_config(path)
  name = (config.get("task") or {}).get("name")
  if name not in TOKENIZER_TASKS:
    raise errors.CheckpointError(f"{path} holds a {name!r} run, not a tokenizer ({TOKENIZER_TASKS})")
  if info is None:
    info = pipeline.DataInfo(num_classes=0, image_shape=_image_shape(config), train_examples=0,
                             eval_examples=0)
  task = base.build(config, info)
  params = ckpt_lib.load_params(path, shardings=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  want = jax.tree.map(lambda a: a.shape, jax.eval_shape(task.init_params, jax.random.key(0),
                                                        task.example_batch()))
  got = jax.tree.map(jnp.shape, params)
  if jax.tree.structure(got) != jax.tree.structure(want) or got != want:
    raise errors.CheckpointError(f"the tokenizer checkpoint at {path} does not fit the tokenizer its config "
                     f"describes (params {got} vs {want}): a different or damaged checkpoint")
  return task.tokenizer(), params


def _image_shape(config):
  size = int(config.data.image_size)
  channels = int(config.get("model", {}).get("channels", 0) or 0)
  return (size, size, channels or pipeline.dataset_info(config.data).image_shape[-1])
