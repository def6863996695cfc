"""Video on moving cluttered digits: a video ViT (tubelets of 4 frames x 8 x 8 px, joint
space-time attention) that reads each clip's digit and its direction of motion, trained from
scratch, inflated from an image model, with token reduction over space-time, or pretrained by
VideoMAE and fine-tuned.

  python -m vitoken.train --config=configs/video.py --workdir=/tmp/video                  # scratch
  python -m vitoken.train --config=configs/video.py:stage=image --workdir=/tmp/image      # image model
  python -m vitoken.train --config=configs/video.py:stage=inflate,init=/tmp/image --workdir=/tmp/inflated
  python -m vitoken.train --config=configs/video.py:tl=8 --workdir=/tmp/video_tl          # TokenLearner
  python -m vitoken.train --config=configs/video.py:tome=28,per_slice --workdir=/tmp/video_tome
  python -m vitoken.train --config=configs/video.py:stage=pretrain --workdir=/tmp/videomae
  python -m vitoken.train --config=configs/video.py:stage=finetune,init=/tmp/videomae --workdir=/tmp/videomae_ft
  python -m vitoken.train --config=configs/video.py:stage=probe,init=/tmp/videomae --workdir=/tmp/videomae_lin

Arguments (comma-separated):
  stage     scratch | frame | image | inflate | pretrain | finetune | probe
            (frame: the middle frame only, a model that cannot see motion; image: the image
            model on cluttered digits that `inflate` starts from)
  init      the image run (inflate) or the pretraining run (finetune, probe)
  kernel    inflation: central (ViViT) | average (I3D)
  masking   pretraining: tube (VideoMAE) | frame (drawn per time slice)
  tl        TokenLearner: S tokens per time slice at block `loc` (video classification)
  loc       TokenLearner's block (default 1)
  tome      ToMe's r per block over all space-time tokens (or per slice with per_slice)
  per_slice ToMe and TokenLearner within each time slice (TokenLearner always is)
  steps     training steps (default 1000, 2000 pretraining)
  runlocal  a seconds-long smoke run (moving_digits/tiny)

Every video stage shares `ENCODER` (depth 4, width 64), so an image run, a pretraining run and
the video models load each other's weights. Both labels have a head (data.label_keys), and the
eval reports accuracy/label and accuracy/direction. No flip: it would swap east and west.
"""
from vitoken.train.config import base_config, digits_recipe, parse_arg, runlocal

STAGES = ("scratch", "frame", "image", "inflate", "pretrain", "finetune", "probe")
FRAMES = 8
TUBELET = 4  # 8 frames -> 2 time slices; a tubelet sees 8 to 16 px of motion
# The model the stages share: a video ViT over 2 x 8 x 8 tubelets (128 tokens) without a class
# token, mean-pooled with a LayerNorm after the pooling (VideoMAE's fine-tuning head).
ENCODER = dict(variant="Ti/8", width=64, depth=4, mlp_dim=128, num_heads=2, class_token=False)
POOLING = dict(pool_type="gap", fc_norm=True)
VIDEO_PATCH = (TUBELET, 8, 8)
# VideoMAE at this scale: 90% tubes, a decoder half the encoder's width (as 384 over 768).
PRETRAIN = dict(name="videomae", mask_ratio=0.9, decoder_width=32, decoder_depth=2,
                decoder_heads=2, preview_examples=2)
LABEL_KEYS = ("label", "direction")
# The smoke runs tests/test_presets.py trains.
SMOKE = (
    "runlocal",
    "stage=frame,runlocal",
    "stage=inflate,init=<video.py:stage=image,runlocal>,runlocal",
    "stage=inflate,init=<video.py:stage=image,runlocal>,tl=8,runlocal",
    "tl=8,runlocal",
    "tome=8,per_slice,runlocal",
    "stage=pretrain,runlocal",
    "stage=finetune,init=<video.py:stage=pretrain,runlocal>,runlocal",
    "stage=probe,init=<video.py:stage=pretrain,runlocal>,runlocal",
)


