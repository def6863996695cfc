"""Quickstart: a small ViT on cluttered digits (the embedded dataset, built on first use).

  python -m vitoken.train --config=configs/quickstart.py --workdir=/tmp/quickstart
  python -m vitoken.train --config=configs/quickstart.py:runlocal --workdir=/tmp/smoke

Arguments (comma-separated): variant=<ViT variant>, runlocal (a seconds-long smoke test),
tome=<r> (train and evaluate with ToMe merging r tokens per layer), eval_tome=<r> (ToMe for
evaluation only, e.g. on a model trained dense; proportional attention on, as off the shelf),
distill_from=<workdir> (train with the distillation task, that run as the frozen teacher).
"""
from vitoken.train.config import base_config, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, variant="Ti/8", runlocal=False, tome=0, eval_tome=-1, distill_from="")
  c = base_config()
  c.seed = 0
  c.data.name = "cluttered_digits"
  c.data.image_size = 64
  # Sized for 2 CPU cores: ~600 img/s there, >90% test accuracy in about 6 minutes.
  c.model = dict(variant=arg.variant, width=64, depth=4, mlp_dim=128, num_heads=2,
                 pool_type="gap", fc_norm=True, posemb="learn")
  c.batch_size = 128
  c.total_steps = 2400
  c.optim.name = "adamw"
  c.optim.lr = 2e-3
  c.optim.weight_decay = 0.05
  c.schedule.warmup_steps = 200
  c.schedule.decay = "cosine"
  c.schedule.end_factor = 0.02
  c.log_every_steps = 50
  c.eval_every_steps = 600
  c.checkpoint.every_steps = 600

  if arg.tome:
    # Training with ToMe: the reference recommends no proportional attention.
    c.model.token_reduction = {"method": "tome", "r": arg.tome, "prop_attn": False}
  if arg.eval_tome >= 0:
    c.eval_model_overrides = {"token_reduction": {"method": "tome", "r": arg.eval_tome, "prop_attn": True}}

  if arg.distill_from:
    c.task = {"name": "distillation", "teacher": {"path": arg.distill_from},
              "ce_weight": 0.5, "logit_weight": 0.5, "temperature": 1.0, "token_weight": 0.0}

  if arg.runlocal:
    c.model.update(depth=2)
    c.batch_size = 32
    c.total_steps = 12
    c.data.train_examples = 512
    c.data.eval_examples = 256
    c.log_every_steps = 2
    c.eval_every_steps = 6
    c.checkpoint.every_steps = 4
    c.schedule.warmup_steps = 2
  return c
