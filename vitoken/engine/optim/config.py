"""The optimizer and schedule config schemas, and their checks.

Both configs may be `ml_collections.ConfigDict`s or plain dicts; missing keys take their
defaults and unknown keys are rejected, so a typo cannot silently train with a default.
"""
import math
import numbers
import re
from typing import Any, Callable, Dict

import ml_collections
from ml_collections import config_dict

from vitoken import settings as settings_lib

OPTIMIZERS = ("adamw", "sgd", "lamb")
DECAYS = ("cosine", "linear", "constant")
DEFAULT_DECAY_REGEX = r"(^|/)kernel$"


def default_optim_config() -> ml_collections.ConfigDict:
  """Optimizer settings. See `make_optimizer` for what each key does."""
  return ml_collections.ConfigDict(dict(
      name="adamw",  # "adamw" | "sgd" | "lamb"
      lr=1e-3,  # base (peak) learning rate; the schedule scales it
      b1=0.9,  # adamw/lamb first-moment decay
      b2=0.999,  # adamw/lamb second-moment decay
      eps=1e-8,  # adamw/lamb denominator epsilon
      momentum=0.9,  # sgd momentum (0 or None: plain sgd)
      nesterov=False,  # sgd: Nesterov momentum; adamw/lamb: NAdam-style first moment
      weight_decay=0.0,  # decoupled, multiplied by the lr (as optax.adamw), on decay_regex only
      decay_regex=DEFAULT_DECAY_REGEX,  # searched in '/'-joined param paths; None: all params
      # Placeholders (None, typed) so command-line overrides like `clip_grad_norm=1.0` work.
      clip_grad_norm=config_dict.placeholder(float),  # None or max global norm of raw grads
      layer_decay=config_dict.placeholder(float),  # None or in (0, 1]: BEiT-style layer lr decay
      # None, or a regex searched in '/'-joined param paths: only matching params are updated
      # (a linear probe trains "^head/"); the others stay exactly as initialised or loaded.
      trainable_regex=config_dict.placeholder(str),
      # ((regex, multiplier), ...): the lr of params whose path matches a regex (the first
      # that does) is multiplied, e.g. DynamicViT fine-tunes its backbone at 0.01x the
      # predictors' lr: ((r"(^|/)dynamicvit/", 1.0), (".*", 0.01)).
      lr_scale=(),
  ))


def default_schedule_config() -> ml_collections.ConfigDict:
  """Learning-rate schedule settings. See `make_schedule`."""
  return ml_collections.ConfigDict(dict(
      warmup_steps=0,  # linear warmup from base_lr * warmup_init_factor to base_lr
      decay="cosine",  # "cosine" | "linear" | "constant" after warmup
      end_factor=0.0,  # final lr = base_lr * end_factor (cosine/linear)
      warmup_init_factor=0.0,  # lr at step 0 = base_lr * warmup_init_factor (with warmup)
  ))


def resolve(config, defaults: ml_collections.ConfigDict, what: str) -> Dict[str, Any]:
  """Merges `config` (ConfigDict, mapping or None) over `defaults` into a plain dict."""
  try:
    return settings_lib.resolve(config, defaults, f"{what} config")
  except TypeError as e:
    raise ValueError(str(e)) from None


def number(cfg, key, what, rule: str, ok: Callable[[float], bool], *, allow_none=False,
            integer=False):
  """Validates cfg[key] as a finite number with ok(value) (described by `rule`); returns it."""
  value = cfg[key]
  if value is None and allow_none:
    return None
  ok_type = isinstance(value, numbers.Integral if integer else numbers.Real)
  # bool is an int subclass, and `warmup_steps=True` is a bug, not a 1.
  if isinstance(value, bool) or not ok_type or not math.isfinite(value) or not ok(value):
    kind = "an integer" if integer else "a number"
    raise ValueError(f"{what} config key {key!r} must be {kind} {rule}"
                     f"{' (or None)' if allow_none else ''}, got {value!r}")
  return int(value) if integer else float(value)


def compile_regex(regex, key: str = "decay_regex"):
  if regex is None:
    return None
  if not isinstance(regex, str):
    raise ValueError(f"optim config key {key!r} must be a string or None, got {regex!r}")
  try:
    return re.compile(regex)
  except re.error as e:
    raise ValueError(f"optim config key {key!r} is not a valid regex ({regex!r}): {e}") from e
