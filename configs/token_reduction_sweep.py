"""Every token method on one backbone and one recipe: the runs of
experiments/token_reduction_sweep.py, each launchable on its own.

  python -m vitoken.train --config=configs/token_reduction_sweep.py:method=dense --workdir=/tmp/sweep/dense
  python -m vitoken.train --config=configs/token_reduction_sweep.py:method=evit,keep=0.7,init=/tmp/sweep/dense --workdir=/tmp/sweep/evit70
  python -m vitoken.train --config=configs/token_reduction_sweep.py:method=mae_pretrain --workdir=/tmp/sweep/mae
  python -m vitoken.train --config=configs/token_reduction_sweep.py:method=mae,r=8,init=/tmp/sweep/mae --workdir=/tmp/sweep/mae_tome8

The backbone: 8x8 patches of 8 px on the 64 px cluttered digits (64 patch tokens and a class
token, which every method can use), six blocks of width 64, the class token's output as the
feature (as DeiT, which EViT, DynamicViT and top-k prune). The recipe: a dense model trained
from scratch (`method=dense` without `init`), then every method fine-tuned from it for the same
number of steps at a fine-tuning lr, as EViT and DynamicViT start from a trained DeiT; `dense`
with `init` is the same fine-tune without reduction, the baseline every row is compared to.
MAE pretrains the same encoder as long as the dense model trains, then fine-tunes it (ToMe on
or off) for half as long: MAE's own two-stage recipe at this scale.

Arguments (comma-separated):
  method    dense | tome | token_learner | token_fuser | lookup | evit | dynamicvit |
            evit_tome | mae_pretrain | mae   (training-free top-k and off-the-shelf ToMe are
            evaluations of the fine-tuned dense run: the experiment applies them)
  r         ToMe's tokens merged per block (tome, mae; evit_tome: in the blocks after pruning)
  keep      the keep rate ρ (evit, dynamicvit, evit_tome)
  tokens    S learned tokens (token_learner, token_fuser)
  loc       the block the learner runs before (token_learner), the first fused block (fuser)
  grid      LookupViT's compressed grid side, of the 8x8 patch grid
  init      the dense run's workdir (every fine-tune) or the MAE pretraining run's (mae)
  teacher   DynamicViT's dense teacher (default: init)
  backbone_lr  DynamicViT's lr multiplier of the pretrained backbone (default 0.01, the
            reference's; its predictors train at the full lr)
  seed      the run's seed (data order, dropout, the new modules' init)
  steps     override the training steps
  runlocal  a seconds-long smoke run
"""
from vitoken.train.config import base_config, digits_recipe, parse_arg, runlocal

METHODS = ("dense", "tome", "token_learner", "token_fuser", "lookup", "evit", "dynamicvit",
           "evit_tome", "mae_pretrain", "mae")
BACKBONE = dict(variant="Ti/8", width=64, depth=6, mlp_dim=128, num_heads=2, pool_type="tok",
                posemb="learn")
# DeiT-S prunes before blocks 3, 6 and 9 of 12; six blocks: after two dense blocks, then at
# each of the next three.
PRUNE_LAYERS = (2, 3, 4)
BASE_STEPS = 3000  # dense from scratch, MAE pretraining
FINETUNE_STEPS = 500  # every method from the dense run
MAE_FINETUNE_STEPS = 1000
FINETUNE_LR = 5e-4
# Parameters a method adds to the dense ViT: they start fresh when fine-tuning from it.
NEW_PARAMS = {"token_learner": "token_learner", "token_fuser": "token_learner",
              "lookup": "lookup", "dynamicvit": "dynamicvit"}
# DynamicViT's loss weights (raoyongming/DynamicViT main.py): labels 1, ratio 2, and 0.5 for
# each of the logit and token distillations from the dense teacher.
DYNAMICVIT_TASK = dict(name="distillation", ce_weight=1.0, logit_weight=0.5, token_weight=0.5,
                       temperature=1.0)
MAE_TASK = dict(name="mae", mask_ratio=0.75, norm_pix_loss=True, decoder_width=32,
                decoder_depth=1, decoder_heads=2)
_DENSE = "<token_reduction_sweep.py:method=dense,runlocal>"
SMOKE = ("method=dense,runlocal", f"method=token_learner,init={_DENSE},runlocal",
         f"method=dynamicvit,init={_DENSE},runlocal", "method=mae_pretrain,runlocal",
         "method=mae,r=4,init=<token_reduction_sweep.py:method=mae_pretrain,runlocal>,runlocal")


