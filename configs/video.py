"""Video on moving cluttered digits: a video ViT (tubelets of 4 frames x 8 x 8 px, joint
space-time attention) that reads each clip's digit and its direction of motion, trained from
scratch, inflated from an image model, with token reduction over space-time, or pretrained by
VideoMAE or by VIOLET-style masked visual-token modeling and fine-tuned.

  python -m vitoken.train --config=configs/video.py --workdir=/tmp/video                  # scratch
  python -m vitoken.train --config=configs/video.py:stage=image --workdir=/tmp/image      # image model
  python -m vitoken.train --config=configs/video.py:stage=inflate,init=/tmp/image --workdir=/tmp/inflated
  python -m vitoken.train --config=configs/video.py:tl=8 --workdir=/tmp/video_tl          # TokenLearner
  python -m vitoken.train --config=configs/video.py:tome=28,per_slice --workdir=/tmp/video_tome
  python -m vitoken.train --config=configs/video.py:stage=pretrain --workdir=/tmp/videomae
  python -m vitoken.train --config=configs/video.py:stage=finetune,init=/tmp/videomae --workdir=/tmp/videomae_ft
  python -m vitoken.train --config=configs/video.py:stage=probe,init=/tmp/videomae --workdir=/tmp/videomae_lin
  python -m vitoken.tokenizers --config=configs/video.py:stage=tokenizer --workdir=/tmp/video_tok
  python -m vitoken.train --config=configs/video.py:stage=violet,tokenizer=/tmp/video_tok --workdir=/tmp/violet
  python -m vitoken.train --config=configs/video.py:stage=finetune,init=/tmp/violet --workdir=/tmp/violet_ft

Arguments (comma-separated):
  stage     scratch | frame | image | inflate | pretrain | finetune | probe | tokenizer | violet
            (frame: the middle frame only, a model that cannot see motion; image: the image
            model on cluttered digits that `inflate` starts from; pretrain: VideoMAE;
            tokenizer: the k-means image tokenizer VIOLET predicts the codes of; violet:
            VIOLET-style masked visual-token modeling)
  init      the image run (inflate) or the pretraining run, VideoMAE or VIOLET (finetune, probe)
  kernel    inflation: central (ViViT) | average (I3D)
  masking   pretrain: tube (VideoMAE, default) | frame (drawn per time slice);
            violet: block (BEiT's block rules over space-time cuboids, default) | violet
            (VIOLET's reference draw: one random cuboid per time slice)
  tokenizer violet: the tokenizer's workdir (stage=tokenizer)
  tl        TokenLearner: S tokens per time slice at block `loc` (video classification)
  loc       TokenLearner's block (default 1)
  tome      ToMe's r per block over all space-time tokens (or per slice with per_slice)
  per_slice ToMe and TokenLearner within each time slice (TokenLearner always is)
  temporal  merging across time slices, a preset of TEMPORAL: testa50 | testa25 (TESTA) |
            tempme50 | tempme25 (TempMe), about 50% / 25% of the dense tokens leaving a block
  steps     training steps (default 1000, 2000 pretraining, 300 k-means mini-batches)
  runlocal  a seconds-long smoke run (moving_digits/tiny)

Every video stage shares `ENCODER` (depth 4, width 64), so an image run, a pretraining run and
the video models load each other's weights. Both labels have a head (data.label_keys), and the
eval reports accuracy/label and accuracy/direction. No flip: it would swap east and west.

VIOLET (stage=violet): the targets are the codes of an image tokenizer applied frame by frame
(tubelet 1): `stage=tokenizer` fits k-means (512 codes) over the 8 px patches of single 64 px
cluttered digits, the glyphs and clutter the clips' frames are drawn from, with the video
model's spatial patch. Each token of the 4 x 8 x 8 tubelets predicts its patch's code in each
of its 4 frames; masks are BEiT's blocks (40% of the 128 tokens, at least 16 a block) as
cuboids of 1 or 2 time slices, drawn in the input pipeline. The pretrained encoder (no class
token, the fixed 1-D table, as VideoMAE's) fine-tunes and probes with the same stages.
"""
from vitoken.train.config import base_config, digits_recipe, parse_arg, runlocal

