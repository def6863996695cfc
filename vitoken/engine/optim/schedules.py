"""Learning-rate schedules: warmup, then cosine, linear or constant decay."""
import math
import numbers

import jax.numpy as jnp
import optax

from vitoken.engine.optim.config import DECAYS, default_schedule_config, number, resolve


def make_schedule(schedule_config, base_lr: float, total_steps: int) -> optax.Schedule:
  """Returns `step -> learning rate` (jit-friendly; `step` is the optimizer step count).

  Steps [0, warmup_steps) warm up linearly from base_lr * warmup_init_factor towards base_lr
  (reaching it at step warmup_steps). Over the remaining total_steps - warmup_steps steps the
  lr then follows `decay`: "cosine" (half cosine) or "linear" from base_lr down to
  base_lr * end_factor, or "constant" (stays at base_lr; end_factor is not used). Steps past
  total_steps hold the final value.
  """
  cfg = resolve(schedule_config, default_schedule_config(), "schedule")
  if isinstance(base_lr, bool) or not isinstance(base_lr, numbers.Real) or not (
      math.isfinite(base_lr) and base_lr >= 0):
    raise ValueError(f"base_lr must be a finite number >= 0, got {base_lr!r}")
  if (isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral)
      or total_steps < 1):
    raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
  total_steps = int(total_steps)
  warmup = number(cfg, "warmup_steps", "schedule", ">= 0", lambda v: v >= 0, integer=True)
  if warmup > total_steps:
    raise ValueError(f"schedule config key 'warmup_steps' ({warmup}) must be <= total_steps "
                     f"({total_steps})")
  decay = cfg["decay"]
  if decay not in DECAYS:
    raise ValueError(f"schedule config key 'decay' must be one of {DECAYS}, got {decay!r}")
  end_factor = number(cfg, "end_factor", "schedule", ">= 0", lambda v: v >= 0)
  init_factor = number(cfg, "warmup_init_factor", "schedule", ">= 0", lambda v: v >= 0)

  base_lr = float(base_lr)
  # warmup_steps == total_steps leaves no step after warmup; max() keeps optax's decay length
  # positive there (the lr then reaches its end value one step past total_steps).
  decay_steps = max(total_steps - warmup, 1)
  if decay == "cosine":
    after = optax.cosine_decay_schedule(base_lr, decay_steps, alpha=end_factor)
  elif decay == "linear":
    after = optax.linear_schedule(base_lr, base_lr * end_factor, decay_steps)
  else:
    after = optax.constant_schedule(base_lr)
  if warmup > 0:
    after = optax.join_schedules(
        [optax.linear_schedule(base_lr * init_factor, base_lr, warmup), after], [warmup])

  def schedule(step):
    return jnp.asarray(after(jnp.asarray(step, jnp.float32)), jnp.float32)

  return schedule
