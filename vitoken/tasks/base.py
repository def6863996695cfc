"""Tasks: what is trained and how it is judged, chosen by `config.task.name`.

A task owns the model(s), the fields its batches carry beyond the image, the objective and
the evaluation metrics; the trainer owns everything else (state, optimizer, meshes,
checkpoints, logging) and never branches on the task. New objectives are a file:

    @tasks.register("my_task")
    class MyTask(tasks.Task):
      def __init__(self, config, info, weight: float = 1.0):   # signature = config.task schema
        super().__init__(config, info)
      def loss(self, params, frozen, batch, rng, step, progress): ...
      def eval_sums(self, params, frozen, batch, rng): ...     # per-batch sums with "count"

A task trains by gradient through `loss` unless it owns its update (k-means): then it sets
`uses_optimizer = False` and overrides `update(state, batch, frozen, rng, progress,
gradient_step) -> (state, metrics)`; the trainer runs both through the same loop (resume,
logging, evaluation, summary).

Hooks (defaults in brackets):
- `models()`: (train model, eval model) [the ViT of `config.model`, with
  `config.eval_model_overrides` for evaluation];
- `init_params(rng, batch)` [train model's init on `example_batch()`];
- `uses_labels` [True]: False makes the pipeline yield label-free batches;
- `batch_fields()`: a picklable `(batch, np.random.Generator) -> batch` run inside the input
  pipeline after the task-independent preprocessing (train and eval), so extra fields (masks,
  target codes) are a pure function of the data position and survive a resume exactly;
- `frozen_params()`: arrays the step reads but never trains (a teacher's params) [{}];
- `layer_decay_groups()` / `sharding_rules()`: for parameters the task adds [the model's];
- `previews`, `preview(params, batch)` and `write_preview(arrays, workdir, step)`: a picture
  the trainer writes at every evaluation from the first eval batch (reconstructions) [none].
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vitoken import settings as settings_lib
from vitoken.errors import ConfigError
from vitoken.models import vit

# Batch keys that are not model inputs; everything else a batch holds reaches the model as
# `inputs` (and from there every reducer's `info.inputs`).
RESERVED_FIELDS = ("image", "labels", "mask")


class Progress(NamedTuple):
  """Where a training step is: `fraction` (step / total_steps, traced) and `phase` (a static
  float, the start of the schedule phase the step runs in: EViT's keep-rate shrink compiles
  one program per phase)."""
  fraction: Any
  phase: float = 0.0


def split_progress(progress) -> Tuple[Any, float]:
  """(fraction, phase) of a Progress, or of a bare fraction (phase 0)."""
  if isinstance(progress, Progress):
    return progress.fraction, progress.phase
  return progress, 0.0


def dtype_of(value):
  return jnp.dtype(value) if isinstance(value, str) else value


def vit_from_config(model_config, info, *, overrides=None) -> vit.VisionTransformer:
  """The ViT a config's `model` section describes; classes and channels default to the data's."""
  kwargs = settings_lib.as_dict(model_config, "model config")
  kwargs.setdefault("num_classes", info.num_classes)
  kwargs.setdefault("channels", info.image_shape[-1])
  for key in ("dtype", "param_dtype"):
    if key in kwargs:
      kwargs[key] = dtype_of(kwargs[key])
  model = vit.Model(**kwargs)
  overrides = settings_lib.as_dict(overrides, "eval_model_overrides")
  if not overrides:
    return model
  settings_lib.check_keys(overrides, vit.option_names(), "eval_model_overrides")
  for key in ("dtype", "param_dtype"):
    if key in overrides:
      overrides[key] = dtype_of(overrides[key])
  return model.clone(**overrides)


def model_rngs(model, rng, *, train: bool) -> Dict[str, jax.Array]:
  """The rng streams `model.apply` needs: dropout (training) and what its reducers declare."""
  if train:
    drop, reduction = jax.random.split(rng)
    rngs = {"dropout": drop, "reduction": reduction}
  else:
    rngs = {}
  streams = model.rng_streams() if hasattr(model, "rng_streams") else ()
  for i, name in enumerate(sorted(streams)):
    if name not in rngs:
      rngs[name] = jax.random.fold_in(rng, 1000 + i)
  return rngs


def model_inputs(batch) -> Dict[str, Any]:
  return {k: v for k, v in batch.items() if k not in RESERVED_FIELDS}


class Task:
  """Base class; the defaults are those of supervised classification."""
  uses_labels: ClassVar[bool] = True
  # Where the backbone ViT's params sit in the train model's params: None when the model is
  # the ViT itself, "encoder" for a pretraining model around it (MAE, SimMIM).
  backbone_scope: ClassVar[Optional[str]] = None
  headline: ClassVar[str] = "accuracy"  # the eval metric a run's summary line reports
  # False: the task owns its (non-gradient) `update`, and the state has no optimizer state.
  uses_optimizer: ClassVar[bool] = True

  def __init__(self, config, info):
    self.config = config
    self.info = info
    self._models = None

  # ---- models -----------------------------------------------------------------------------
  def models(self) -> Tuple[Any, Any]:
    if self._models is None:
      model = vit_from_config(self.config.model, self.info)
      eval_model = vit_from_config(self.config.model, self.info,
                                   overrides=self.config.eval_model_overrides)
      self._models = (model, eval_model)
    return self._models

  @property
  def model(self):
    return self.models()[0]

  @property
  def eval_model(self):
    return self.models()[1]

  def init_params(self, rng, batch):
    """Params for an example batch (a dict like the pipeline's, see `example_batch`)."""
    inputs = model_inputs(batch)
    return self.model.init(rng, batch["image"], **({"inputs": inputs} if inputs else {}))["params"]

  def example_batch(self, batch_size: int = 1) -> Dict[str, np.ndarray]:
    """A zero batch with every field the pipeline will yield (shapes and dtypes for init)."""
    batch = {"image": np.zeros((batch_size, *self.info.image_shape), np.float32)}
    if self.uses_labels:
      batch["labels"] = np.zeros((batch_size, self.info.num_classes), np.float32)
    fields = self.batch_fields()
    return fields(batch, np.random.default_rng(0)) if fields is not None else batch

  def backbone(self) -> vit.VisionTransformer:
    """The ViT inside the train model (patch size, prefix tokens, position embedding)."""
    return self.model

  def depth(self) -> Optional[int]:
    return getattr(self.model, "depth", None)

  def layer_decay_groups(self) -> Dict[str, str]:
    return self.model.layer_decay_groups() if hasattr(self.model, "layer_decay_groups") else {}

  def sharding_rules(self):
    return self.model.sharding_rules() if hasattr(self.model, "sharding_rules") else ()

  def phase_starts(self) -> Tuple[float, ...]:
    """Fractions of training where a static schedule phase starts (EViT's keep rate)."""
    return self.backbone().plan().phase_starts()

  def describe_model(self) -> str:
    """The model in a few words, for the run's first log line."""
    m = self.model
    if not hasattr(m, "width"):
      return type(m).__name__
    reduction = getattr(m, "token_reduction", None)
    return (f"ViT width {m.width} depth {m.depth} heads {m.num_heads} patch "
            f"{'x'.join(map(str, m.patch_size))} pool {m.pool_type}"
            + (f" reducers {settings_lib.plain(reduction)}" if reduction else ""))

  # ---- data -------------------------------------------------------------------------------
  def batch_fields(self) -> Optional[Callable[[Dict[str, np.ndarray], np.random.Generator], Dict]]:
    return None

  def frozen_params(self) -> Dict[str, Any]:
    return {}

  # ---- pictures at evaluation -------------------------------------------------------------
  previews: bool = False

  def preview(self, params, batch) -> Dict[str, jax.Array]:
    """Arrays (jit-compiled, replicated) that `write_preview` turns into files."""
    raise NotImplementedError

  def write_preview(self, arrays: Dict[str, np.ndarray], workdir: str, step: int) -> None:
    raise NotImplementedError

  # ---- objective and metrics --------------------------------------------------------------
  def apply(self, params, batch, rng, *, train: bool, step=None, progress=None, model=None):
    """Runs the (train or eval) model on a batch: (outputs, aux)."""
    model = model or (self.model if train else self.eval_model)
    kwargs = {"inputs": model_inputs(batch)} if model_inputs(batch) else {}
    if train:
      fraction, phase = split_progress(progress)
      kwargs.update(step=step, progress=fraction, phase=phase)
    return model.apply({"params": params}, batch["image"], train=train,
                       rngs=model_rngs(model, rng, train=train), **kwargs)

  def loss(self, params, frozen, batch, rng, step, progress) -> Tuple[jax.Array, Dict[str, Any]]:
    """(scalar loss, metrics); metrics hold "loss". `progress` is a `Progress`."""
    raise NotImplementedError

  def update(self, state, batch, frozen, rng, progress: Progress, gradient_step):
    """One training step: (new state, metrics). The default is the trainer's gradient step
    on `loss`; a task that learns without gradients (k-means) overrides it."""
    return gradient_step(state, batch, frozen, rng, progress)

  def eval_sums(self, params, frozen, batch, rng) -> Dict[str, jax.Array]:
    """Per-batch sums over the examples with batch["mask"] True, with their "count"."""
    raise NotImplementedError

  def eval_summary(self, totals: Dict[str, float]) -> Dict[str, float]:
    """Metrics from the summed `eval_sums` of a whole split: every `<m>_sum` becomes the mean
    `<m>`, and "count" becomes "examples"."""
    count = float(totals["count"])
    out = {k[:-4]: float(v) / max(count, 1.0) for k, v in totals.items() if k.endswith("_sum")}
    out["examples"] = count
    return out


def aux_loss_terms(aux) -> Dict[str, jax.Array]:
  """Reducers' auxiliary losses as metrics named loss/<path>."""
  return {f"loss/{k}": v for k, v in aux.get("losses", {}).items()}


_REGISTRY: Dict[str, type] = {}


def register(name: str):
  """Class decorator: makes a Task available as `config.task.name = name`."""
  def wrap(cls):
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(f"task {name!r} is registered twice")
    cls.task_name = name
    _REGISTRY[name] = cls
    return cls
  return wrap


def registered_tasks():
  return sorted(_REGISTRY)


def task_class(name: str) -> type:
  """The Task class registered as `name` (importing `vitoken.tasks` registers the built-in
  ones, and every caller reaches this module through that package)."""
  if name not in _REGISTRY:
    raise ConfigError(f"unknown task {name!r}; known: {registered_tasks()} (config.task.name)")
  return _REGISTRY[name]


def build(config, info) -> Task:
  """The task `config.task` names, with its settings checked against its signature."""
  spec = settings_lib.as_dict(config.get("task") if hasattr(config, "get") else None, "task config")
  name = spec.pop("name", "classification")
  cls = task_class(name)
  settings_lib.check_call(cls.__init__, spec, f"task {name!r}", exclude=("self", "config", "info"))
  return cls(config, info, **spec)
