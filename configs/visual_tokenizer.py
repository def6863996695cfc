"""Visual tokenizers for BEiT-style pretraining on cluttered digits: one code per 8x8 patch.

  python -m vitoken.tokenizers --config=configs/visual_tokenizer.py:kind=kmeans --workdir=/tmp/tok_kmeans
  python -m vitoken.tokenizers --config=configs/visual_tokenizer.py:kind=fsq --workdir=/tmp/tok_fsq
  python -m vitoken.train --config=configs/masked_modeling.py:stage=pretrain,method=beit,tokenizer=/tmp/tok_fsq --workdir=/tmp/beit

Arguments (comma-separated):
  kind      kmeans: mini-batch k-means over contrast-normalised patches, 512 codes
            fsq: a small FSQ autoencoder, levels 8x8x8 (512 codes)
  steps     mini-batches (k-means, default 300) or training steps (FSQ, default 2000)
  runlocal  a seconds-long smoke run

Both use the masked-modeling encoder's 8 px patches, so their codes are one per patch of
`configs/masked_modeling.py`'s encoder.
"""
from vitoken.train.config import base_config, digits_recipe, parse_arg, runlocal

KINDS = ("kmeans", "fsq")
PATCH = 8
# The FSQ encoder: a two-block ViT over the same 8 px patches (the decoder has two more).
FSQ_ENCODER = dict(variant="Ti/8", width=64, depth=2, mlp_dim=128, num_heads=2)
# Every kind as a smoke run (tests/test_presets.py trains each).
SMOKE = tuple(f"kind={k},runlocal" for k in KINDS)


def get_config(arg=None):
  arg = parse_arg(arg, kind="kmeans", steps=0, runlocal=False)
  if arg.kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {arg.kind!r}")
  c = base_config()
  if arg.kind == "kmeans":
    digits_recipe(c, total_steps=arg.steps or 300, eval_every=0)
    c.task = dict(name="kmeans_tokenizer", codebook_size=512, patch_size=PATCH, eps=0.1)
    c.model = {}
    c.batch_size = 256  # 16,384 patches a mini-batch
    c.log_every_steps = 25
    c.checkpoint.every_steps = 100
  else:
    digits_recipe(c, total_steps=arg.steps or 2000, eval_every=1000)
    c.task = dict(name="fsq_tokenizer", levels=(8, 8, 8), decoder_depth=2)
    c.model = dict(FSQ_ENCODER)
    c.optim.lr = 1e-3
  if arg.runlocal:
    runlocal(c)
    if arg.kind == "kmeans":
      c.eval_every_steps = 0  # k-means evaluates its codebook once, at the end
  return c
