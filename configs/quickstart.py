"""Quickstart: a small ViT on cluttered digits (the embedded dataset, built on first use).

  python -m vitoken.train --config=configs/quickstart.py --workdir=/tmp/quickstart
  python -m vitoken.train --config=configs/quickstart.py:runlocal --workdir=/tmp/smoke

Arguments (comma-separated): variant=<ViT variant>, runlocal (a seconds-long smoke test),
tome=<r> (train and evaluate with ToMe merging r tokens per layer), eval_tome=<r> (ToMe for
evaluation only, e.g. on a model trained dense; proportional attention on, as off the shelf),
distill_from=<workdir> (train with the distillation task, that run as the frozen teacher).
"""
from vitoken.train.config import base_config, digits_recipe, parse_arg, runlocal

# The smoke run tests/test_presets.py trains (the options have their own tests).
SMOKE = ("runlocal",)


def get_config(arg=None):
  arg = parse_arg(arg, variant="Ti/8", runlocal=False, tome=0, eval_tome=-1, distill_from="")
  c = base_config()
  c.seed = 0
  # Sized for 2 CPU cores: ~600 img/s there, >90% test accuracy in about 6 minutes.
  c.model = dict(variant=arg.variant, width=64, depth=4, mlp_dim=128, num_heads=2,
                 pool_type="gap", fc_norm=True, posemb="learn")
  digits_recipe(c, total_steps=2400, eval_every=600)

  if arg.tome:
    # Training with ToMe, proportional attention on: the reference trained its checkpoints so
    # (its README; off is for MAE models used off the shelf).
    c.model.token_reduction = {"method": "tome", "r": arg.tome, "prop_attn": True}
  if arg.eval_tome >= 0:
    c.eval_model_overrides = {"token_reduction": {"method": "tome", "r": arg.eval_tome, "prop_attn": True}}

  if arg.distill_from:
    c.task = {"name": "distillation", "teacher": {"path": arg.distill_from},
              "ce_weight": 0.5, "logit_weight": 0.5, "temperature": 1.0, "token_weight": 0.0}

  if arg.runlocal:
    c.model.update(depth=2)
    runlocal(c)
  return c
