"""Token learners on cluttered digits (TokenLearner v1/v1.1, TokenFuser, LookupViT). scenic's
ImageNet TokenLearner recipe is configs/imagenet/token_learner.py.

  python -m vitoken.train --config=configs/token_learners.py:method=learner,tokens=8,loc=4 --workdir=/tmp/tl8
  python -m vitoken.train --config=configs/token_learners.py:method=fuser,tokens=8,loc=2 --workdir=/tmp/fuser
  python -m vitoken.train --config=configs/token_learners.py:method=lookup,grid=4 --workdir=/tmp/lookup

Arguments (comma-separated):
  method   dense | learner | fuser | lookup
  tokens   S, the learned tokens (learner, fuser)
  loc      the block the learner runs before (learner), or the first fused block (fuser)
  version  v1.1 | v1 (TokenLearner module)
  grid     LookupViT's compressed grid side (from the 8x8 patch grid here)
  grids    LookupViT training grids drawn per step, e.g. grids=3/4 (one model, several grids)
  eval_grid  evaluate LookupViT at another compressed grid (same parameters)
  runlocal a seconds-long smoke run
"""
from vitoken.train.config import (
  ConfigError,
  base_config,
  digits_recipe,
  moved_preset_message,
  parse_arg,
  runlocal,
)

METHODS = ("dense", "learner", "fuser", "lookup")
# The ImageNet presets this file had, and the recipes that replaced them.
MOVED_PRESETS = {"im1k_s8": "--config=configs/imagenet/token_learner.py:tokens=8",
                 "im1k_s16": "--config=configs/imagenet/token_learner.py:tokens=16"}
# Every method as a smoke run (tests/test_presets.py trains each).
SMOKE = tuple(f"method={m},runlocal" for m in METHODS)


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
  if arg.preset:
    raise ConfigError(moved_preset_message(arg.preset, MOVED_PRESETS))
  c = base_config()
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

