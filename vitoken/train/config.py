"""The trainer's config schema, big_vision-style argument parsing, and key validation.

Config files start from `base_config()` and change what they need, so every key a run can
take exists here with its default, and a misspelt key is an error instead of being ignored.
Sections owned by other modules (`data`, `optim`, `schedule`, `model`) are checked there.
"""
import difflib

import ml_collections

from vitoken import settings as settings_lib
from vitoken.data import pipeline
from vitoken.engine import optim
from vitoken.errors import ConfigError
from vitoken.models import vit

# Sections whose keys are checked by their owner, not against the defaults below.
FREE_FORM = ("model", "eval_model_overrides", "data", "optim", "schedule", "task")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 256  # global, over all devices and processes
  c.grad_accum_steps = 1  # micro-batches per step (batch_size must divide evenly)
  c.label_smoothing = 0.0
  c.ema_decay = 0.0  # 0: no EMA; else also evaluate the EMA params
  # ViT fields (see vitoken.models.vit.VisionTransformer); num_classes and channels default
  # to the dataset's.
  # What is trained and how it is judged (vitoken.tasks): "classification" (default),
  # "distillation" (with a teacher), ...; the other keys are the task's settings.
  c.task = ml_collections.ConfigDict({"name": "classification"})
  # token_reduction: {"method": ..., **settings}, a list of them, or None (no reduction).
  c.model = ml_collections.ConfigDict({"variant": "Ti/16", "token_reduction": None})
  c.eval_model_overrides = ml_collections.ConfigDict()  # e.g. a token_reduction for eval only
  c.data = pipeline.default_data_config()
  c.optim = optim.default_optim_config()
  c.schedule = optim.default_schedule_config()
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  # Extra partition rules, ((regex, spec), ...), tried before the task's, the reducers' and
  # the model's own (vitoken.models.vit.SHARDING_RULES). The regex is searched in the state path
  # ("params/head/kernel", "opt_state/0/mu/head/kernel"), so anchor with (^|/), not ^.
  c.sharding = ml_collections.ConfigDict({"rules": ()})
  c.log_every_steps = 50
  c.eval_every_steps = 500  # 0: only at the end
  c.checkpoint = ml_collections.ConfigDict({"every_steps": 500, "keep": 3, "async_save": True})
  c.init_from = ml_collections.ConfigDict({
      "path": "",  # another run's workdir or checkpoint, or a big_vision .npz
      "exclude": "",  # regex of param paths kept from the fresh init, e.g. "^head/"
      # a '/'-path into the loaded params to start from, e.g. "encoder" for the encoder of a
      # masked-modeling (MAE, SimMIM) pretraining run
      "subtree": "",
      "posemb_resize": "bilinear",
      # "central" or "average": the path holds an image model (a run or a big_vision .npz) to
      # inflate into this run's video model (vitoken.convert.inflate: tubelet kernel, table
      # tiled over time); "" loads the params as they are
      "inflate": "",
  })
  c.distributed = ml_collections.ConfigDict({
      "initialize": "auto",  # "auto": when the environment names a coordinator; True; False
      "coordinator_address": "",
      "num_processes": 0,
      "process_id": -1,
  })
  c.progress_bar = True
  return c


def digits_recipe(c: ml_collections.ConfigDict, *, total_steps: int,
                  eval_every: int) -> ml_collections.ConfigDict:
  """The small-ViT recipe the bundled cluttered-digits configs share: 64 px, batch 128, AdamW
  (lr 2e-3, weight decay 0.05), 200 warmup steps then cosine to 2% of the peak."""
  c.data.name = "cluttered_digits"
  c.data.image_size = 64
  c.batch_size = 128
  c.total_steps = total_steps
  c.optim.name = "adamw"
  c.optim.lr = 2e-3
  c.optim.weight_decay = 0.05
  c.schedule.warmup_steps = 200
  c.schedule.decay = "cosine"
  c.schedule.end_factor = 0.02
  c.log_every_steps = 50
  c.eval_every_steps = eval_every
  c.checkpoint.every_steps = eval_every
  return c


def runlocal(c: ml_collections.ConfigDict, *, checkpoint_every: int = 4) -> ml_collections.ConfigDict:
  """Seconds-long smoke-run settings: 12 steps of 32 on capped splits, eval at 6 and 12."""
  c.batch_size = 32
  c.total_steps = 12
  c.data.train_examples = 512
  c.data.eval_examples = 256
  c.log_every_steps = 2
  c.eval_every_steps = 6
  c.checkpoint.every_steps = checkpoint_every
  c.schedule.warmup_steps = 2
  return c


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_arg(arg: str, **defaults) -> ml_collections.ConfigDict:
  """"variant=S/16,runlocal" -> {variant: "S/16", runlocal: True} over `defaults`, typed."""
  out = ml_collections.ConfigDict(dict(defaults))
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in defaults:
      close = difflib.get_close_matches(key, list(defaults), n=1)
      raise ConfigError(f"unknown config argument {key!r}"
                        + (f"; did you mean {close[0]!r}?" if close else "")
                        + f"; this config takes {sorted(defaults)}, after the file's colon: "
                        "file.py:key=value,flag,...")
    default = defaults[key]
    if not eq:
      value = True
    elif isinstance(default, bool):
      if value.lower() not in _TRUE + _FALSE:
        raise ConfigError(f"config argument {key}={value!r} is not a boolean; use one of "
                          f"{_TRUE + _FALSE}")
      value = value.lower() in _TRUE
    elif isinstance(default, (int, float)) and default is not None:
      try:
        value = type(default)(value)
      except ValueError:
        raise ConfigError(f"config argument {key}={value!r} is not a"
                          f"{'n' if isinstance(default, int) else ''} {type(default).__name__}; "
                          f"give e.g. {key}={default!r}") from None
    out[key] = value
  return out


def moved_preset_message(preset: str, moved: dict) -> str:
  """The error for a preset that left a digits config for configs/imagenet/."""
  if preset in moved:
    return (f"preset={preset} moved to configs/imagenet/ with the rest of the ImageNet recipes "
            f"(evaluation crop, DeiT augmentation, folder or TFDS data): use {moved[preset]}")
  return f"unknown preset {preset!r}; the ImageNet recipes are in configs/imagenet/"


def override_reference() -> ml_collections.ConfigDict:
  """The keys `--config.<key>=...` may set even where a config file left them out: those of
  `base_config()`, and every ViT field under `model` and `eval_model_overrides` (None there:
  taken as given, JSON or a string)."""
  c = base_config()
  fields = dict.fromkeys(vit.option_names() + ("variant",))
  c.model = ml_collections.ConfigDict(fields)
  c.eval_model_overrides = ml_collections.ConfigDict(fields)
  return c


def check_keys(config, reference=None, prefix: str = ""):
  """Raises on keys the schema does not know, suggesting the closest known one."""
  reference = base_config() if reference is None else reference
  settings_lib.check_keys([f"{prefix}{k}" for k in config.keys()],
                          [f"{prefix}{k}" for k in reference.keys()], "config")
  for key in config.keys():
    if prefix == "" and key in FREE_FORM:
      continue
    if isinstance(reference[key], ml_collections.ConfigDict):
      check_keys(config[key], reference[key], prefix=f"{prefix}{key}.")
