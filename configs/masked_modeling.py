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
  preset    im1k: MAE's ImageNet recipe for ViT-B/16 (method=mae; pretrain, finetune, probe)
  runlocal  a seconds-long smoke run; with a preset, its recipe at toy size on cluttered digits
            (add --config.data.name=imagenet2012 --config.data.eval_split=validation to read
            ImageNet instead)

Every stage shares one encoder (`ENCODER`, 8x8 patches of 8 px, six blocks of width 64) so the
fine-tuned and probed models load the pretrained weights as they are. Fine-tuning follows MAE:
global average pooling with a LayerNorm after it (`fc_norm`), a fresh head, layer-wise lr decay
0.75 and drop path 0.1. The linear probe trains only the head (`optim.trainable_regex`) on the
average of the encoder's normalised tokens.
"""
from vitoken.train.config import base_config, digits_recipe, parse_arg, runlocal

STAGES = ("pretrain", "finetune", "probe", "scratch")
METHODS = ("mae", "simmim", "beit")
PRESETS = ("im1k",)
# Every stage, method and preset stage as a smoke run; tests/test_presets.py trains each
# (`<file:arg>` in an argument stands for the workdir of that file's smoke run with that arg).
_MAE = "<masked_modeling.py:stage=pretrain,method=mae,runlocal>"
SMOKE = (
    *(f"stage=pretrain,method={m},runlocal" for m in METHODS if m != "beit"),
    "stage=pretrain,method=beit,tokenizer=<visual_tokenizer.py:kind=kmeans,runlocal>,runlocal",
    f"stage=finetune,init={_MAE},runlocal",
    f"stage=probe,init={_MAE},runlocal",
    "stage=scratch,runlocal",
    *(f"stage=pretrain,preset={p},runlocal" for p in PRESETS),
    *(f"stage={s},preset={p},init=<masked_modeling.py:stage=pretrain,preset={p},runlocal>,runlocal"
      for p in PRESETS for s in STAGES if s not in ("pretrain", "scratch")),
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
  c = base_config()
  if arg.preset:
    return _imagenet_preset(c, arg)
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


IMAGENET_TRAIN = 1_281_167


def _imagenet_preset(c, arg):
  """MAE's ImageNet-1k recipe for ViT-B/16 (He et al., appendix A; the reference's defaults).

  Pretraining: 800 epochs of 4096, AdamW (0.9, 0.95), weight decay 0.05, lr 1.5e-4 * 4096/256
  with 40 warmup epochs then cosine, random-resized crops (scale 0.2-1) and flips, mask ratio
  0.75, normalised-pixel loss, decoder 8 x 512 with 16 heads. Fine-tuning: 100 epochs of 1024,
  lr 5e-4 * 1024/256, layer decay 0.65, weight decay 0.05, drop path 0.1, 5 warmup epochs,
  mixup 0.8 / cutmix 1.0, label smoothing 0.1, global pooling with fc_norm. vitoken has no
  RandAugment or random erasing yet, which MAE's fine-tuning also uses. The linear probe reads
  the class token after the encoder's LayerNorm, as MAE's, for 90 epochs of 16384 with 10
  warmup epochs, but trains the head with AdamW (lr 1e-3): MAE's probe uses LARS and a
  BatchNorm without affine parameters before the head, which vitoken does not have yet.
  """
  if arg.preset not in PRESETS:
    raise ValueError(f"unknown preset {arg.preset!r}; presets: {list(PRESETS)}")
  if arg.method != "mae" or arg.stage == "scratch":
    raise ValueError("preset=im1k is MAE's recipe: method=mae with stage pretrain, finetune or probe")
  c.data.name = "imagenet2012"
  c.data.eval_split = "validation"
  c.data.image_size = 224
  c.data.random_resized_crop = True
  c.data.flip = True
  c.data.mean = (0.485, 0.456, 0.406)
  c.data.std = (0.229, 0.224, 0.225)
  c.model = dict(variant="B/16", class_token=True, posemb="sincos2d_mae")
  c.optim.name = "adamw"
  c.optim.weight_decay = 0.05
  c.schedule.decay = "cosine"
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint.every_steps = 5000
  if arg.stage == "pretrain":
    c.task = dict(name="mae", mask_ratio=0.75, norm_pix_loss=True, decoder_width=512,
                  decoder_depth=8, decoder_heads=16)
    c.data.crop_scale = (0.2, 1.0)
    c.batch_size, epochs, warmup = 4096, 800, 40
    c.optim.b2 = 0.95
    c.optim.lr = 1.5e-4 * c.batch_size / 256
  else:
    if not arg.init:
      raise ValueError(f"stage={arg.stage} starts from a pretraining run: pass init=<its workdir>")
    c.init_from.path = arg.init
    c.init_from.subtree = "encoder"
    if arg.stage == "finetune":
      c.model.update(pool_type="gap", fc_norm=True, drop_path_rate=0.1)
      c.init_from.exclude = "^(head|fc_norm)/"
      c.batch_size, epochs, warmup = 1024, 100, 5
      c.optim.lr = 5e-4 * c.batch_size / 256
      c.optim.layer_decay = 0.65
      c.data.mixup_alpha, c.data.cutmix_alpha = 0.8, 1.0
      c.label_smoothing = 0.1
      if arg.tome:
        c.model.token_reduction = {"method": "tome", "r": int(arg.tome)}
    else:
      c.model.update(pool_type="tok")
      c.init_from.exclude = "^head/"
      c.optim.trainable_regex = "^head/"
      c.optim.weight_decay = 0.0
      c.batch_size, epochs, warmup = 16384, 90, 10
      c.optim.lr = 1e-3
  steps_per_epoch = IMAGENET_TRAIN // c.batch_size
  c.total_steps = (arg.steps or epochs * steps_per_epoch)
  c.schedule.warmup_steps = warmup * steps_per_epoch
  if arg.runlocal:
    # The recipe at toy size on the embedded cluttered digits, so that the smoke run needs no
    # ImageNet: 16 patches of 16 px, two blocks, every stage the same encoder.
    runlocal(c)
    c.data.update(name="cluttered_digits", eval_split="test", image_size=64, mean=(0.5,),
                  std=(0.5,))
    c.model.update(width=32, depth=2, mlp_dim=64, num_heads=2)
    if arg.stage == "pretrain":
      c.task.update(decoder_width=32, decoder_depth=1, decoder_heads=2)
  return c