STAGES = ("scratch", "frame", "image", "inflate", "pretrain", "finetune", "probe", "tokenizer",
          "violet")
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
# VIOLET at this scale: BEiT's block masks (75/196 of the tokens) as space-time cuboids over the
# codes of a k-means tokenizer of 512 codes on 8 px patches (configs/visual_tokenizer.py's).
VIOLET = dict(name="violet", masking="block", min_block_patches=16, preview_examples=2)
MASKINGS = {"pretrain": ("tube", "frame"), "violet": ("block", "violet")}
TOKENIZER = dict(name="kmeans_tokenizer", codebook_size=512, patch_size=VIDEO_PATCH[1], eps=0.1)
LABEL_KEYS = ("label", "direction")
# Temporal merging at this scale (2 time slices, depth 4), named by the share of the dense
# tokens leaving a block (128 each): TESTA merges the two slices in the first block, then
# `patches` per slice per block (the reference's 32-frame setting: 1 frame, 12 patches);
# TempMe runs the two slices as frames, ToMe r per frame in block 0, joins them in block 1.
# The 25% rows cost 0.47x the dense FLOPs, as ToMe over space-time at r = 60; the 50% rows 0.6x,
# as r = 32 (experiments/video.py compares them).
TEMPORAL = {
    "testa50": {"method": "testa", "frames": 1, "patches": 0},
    "testa25": {"method": "testa", "frames": 1, "patches": 12},
    "tempme50": {"method": "tempme", "merge_layers": (1,), "groups": (2,), "shares": (0.3, 0.1),
                 "r": 16},
    "tempme25": {"method": "tempme", "merge_layers": (1,), "groups": (2,), "shares": (0.4, 0.2),
                 "r": 24},
}
# The smoke runs tests/test_presets.py trains.
SMOKE = (
    "runlocal",
    "stage=frame,runlocal",
    "stage=inflate,init=<video.py:stage=image,runlocal>,runlocal",
    "stage=inflate,init=<video.py:stage=image,runlocal>,tl=8,runlocal",
    "tl=8,runlocal",
    "tome=8,per_slice,runlocal",
    "temporal=testa25,runlocal",
    "temporal=tempme25,runlocal",
    "stage=pretrain,runlocal",
    "stage=finetune,init=<video.py:stage=pretrain,runlocal>,runlocal",
    "stage=probe,init=<video.py:stage=pretrain,runlocal>,runlocal",
    "stage=tokenizer,runlocal",
    "stage=violet,tokenizer=<video.py:stage=tokenizer,runlocal>,runlocal",
    "stage=finetune,init=<video.py:stage=violet,tokenizer=<video.py:stage=tokenizer,runlocal>,"
    "runlocal>,runlocal",
)


def get_config(arg=None):
  arg = parse_arg(arg, stage="scratch", init="", kernel="central", masking="", tokenizer="",
                  tl=0, loc=1, tome=0, per_slice=False, temporal="", steps=0, runlocal=False)
  if arg.stage not in STAGES:
    raise ValueError(f"stage must be one of {STAGES}, got {arg.stage!r}")
  if arg.masking and arg.stage not in MASKINGS:
    raise ValueError(f"masking is a pretraining setting (stage=pretrain or violet), not "
                     f"stage={arg.stage}'s")
  if arg.tokenizer and arg.stage != "violet":
    raise ValueError(f"tokenizer is stage=violet's setting; stage={arg.stage} takes none")
  c = base_config()
  if arg.stage == "tokenizer":
    return _tokenizer(c, arg)
  c.model = dict(ENCODER, **POOLING, patch_size=VIDEO_PATCH, posemb="learn")
  pretrain = arg.stage in ("pretrain", "violet")
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
    maskings = MASKINGS[arg.stage]
    masking = arg.masking or maskings[0]
    if masking not in maskings:
      raise ValueError(f"masking must be one of {maskings} for stage={arg.stage}, got "
                       f"{arg.masking!r}")
    if arg.stage == "violet":
      if not arg.tokenizer:
        raise ValueError("stage=violet predicts a visual tokenizer's codes: pass tokenizer=<the "
                         "workdir of python -m vitoken.tokenizers --config=configs/video.py:"
                         "stage=tokenizer>")
      c.task = dict(VIOLET, masking=masking, tokenizer=arg.tokenizer)
    else:
      c.task = dict(PRETRAIN, masking=masking)
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
  if arg.temporal:
    if arg.temporal not in TEMPORAL:
      raise ValueError(f"temporal must be one of {sorted(TEMPORAL)}, got {arg.temporal!r}")
    reducers.append(dict(TEMPORAL[arg.temporal]))
  if reducers:
    if pretrain:
      raise ValueError("tl, tome and temporal are for the video classifiers, not for pretraining")
    c.model["token_reduction"] = reducers if len(reducers) > 1 else reducers[0]
    if arg.tl and c.init_from.path:
      c.init_from.exclude += "|/token_learner/"  # new modules: they start fresh
    if arg.temporal.startswith("tempme") and c.init_from.path:
      c.init_from.exclude += "|/tempme/"  # TempMe's per-frame position embeddings: new
  return _local(c, arg)


def _tokenizer(c, arg):
  """k-means over the 8 px patches of single cluttered digits (configs/visual_tokenizer.py's)."""
  extra = [k for k in ("init", "tl", "tome", "temporal", "per_slice") if arg.get(k)]
  if extra:
    raise ValueError(f"stage=tokenizer fits k-means on single frames; it takes no {extra}")
  digits_recipe(c, total_steps=arg.steps or 300, eval_every=0)
  c.task = dict(TOKENIZER)
  c.model = {}
  c.batch_size = 256  # 16,384 patches a mini-batch
  c.log_every_steps = 25
  c.checkpoint.every_steps = 100
  if arg.runlocal:
    runlocal(c)
    c.eval_every_steps = 0  # k-means evaluates its codebook once, at the end
  return c


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