def get_config(arg=None):
  arg = parse_arg(arg, stage="scratch", init="", kernel="central", masking="tube", tl=0, loc=1,
                  tome=0, per_slice=False, steps=0, runlocal=False)
  if arg.stage not in STAGES:
    raise ValueError(f"stage must be one of {STAGES}, got {arg.stage!r}")
  c = base_config()
  c.model = dict(ENCODER, **POOLING, patch_size=VIDEO_PATCH, posemb="learn")
  pretrain = arg.stage == "pretrain"
  digits_recipe(c, total_steps=arg.steps or (2000 if pretrain else 1000), eval_every=500)
  c.batch_size = 64
  if arg.stage == "image":
    # The image model inflation starts from: configs/quickstart.py's model and recipe (the
    # same blocks on single 64 px digits, 2400 steps of 128).
    c.model = dict(ENCODER, **POOLING, posemb="learn")
    digits_recipe(c, total_steps=arg.steps or 2400, eval_every=600)
    return _local(c, arg)
  c.data.name = "moving_digits"
  c.data.label_keys = LABEL_KEYS
  if arg.stage == "frame":
    # The middle frame: a first frame would tell much of the direction by where the digit is
    # (one that starts near the right edge cannot be moving east); in the middle the
    # directions' position ranges are nearly the same.
    c.data.frames = 1
    c.data.first_frame = FRAMES // 2
    c.model["patch_size"] = (1, 8, 8)
  elif arg.stage == "inflate":
    _needs_init(arg)
    c.init_from.path = arg.init
    c.init_from.inflate = arg.kernel
    c.init_from.exclude = "^head/"  # the image head reads 10 digits, not digits and directions
  elif pretrain:
    if arg.masking not in ("tube", "frame"):
      raise ValueError(f"masking must be 'tube' or 'frame', got {arg.masking!r}")
    c.task = dict(PRETRAIN, masking=arg.masking)
    c.model = dict(ENCODER, patch_size=VIDEO_PATCH)
    c.optim.b2 = 0.95  # VideoMAE's AdamW (betas 0.9, 0.95)
    c.optim.lr = 1.5e-3
  elif arg.stage in ("finetune", "probe"):
    _needs_init(arg)
    # The pretrained encoder: VideoMAE's fixed 1-D table, no class token.
    c.model["posemb"] = "sincos1d"
    c.init_from.path = arg.init
    c.init_from.subtree = "encoder"
    c.init_from.exclude = "^(head|fc_norm)/"
    if arg.stage == "probe":
      c.model.update(fc_norm=False)
      c.optim.trainable_regex = "^head/"
      c.optim.lr = 1e-2
      c.optim.weight_decay = 0.0
    else:
      c.optim.layer_decay = 0.75
  reducers = []
  if arg.tl:
    reducers.append({"method": "token_learner", "num_tokens": int(arg.tl), "loc": int(arg.loc),
                     "per_slice": True})
  if arg.tome:
    reducers.append({"method": "tome", "r": int(arg.tome), "prop_attn": True,
                     **({"per_slice": True} if arg.per_slice else {})})
  if reducers:
    if pretrain:
      raise ValueError("tl and tome are for the video classifiers, not for pretraining")
    c.model["token_reduction"] = reducers if len(reducers) > 1 else reducers[0]
    if arg.tl and c.init_from.path:
      c.init_from.exclude += "|/token_learner/"  # new modules: they start fresh
  return _local(c, arg)


def _needs_init(arg):
  if not arg.init:
    raise ValueError(f"stage={arg.stage} starts from another run: pass init=<its workdir>")


def _local(c, arg):
  if arg.runlocal:
    runlocal(c)
    c.model["depth"] = 2
    if c.data.name == "moving_digits":
      c.data.name = "moving_digits/tiny"
      c.data.train_examples = None
      c.data.eval_examples = None
  return c
