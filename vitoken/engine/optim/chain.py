"""The optimizer: an optax chain built from the optim and schedule configs.

  [global-norm clipping] -> adaptive/momentum scaling -> decoupled weight decay (masked)
  -> [LAMB trust ratio] -> [layer-wise lr decay] -> [lr_scale] -> learning-rate schedule,
  all inside [freezing of the params `trainable_regex` does not match].
"""
from typing import Mapping, Optional, Tuple

import jax
import optax

from vitoken.engine.optim.config import (
  OPTIMIZERS,
  compile_regex,
  default_optim_config,
  number,
  resolve,
)
from vitoken.engine.optim.param_groups import (
  check_layer_decay,
  check_lr_scale,
  layer_decay_multipliers,
  map_with_names,
  resolve_depth,
  trainable_mask,
  weight_decay_mask,
)
from vitoken.engine.optim.schedules import make_schedule
from vitoken.engine.optim.transforms import (
  scale_by_layer_decay,
  scale_by_lr_rules,
  scale_by_trust_ratio_per_layer,
  train_only,
)


def make_optimizer(optim_config, schedule_config, params, total_steps: int, *,
                   depth: Optional[int] = None, groups: Optional[Mapping[str, str]] = None
                   ) -> Tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds (optax transformation, lr schedule) from the two configs.

  Optimizers (`name`):
    adamw: optax.adamw(schedule, b1, b2, eps, weight_decay, mask) plus the extras below.
    lamb:  optax.lamb(schedule, b1, b2, eps, weight_decay, mask); the trust ratio is taken per
           layer slice for scanned `blocks` leaves.
    sgd:   optax.sgd(schedule, momentum, nesterov) with *decoupled* weight decay (SGDW,
           Loshchilov & Hutter): wd * param is added after the momentum, before the lr, so
           the step is -lr * (momentum_buffer + wd * param). It is not L2 (it never enters the
           momentum buffer), and, as in optax.adamw, the decay is scaled by the scheduled lr.
  Weight decay applies only where `decay_regex` matches (re.search) the leaf's '/'-joined
  path (None: every leaf). `nesterov` is Nesterov momentum for sgd and the NAdam-style first
  moment of optax.scale_by_adam for adamw/lamb.

  Extras, in chain order:
    clip_grad_norm: global-norm clipping of the raw gradients, before anything else.
    layer_decay:    updates (after adaptive scaling, weight decay and the LAMB trust ratio,
                    which would otherwise cancel it) are multiplied by
                    layer_decay ** (depth + 1 - layer_id), before the lr; `depth` is inferred
                    from `params` unless given.
    lr_scale:       ((regex, multiplier), ...): updates are multiplied by the first matching
                    rule's multiplier (1 where none matches), before the lr.
    trainable_regex: params whose path it does not match get zero updates and no optimizer
                     state (`optax.multi_transform` with `optax.set_to_zero`).

  `params` is only read for its structure (weight-decay mask check, depth), so abstract
  params (jax.eval_shape) do; the transformation then works on that tree's layout.
  """
  cfg = resolve(optim_config, default_optim_config(), "optim")
  name = cfg["name"]
  if name not in OPTIMIZERS:
    raise ValueError(f"optim config key 'name' must be one of {OPTIMIZERS}, got {name!r}")
  lr = number(cfg, "lr", "optim", ">= 0", lambda v: v >= 0)
  b1 = number(cfg, "b1", "optim", "in [0, 1)", lambda v: 0 <= v < 1)
  b2 = number(cfg, "b2", "optim", "in [0, 1)", lambda v: 0 <= v < 1)
  eps = number(cfg, "eps", "optim", ">= 0", lambda v: v >= 0)
  momentum = number(cfg, "momentum", "optim", "in [0, 1)", lambda v: 0 <= v < 1,
                     allow_none=True)
  if not isinstance(cfg["nesterov"], bool):
    raise ValueError(f"optim config key 'nesterov' must be a bool, got {cfg['nesterov']!r}")
  nesterov = cfg["nesterov"]
  weight_decay = number(cfg, "weight_decay", "optim", ">= 0", lambda v: v >= 0)
  clip = number(cfg, "clip_grad_norm", "optim", "> 0", lambda v: v > 0, allow_none=True)
  layer_decay = cfg["layer_decay"]
  if layer_decay is not None:
    layer_decay = check_layer_decay(layer_decay)
  decay_regex = cfg["decay_regex"]
  pattern = compile_regex(decay_regex)
  if weight_decay > 0 and pattern is not None:
    if not any(jax.tree.leaves(weight_decay_mask(params, decay_regex))):
      raise ValueError(f"optim config key 'decay_regex' ({decay_regex!r}) matches no parameter, "
                       f"so weight_decay={weight_decay} would do nothing")

  trainable = cfg["trainable_regex"]
  if trainable is not None and not any(jax.tree.leaves(trainable_mask(params, trainable))):
    raise ValueError(f"optim config key 'trainable_regex' ({trainable!r}) matches no parameter, "
                     "so nothing would train")

  schedule = make_schedule(schedule_config, lr, total_steps)

  if weight_decay > 0:
    decay = [optax.add_decayed_weights(
        weight_decay, mask=lambda tree: weight_decay_mask(tree, decay_regex))]
  else:
    decay = []

  chain = []
  if clip is not None:
    chain.append(optax.clip_by_global_norm(clip))
  if name == "adamw":
    chain += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps, nesterov=nesterov), *decay]
  elif name == "lamb":
    chain += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps, nesterov=nesterov), *decay,
              scale_by_trust_ratio_per_layer()]
  else:  # sgd
    if momentum:
      chain.append(optax.trace(decay=momentum, nesterov=nesterov))
    chain += decay
  if layer_decay is not None:
    # Validates the tree now (unknown top-level names, depth) rather than at the first step.
    layer_decay_multipliers(params, layer_decay, depth, groups)
    chain.append(scale_by_layer_decay(layer_decay, resolve_depth(params, depth), groups))
  lr_rules = check_lr_scale(cfg["lr_scale"])
  if lr_rules:
    for pattern, _ in lr_rules:
      if not any(jax.tree.leaves(map_with_names(lambda n, _, p=pattern: bool(p.search(n)), params))):
        raise ValueError(f"optim config key 'lr_scale': regex {pattern.pattern!r} matches no "
                         "parameter")
    chain.append(scale_by_lr_rules(cfg["lr_scale"]))
  chain.append(optax.scale_by_learning_rate(schedule))
  tx = optax.chain(*chain)
  if trainable is not None:
    tx = train_only(tx, trainable)
  return tx, schedule
