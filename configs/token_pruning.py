"""Token pruning on cluttered digits: top-k by class attention, EViT, DynamicViT, and pruning
followed by merging (ToMe), each fine-tuned from (or, for top-k, applied to) one dense model.

  python -m vitoken.train --config=configs/token_pruning.py:method=dense --workdir=/tmp/dense
  python -m vitoken.train --config=configs/token_pruning.py:method=evit,keep=0.7,init=/tmp/dense --workdir=/tmp/evit
  python -m vitoken.train --config=configs/token_pruning.py:method=dynamicvit,keep=0.7,init=/tmp/dense,teacher=/tmp/dense --workdir=/tmp/dyvit
  python -m vitoken.train --config=configs/token_pruning.py:method=evit_tome,init=/tmp/dense --workdir=/tmp/combo

Arguments (comma-separated):
  method    dense | topk | evit | dynamicvit | evit_tome | topk_tome
  keep      the keep rate ρ (EViT and top-k: of the tokens present at each pruning block;
            DynamicViT: ρ, ρ², ρ³ of the initial tokens at its three stages)
  fuse      EViT's fused token of the inattentive tokens (default on, as the paper)
  shrink    EViT's keep-rate schedule as start/end fractions of training, e.g. shrink=0.1/0.5:
            keep everything until 10%, then a cosine from 1 down to ρ at 50% (static token
            counts per phase: `levels` recompiles)
  levels    phases of the shrink schedule (default 4)
  tome      ToMe's r in the blocks after the last pruning block (evit_tome, topk_tome)
  init      a dense run's workdir to fine-tune from, as EViT and DynamicViT start from a
            trained DeiT (without it a method trains from scratch; dense with init continues
            training, the fair baseline for fine-tuned methods)
  teacher   the dense teacher's workdir (dynamicvit: token and logit distillation)
  steps     training steps (default 3000 dense, 1000 fine-tuning)
  runlocal  a seconds-long smoke run

The model (8x8 patches of 8 px on 64 px digits, 64 patch tokens plus a class token, eight
blocks of width 64) prunes at blocks 2, 4 and 6, where DeiT-S prunes at 3, 6 and 9 of 12.
"""
from vitoken.train.config import base_config, digits_recipe, parse_arg, runlocal

METHODS = ("dense", "topk", "evit", "dynamicvit", "evit_tome", "topk_tome")
MODEL = dict(variant="Ti/8", width=64, depth=8, mlp_dim=128, num_heads=2, pool_type="tok",
             posemb="learn")
PRUNE_LAYERS = (2, 4, 6)  # depth 8 scaled from the papers' 3, 6, 9 of 12
# DynamicViT's loss weights (raoyongming/DynamicViT main.py): labels 1, ratio 2, and 0.5 for
# each of the logit and token distillations from the dense teacher.
DYNAMICVIT_TASK = dict(name="distillation", ce_weight=1.0, logit_weight=0.5, token_weight=0.5,
                       temperature=1.0)
# Every method as a smoke run; tests/test_presets.py trains each (`<file:arg>` in an argument
# stands for the workdir of that file's smoke run with that arg).
_DENSE = "<token_pruning.py:method=dense,runlocal>"
SMOKE = (*(f"method={m},runlocal" for m in METHODS if m != "dynamicvit"),
         f"method=dynamicvit,init={_DENSE},teacher={_DENSE},runlocal")


def token_reduction(method, keep=0.7, fuse=True, shrink="", levels=4, tome=4, depth=8):
  """The model's `token_reduction` for a method name (None for dense)."""
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  layers = list(PRUNE_LAYERS)
  if method == "dense":
    return None
  if method == "dynamicvit":
    return {"method": "dynamicvit", "keep_rate": float(keep), "layers": layers}
  if method.startswith("topk"):
    prune = {"method": "topk", "keep_rate": float(keep), "layers": layers}
  else:
    prune = {"method": "evit", "keep_rate": float(keep), "layers": layers, "fuse_token": bool(fuse)}
    if shrink:
      start, end = (float(v) for v in str(shrink).split("/"))
      prune["shrink"] = (start, end)
      prune["shrink_levels"] = int(levels)
  if not method.endswith("_tome"):
    return prune
  # Prune early, merge late: pruning at the first two blocks, then ToMe in every later block.
  prune["layers"] = layers[:2]
  r = [0] * (layers[1] + 1) + [int(tome)] * (depth - layers[1] - 1)
  return [prune, {"method": "tome", "r": r}]


def get_config(arg=None):
  arg = parse_arg(arg, method="dense", keep=0.7, fuse=True, shrink="", levels=4, tome=4,
                  init="", teacher="", steps=0, runlocal=False)
  c = base_config()
  c.model = dict(MODEL)
  reduction = token_reduction(arg.method, arg.keep, arg.fuse, arg.shrink, arg.levels, arg.tome,
                              MODEL["depth"])
  if reduction is not None:
    c.model.token_reduction = reduction
  digits_recipe(c, total_steps=arg.steps or (1000 if arg.init else 3000), eval_every=1000)
  if arg.init:
    c.init_from.path = arg.init
    if arg.method == "dynamicvit":
      # The predictors start fresh and train at the full lr, the pretrained backbone at 0.01x
      # (the reference's lr_scale).
      c.init_from.exclude = r"(^|/)dynamicvit/"
      c.optim.lr_scale = ((r"(^|/)dynamicvit/", 1.0), (".*", 0.01))
    # Fine-tuning, as EViT and DynamicViT start from a trained DeiT: a lower peak, short warmup.
    c.optim.lr = 5e-4
    c.schedule.warmup_steps = 100
  if arg.method == "dynamicvit":
    # The distillation weights need a teacher; the task names the fix when none is given.
    c.task = dict(DYNAMICVIT_TASK, teacher=dict(path=arg.teacher) if arg.teacher else None)
  elif arg.teacher:
    raise ValueError("teacher is for method=dynamicvit")
  if arg.runlocal:
    runlocal(c, checkpoint_every=6)
  return c
