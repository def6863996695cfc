"""Compact visual tokens for a language model, on digit scenes QA: a patch-8 ViT pretrained on
which digits a 96 px scene holds (144 patches and a class token), frozen; its features at the
second-to-last block compressed to K tokens; LLaVA-1.5's projector; a tiny causal LM that reads
[K visual tokens, question] and answers in one word.

  python -m vitoken.train --config=configs/visual_qa.py:stage=encoder --workdir=/tmp/vqa_encoder
  python -m vitoken.train --config=configs/visual_qa.py:encoder=/tmp/vqa_encoder --workdir=/tmp/vqa
  python -m vitoken.train --config=configs/visual_qa.py:encoder=/tmp/vqa_encoder,compressor=visionzip,k=16,lm=big --workdir=/tmp/vqa_vz16

Arguments (comma-separated):
  stage       encoder (digit presence: ten yes/no heads) | qa (default)
  encoder     qa: the encoder run's workdir
  compressor  qa: none (all 144 patches, default) | one of COMPRESSORS
  k           qa: tokens the compressor keeps (144, 36, 16, 9, 4, 1 in the experiment)
  lm          qa: small | big (LMS)
  scales      qa with compressor=pool: train at every K of SCALES at once (M3)
  matryoshka  qa with compressor=resampler: the first m queries, m drawn per step (MQT-LLaVA)
  queries     qa with compressor=resampler: its learned queries M (default k); k < M reads
              the first k (a Matryoshka run's at any K)
  steps       training steps (default 1500 encoder, 2000 qa)
  runlocal    a seconds-long smoke run (digit_scenes/tiny at 48 px)
"""
from vitoken.data import digit_scenes
from vitoken.train.config import base_config, digits_recipe, parse_arg, runlocal

STAGES = ("encoder", "qa")
IMAGE_SIZE = 96
# 96 px / 8 px patches = 144 patches and a class token, 4 blocks; the features are block 2's.
ENCODER = dict(variant="Ti/8", width=96, depth=4, mlp_dim=192, num_heads=4)
FEATURE_LAYER = -2
LMS = {"small": dict(width=128, depth=2, num_heads=4),
       "big": dict(width=256, depth=4, num_heads=8)}
SCALES = (1, 9, 36, 144)  # M3's 1, 9, 36, 144, 576 below this grid's 144


def compressor(name: str, k: int):
  """The compressor entry `name` keeping `k` tokens (None: every patch)."""
  if name == "none":
    return None
  if name == "visionzip":  # the README's 54 + 10 of 64, the class token among the dominant
    contextual = max(k * 10 // 64, 0) if k > 1 else 0
    return {"method": "visionzip", "dominant": k - contextual, "contextual": contextual}
  if name == "prumerge":  # the fixed variant: k - 1 kept tokens and the extra one
    return {"method": "prumerge", "num_tokens": k - 1, "neighbours": 8}
  if name == "prumerge_adaptive":
    return {"method": "prumerge", "max_tokens": k - 1, "neighbours": 8}
  if name == "tome_to_k_weighted":
    return {"method": "tome_to_k", "num_tokens": k, "weighted": True}
  return {"method": name, "num_tokens": k}


COMPRESSORS = ("cls_topk", "visionzip", "prumerge", "prumerge_adaptive", "tome_to_k",
               "tome_to_k_weighted", "pool", "token_learner", "resampler", "quecc")
SMOKE = (
    "stage=encoder,runlocal",
    "encoder=<visual_qa.py:stage=encoder,runlocal>,runlocal",
    "encoder=<visual_qa.py:stage=encoder,runlocal>,compressor=cls_topk,k=4,runlocal",
    "encoder=<visual_qa.py:stage=encoder,runlocal>,compressor=pool,k=4,scales,runlocal",
    "encoder=<visual_qa.py:stage=encoder,runlocal>,compressor=resampler,k=16,matryoshka,runlocal",
)


def get_config(arg=None):
  arg = parse_arg(arg, stage="qa", encoder="", compressor="none", k=144, lm="small",
                  scales=False, matryoshka=False, queries=0, steps=0, runlocal=False)
  if arg.stage not in STAGES:
    raise ValueError(f"stage must be one of {STAGES}, got {arg.stage!r}")
  c = base_config()
  digits_recipe(c, total_steps=arg.steps or (1500 if arg.stage == "encoder" else 2000),
                eval_every=500)
  c.data.name = "digit_scenes"
  c.data.image_size = IMAGE_SIZE
  c.batch_size = 64
  c.model = dict(ENCODER)
  if arg.stage == "encoder":
    if arg.encoder or arg.compressor != "none":
      raise ValueError("stage=encoder pretrains the encoder; encoder= and compressor= are "
                       "stage=qa's")
    c.data.label_keys = digit_scenes.PRESENCE_KEYS
    return _local(c, arg)
  if not arg.encoder:
    raise ValueError("stage=qa needs encoder=<the workdir of configs/visual_qa.py:stage=encoder>")
  if arg.compressor not in ("none",) + COMPRESSORS:
    raise ValueError(f"compressor must be none or one of {COMPRESSORS}, got {arg.compressor!r}")
  if arg.lm not in LMS:
    raise ValueError(f"lm must be one of {sorted(LMS)}, got {arg.lm!r}")
  if arg.scales and arg.compressor != "pool":
    raise ValueError("scales trains the pool compressor at several K (M3); set compressor=pool")
  if arg.matryoshka and arg.compressor != "resampler":
    raise ValueError("matryoshka trains the resampler at a random K per step (MQT-LLaVA); set "
                     "compressor=resampler")
  entry = compressor(arg.compressor, int(arg.k))
  if arg.queries:
    if arg.compressor != "resampler":
      raise ValueError("queries is the resampler's setting; set compressor=resampler")
    entry["queries"] = int(arg.queries)
  c.task = dict(name="visual_qa", encoder=dict(path=arg.encoder), feature_layer=FEATURE_LAYER,
                compressor=entry, lm=dict(LMS[arg.lm]),
                scales=SCALES if arg.scales else None, matryoshka=bool(arg.matryoshka))
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.0
  return _local(c, arg)


def _local(c, arg):
  if not arg.runlocal:
    return c
  runlocal(c)
  c.data.name = "digit_scenes/tiny"
  c.data.image_size = 48  # 6 x 6 patches
  c.model.update(width=32, depth=3, mlp_dim=64, num_heads=2)
  if c.task.name == "visual_qa":
    c.task.lm = dict(width=32, depth=1, num_heads=2)
    k = c.task.compressor and c.task.compressor.get("num_tokens")
    if c.task.scales:
      c.task.scales = (1, 4, 36)
    elif k and k > 36:
      c.task.compressor["num_tokens"] = 36
  return c