def token_reduction(method, *, r=8, keep=0.7, tokens=8, loc=3, grid=4):
  """The backbone's `token_reduction` for a method and budget (None: dense)."""
  layers = list(PRUNE_LAYERS)
  if method in ("dense", "mae_pretrain") or (method == "mae" and not r):
    return None
  if method in ("tome", "mae"):
    # Trained with ToMe, proportional attention on: the reference trained its checkpoints so
    # (its README); off = for MAE models used off the shelf.
    return {"method": "tome", "r": int(r), "prop_attn": True}
  if method in ("token_learner", "token_fuser"):
    return {"method": "token_learner", "num_tokens": int(tokens), "loc": int(loc),
            "version": "v1.1", "mode": "learner" if method == "token_learner" else "fuser"}
  if method == "lookup":
    return {"method": "lookup", "grid": int(grid)}
  if method == "evit":
    return {"method": "evit", "keep_rate": float(keep), "layers": layers, "fuse_token": True}
  if method == "dynamicvit":
    return {"method": "dynamicvit", "keep_rate": float(keep), "layers": layers}
  if method == "evit_tome":
    # Prune early, merge late: EViT at the first two pruning blocks, ToMe in every later one.
    depth = BACKBONE["depth"]
    prune = {"method": "evit", "keep_rate": float(keep), "layers": layers[:2], "fuse_token": True}
    return [prune, {"method": "tome", "r": [0] * (layers[1] + 1) + [int(r)] * (depth - layers[1] - 1),
                    "prop_attn": True}]
  raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def get_config(arg=None):
  arg = parse_arg(arg, method="dense", r=8, keep=0.7, tokens=8, loc=3, grid=4, init="",
                  teacher="", backbone_lr=0.01, seed=0, steps=0, runlocal=False)
  if arg.method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {arg.method!r}")
  needs_init = arg.method not in ("dense", "mae_pretrain")
  if needs_init and not arg.init:
    raise ValueError(f"method={arg.method} fine-tunes a trained run: pass init=<its workdir> "
                     "(the dense run; for mae, the mae_pretrain run)")
  if arg.method == "mae_pretrain" and arg.init:
    raise ValueError("method=mae_pretrain trains from scratch; it takes no init")
  c = base_config()
  c.seed = int(arg.seed)
  c.model = dict(BACKBONE)
  reduction = token_reduction(arg.method, r=arg.r, keep=arg.keep, tokens=arg.tokens, loc=arg.loc,
                              grid=arg.grid)
  if reduction is not None:
    c.model.token_reduction = reduction
  steps = arg.steps or {"dense": FINETUNE_STEPS if arg.init else BASE_STEPS,
                        "mae_pretrain": BASE_STEPS, "mae": MAE_FINETUNE_STEPS}.get(arg.method,
                                                                                  FINETUNE_STEPS)
  digits_recipe(c, total_steps=steps, eval_every=steps if steps <= FINETUNE_STEPS else steps // 2)
  if arg.method == "mae_pretrain":
    c.task = dict(MAE_TASK)
    c.model.pool_type = "none"  # the pretraining encoder ends at its LayerNorm
    c.optim.update(b2=0.95, lr=1.5e-3)  # MAE's pretraining AdamW
  if arg.init:
    c.init_from.path = arg.init
    if arg.method == "mae":
      c.init_from.subtree = "encoder"
      c.init_from.exclude = "^head/"
      c.optim.layer_decay = 0.75  # MAE's fine-tuning
      c.model.drop_path_rate = 0.1
    else:
      if arg.method in NEW_PARAMS:
        c.init_from.exclude = rf"(^|/){NEW_PARAMS[arg.method]}/"
      c.optim.lr = FINETUNE_LR
      c.schedule.warmup_steps = 50
    if arg.method == "dynamicvit":
      # The predictors start fresh at the full lr, the pretrained backbone at 0.01x (the
      # reference's lr_scale), with the dense run as the distillation teacher.
      c.optim.lr_scale = ((r"(^|/)dynamicvit/", 1.0), (".*", float(arg.backbone_lr)))
      c.task = dict(DYNAMICVIT_TASK, teacher=dict(path=arg.teacher or arg.init))
  if (arg.teacher or arg.backbone_lr != 0.01) and arg.method != "dynamicvit":
    raise ValueError("teacher and backbone_lr are for method=dynamicvit")
  if arg.runlocal:
    runlocal(c, checkpoint_every=6)
    c.schedule.warmup_steps = 2
  return c
