"""Optimizers and learning-rate schedules for training and fine-tuning:

    tx, schedule = optim.make_optimizer(config.optim, config.schedule, params, total_steps,
                                        depth=model.depth, groups=model.layer_decay_groups())

`config` holds the schemas, `schedules` the lr schedule, `param_groups` which parameter
trains, decays and sits in which layer (by path), `transforms` the update transformations
optax lacks, `chain` the optimizer. One step on scanned params equals one step on the same
params in the unscanned layout, also for LAMB and with layer-wise lr decay.
"""
from vitoken.engine.optim.chain import make_optimizer
from vitoken.engine.optim.config import (
                                         DECAYS,
                                         DEFAULT_DECAY_REGEX,
                                         OPTIMIZERS,
                                         default_optim_config,
                                         default_schedule_config,
)
from vitoken.engine.optim.param_groups import (
                                         SCANNED_BLOCKS,
                                         infer_depth,
                                         layer_decay_multipliers,
                                         lr_scale_labels,
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
