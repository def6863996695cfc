"""Masked modeling on cluttered digits: MAE, SimMIM or BEiT pretraining, then fine-tuning or a
linear probe that starts from the pretraining run's workdir, and a from-scratch baseline.

  python -m vitoken.train --config=configs/masked_modeling.py:stage=pretrain,method=mae --workdir=/tmp/mae
  python -m vitoken.train --config=configs/masked_modeling.py:stage=pretrain,method=beit,tokenizer=/tmp/tok --workdir=/tmp/beit
  python -m vitoken.train --config=configs/masked_modeling.py:stage=finetune,init=/tmp/mae --workdir=/tmp/mae_ft
  python -m vitoken.train --config=configs/masked_modeling.py:stage=probe,init=/tmp/mae --workdir=/tmp/mae_lin
  python -m vitoken.train --config=configs/masked_modeling.py:stage=scratch --workdir=/tmp/scratch
  python -m vitoken.train --config=configs/masked_modeling.py:stage=finetune,init=/tmp/mae,tome=4 --workdir=/tmp/mae_tome

Arguments (comma-separated):
  stage     pretrain | finetune | probe | scratch
  method    mae | simmim | beit (pretrain)
  tokenizer BEiT's visual tokenizer: the workdir of `python -m vitoken.tokenizers
            --config=configs/visual_tokenizer.py:kind=kmeans|fsq`
  init      the pretraining run's workdir (finetune, probe)
  steps     training steps (default: 3000 pretraining, 1000 otherwise)
  tome      ToMe's r from the fine-tuned model's first block on (finetune, scratch); 0: dense
  runlocal  a seconds-long smoke run

The ImageNet recipes (MAE, SimMIM, BEiT at ViT-B/16) are in configs/imagenet/.

Every stage shares one encoder (`ENCODER`, 8x8 patches of 8 px, six blocks of width 64) so the
fine-tuned and probed models load the pretrained weights as they are. Fine-tuning follows MAE:
global average pooling with a LayerNorm after it (`fc_norm`), a fresh head, layer-wise lr decay
0.75 and drop path 0.1. The linear probe trains only the head (`optim.trainable_regex`) on the
average of the encoder's normalised tokens.
"""
from vitoken.train.config import (
  ConfigError,
  base_config,
  digits_recipe,
  moved_preset_message,
  parse_arg,
  runlocal,
)

STAGES = ("pretrain", "finetune", "probe", "scratch")
METHODS = ("mae", "simmim", "beit")
# The ImageNet preset this file had, and the recipes that replaced it (one per stage).
MOVED_PRESETS = {"im1k": "--config=configs/imagenet/mae_pretrain.py to pretrain, then "
                         "mae_finetune.py:init=<workdir> or mae_linear_probe.py:init=<workdir>"}
# Every stage and method as a smoke run; tests/test_presets.py trains each
# (`<file:arg>` in an argument stands for the workdir of that file's smoke run with that arg).
_MAE = "<masked_modeling.py:stage=pretrain,method=mae,runlocal>"
SMOKE = (
    *(f"stage=pretrain,method={m},runlocal" for m in METHODS if m != "beit"),
    "stage=pretrain,method=beit,tokenizer=<visual_tokenizer.py:kind=kmeans,runlocal>,runlocal",
    f"stage=finetune,init={_MAE},runlocal",
    f"stage=probe,init={_MAE},runlocal",
    "stage=scratch,runlocal",
)
ENCODER = dict(variant="Ti/8", width=64, depth=6, mlp_dim=128, num_heads=2, class_token=True,
               posemb="sincos2d_mae")
TASKS = {
    # Paper settings scaled to 64 px digits: MAE masks 75% of the 64 patches and normalises
    # pixels per patch, with a decoder as light against this encoder as MAE's 8x512 against
    # ViT-L (about 1/12 of the encoder's FLOPs per token; the paper's 1-block decoder
    # fine-tunes as well as 8); SimMIM masks 60% of 16 px cells (2x2 patches, as 32 px over 16).
    "mae": dict(name="mae", mask_ratio=0.75, norm_pix_loss=True, decoder_width=32,
                decoder_depth=1, decoder_heads=2),
    "simmim": dict(name="simmim", mask_patch_size=16, mask_ratio=0.6),
    # BEiT's block-wise masks: 75 of 196 patches scaled to the 8x8 grid (24), at least 16 a
    # block; the tokenizer comes from the `tokenizer` argument.
    "beit": dict(name="beit", min_block_patches=16),
}


def get_config(arg=None):
  arg = parse_arg(arg, stage="pretrain", method="mae", init="", steps=0, tome=0, preset="",
                  tokenizer="", runlocal=False)
  if arg.stage not in STAGES:
    raise ValueError(f"stage must be one of {STAGES}, got {arg.stage!r}")
  if arg.preset:
    raise ConfigError(moved_preset_message(arg.preset, MOVED_PRESETS))
  c = base_config()
  c.model = dict(ENCODER)
  if arg.stage == "pretrain":
    if arg.method not in METHODS:
      raise ValueError(f"method must be one of {METHODS}, got {arg.method!r}")
    c.task = dict(TASKS[arg.method])
    if arg.method == "beit":
      if not arg.tokenizer:
        raise ValueError("method=beit predicts a visual tokenizer's codes: pass tokenizer=<the "
                         "workdir of python -m vitoken.tokenizers>")
      c.task["tokenizer"] = arg.tokenizer
    elif arg.tokenizer:
      raise ValueError(f"tokenizer is BEiT's setting; method={arg.method} takes none")
    digits_recipe(c, total_steps=arg.steps or 3000, eval_every=1000)
    # MAE's pretraining optimizer: AdamW with b2 = 0.95, weight decay 0.05.
    c.optim.b2 = 0.95
    c.optim.lr = 1.5e-3
  else:
    if arg.tome and arg.stage == "probe":
      raise ValueError("tome is a fine-tuning setting; the probe keeps the encoder as pretrained")
    digits_recipe(c, total_steps=arg.steps or 1000, eval_every=500)
    if arg.stage == "probe":
      c.model.update(pool_type="gap", fc_norm=False)
      c.optim.trainable_regex = "^head/"
      c.optim.lr = 1e-2
      c.optim.weight_decay = 0.0
    else:
      c.model.update(pool_type="gap", fc_norm=True, drop_path_rate=0.1)
      if arg.tome:
        c.model.token_reduction = {"method": "tome", "r": int(arg.tome)}
    if arg.stage in ("finetune", "probe"):
      if not arg.init:
        raise ValueError(f"stage={arg.stage} starts from a pretraining run: pass init=<its workdir>")
      c.init_from.path = arg.init
      c.init_from.subtree = "encoder"
      c.init_from.exclude = "^(head|fc_norm)/"
      if arg.stage == "finetune":
        c.optim.layer_decay = 0.75
  if arg.runlocal:
    runlocal(c)
  return c

