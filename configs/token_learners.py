"""Token learners on cluttered digits (TokenLearner v1/v1.1, TokenFuser, LookupViT), and
scenic's ImageNet TokenLearner setting as named presets.

  python -m vitoken.train --config=configs/token_learners.py:method=learner,tokens=8,loc=4 --workdir=/tmp/tl8
  python -m vitoken.train --config=configs/token_learners.py:method=fuser,tokens=8,loc=2 --workdir=/tmp/fuser
  python -m vitoken.train --config=configs/token_learners.py:method=lookup,grid=4 --workdir=/tmp/lookup
  python -m vitoken.train --config=configs/token_learners.py:preset=im1k_s8 --workdir=gs://...

Arguments (comma-separated):
  method   dense | learner | fuser | lookup
  tokens   S, the learned tokens (learner, fuser)
  loc      the block the learner runs before (learner), or the first fused block (fuser)
  version  v1.1 | v1 (TokenLearner module)
  grid     LookupViT's compressed grid side (from the 8x8 patch grid here)
  grids    LookupViT training grids drawn per step, e.g. grids=3/4 (one model, several grids)
  eval_grid  evaluate LookupViT at another compressed grid (same parameters)
  preset   im1k_s8 | im1k_s16: scenic's ImageNet TokenLearner (B/16, 224 px, gap, no class
           token, S = 8 or 16 before block 9 of 12, v1.1, Adam, 90 epochs)
  runlocal a seconds-long smoke run; with a preset, its recipe at toy size on cluttered digits
           (add --config.data.name=imagenet2012 --config.data.eval_split=validation to read
           ImageNet instead)
"""
from vitoken.train.config import base_config, digits_recipe, parse_arg, runlocal

METHODS = ("dense", "learner", "fuser", "lookup")
PRESETS = {"im1k_s8": 8, "im1k_s16": 16}
# Every method and preset as a smoke run (tests/test_presets.py trains each).
SMOKE = (*(f"method={m},runlocal" for m in METHODS), *(f"preset={p},runlocal" for p in PRESETS))


def token_reduction(method, tokens=8, loc=4, version="v1.1", grid=4, grids=""):
  """The model's `token_reduction` entry for a method name (None for dense)."""
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if method == "dense":
    return None
  if method == "lookup":
    entry = {"method": "lookup", "grid": int(grid)}
    if grids:
      entry["train_grids"] = [int(g) for g in str(grids).split("/")]
    return entry
  return {"method": "token_learner", "num_tokens": int(tokens), "loc": int(loc),
          "version": version, "mode": method}


def get_config(arg=None):
  arg = parse_arg(arg, method="learner", tokens=8, loc=4, version="v1.1", grid=4, grids="",
                  eval_grid=-1, preset="", runlocal=False)
  c = base_config()
  if arg.preset:
    return _imagenet_preset(c, arg)
  # 8x8 = 64 patch tokens of 8 px, six blocks: big enough that where tokens are learned matters,
  # small enough that every method trains in minutes on 2 CPU cores.
  c.model = dict(variant="Ti/8", width=64, depth=6, mlp_dim=128, num_heads=2, pool_type="gap",
                 fc_norm=True, posemb="learn")
  reduction = token_reduction(arg.method, arg.tokens, arg.loc, arg.version, arg.grid, arg.grids)
  if reduction is not None:
    c.model.token_reduction = reduction
  if arg.eval_grid > 0:
    if arg.method != "lookup":
      raise ValueError("eval_grid is a LookupViT setting (method=lookup)")
    c.eval_model_overrides = {"token_reduction": dict(reduction, grid=int(arg.eval_grid))}
  digits_recipe(c, total_steps=2000, eval_every=1000)
  if arg.runlocal:
    runlocal(c, checkpoint_every=6)
  return c


def _imagenet_preset(c, arg):
  """scenic's `im1k_token_learner_config.py`: B/16 with TokenLearner v1.1 before block 9."""
  if arg.preset not in PRESETS:
    raise ValueError(f"unknown preset {arg.preset!r}; presets: {sorted(PRESETS)}")
  c.data.name = "imagenet2012"
  c.data.eval_split = "validation"
  c.data.image_size = 224
  c.data.random_resized_crop = True
  c.data.flip = True
  c.model = dict(variant="B/16", pool_type="gap", class_token=False, drop_path_rate=0.1,
                 posemb="learn",
                 token_reduction={"method": "token_learner", "num_tokens": PRESETS[arg.preset],
                                  "loc": 9, "version": "v1.1", "mode": "learner"})
  c.batch_size = 4096
  steps_per_epoch = 1281167 // c.batch_size
  c.total_steps = 90 * steps_per_epoch
  c.optim.name = "adamw"  # scenic: Adam (0.9, 0.999) with weight decay 0.3, clipped at 1.0
  c.optim.lr = 5e-3
  c.optim.weight_decay = 0.3
  c.optim.clip_grad_norm = 1.0
  c.schedule.warmup_steps = 10_000
  c.schedule.decay = "linear"
  c.schedule.end_factor = 1e-5 / 5e-3
  c.log_every_steps = 100
  c.eval_every_steps = 1000
  c.checkpoint.every_steps = 5000
  if arg.runlocal:
    # The recipe at toy size on the embedded cluttered digits, so that the smoke run needs no
    # ImageNet: 16 patches of 16 px, two blocks, the learner before the second.
    runlocal(c, checkpoint_every=6)
    c.data.update(name="cluttered_digits", eval_split="test", image_size=64, mean=(0.5,),
                  std=(0.5,))
    c.model.update(width=32, depth=2, mlp_dim=64, num_heads=2)
    c.model.token_reduction.loc = 1
  return c
