"""TokenLearner on ImageNet-1k: scenic's im1k_token_learner_config.py, a ViT-B/16 trained from
scratch that learns S = 16 (or 8) tokens before block index 9 (0-based: after 9 of the 12
blocks; scenic's tokenlearner_loc = 9), TokenLearner v1.1.

  python -m vitoken.train --config=configs/imagenet/token_learner.py --workdir=gs://bucket/tl16
  python -m vitoken.train --config=configs/imagenet/token_learner.py:tokens=8 --workdir=gs://bucket/tl8

Should reproduce: scenic publishes no ImageNet-1k accuracy for this config, which follows the
ViT paper's ImageNet-only training; its dense reference is that paper's ViT-B/16 trained on
ImageNet-1k alone, 77.9% top-1 (Dosovitskiy et al. 2021; fine-tuned and evaluated at 384 px, as
DeiT's comparison table and facebookresearch/deit issue #19 quote it; not a 224 px figure).
TokenLearner's claims (Ryoo et al. 2021, scenic's projects/token_learner/README.md) are
qualitative: 8 or 16 tokens learned in the middle of the network often keep the accuracy while
halving the compute, and placing the module before the last quarter (this config) often improves
the accuracy while reducing the compute.

Recipe (scenic's config): global average pooling, no class token, drop path 0.1, 90 epochs of
4096 (28,150 steps here; scenic counts 90 x floor(1,281,167 / 4096) = 28,080), Adam (0.9, 0.999)
with decoupled weight decay 0.3 (scenic's "adam" with weight_decay; AdamW here), gradients
clipped at norm 1.0, lr 5e-3 with 10,000 linear warmup steps then a linear decay to 1e-5,
inception crops (area 0.08-1) and flips, ImageNet mean / std normalisation, evaluation from a
bicubic centre crop of 224 / 256 of the shorter side (scenic's dataset_lib/imagenet_dataset.py).
Differences: scenic trains a sigmoid (multi-label) loss with the head's bias starting at -10;
vitoken's classification is a softmax cross-entropy with a zero-initialised head.

Hardware: the ViT paper trains on TPU v3; batch 4096 assumes a TPU v3-64 / v4-32 slice (64 or
128 images a core) or 32+ GPUs, data-parallel.

Arguments: tokens (8 | 16, default 16 as scenic's file), and folder, data_dir, runlocal
(configs/imagenet/common.py).
"""
import os
import sys

# Config files are loaded by path: the repository root goes on the path so that the shared
# recipe module imports whatever directory the command runs from.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
from configs.imagenet import common  # noqa: E402

TOKENS = (8, 16)
SMOKE = ("runlocal",)


def get_config(arg=None):
  arg = common.parse(arg, tokens=16)
  if arg.tokens not in TOKENS:
    raise ValueError(f"tokens must be one of {TOKENS} (scenic's settings), got {arg.tokens!r}")
  c = common.start(arg)
  depth = common.depth(arg, "B/16")
  # Before block 9 of 12: three quarters of the depth, also at runlocal's toy depth.
  tokens = min(arg.tokens, 8) if arg.runlocal else arg.tokens
  c.model = dict(variant="B/16", pool_type="gap", class_token=False, drop_path_rate=0.1,
                 posemb="learn",
                 token_reduction={"method": "token_learner", "num_tokens": tokens,
                                  "loc": 3 * depth // 4, "version": "v1.1", "mode": "learner"})
  # scenic's `imagenet` dataset normalises with ImageNet's mean / std (common.start's) and
  # evaluates a centre crop of 224 / (224 + 32) of the shorter side (crop_pct 0.875).
  common.epochs(c, total=90, batch=4096, warmup=0)
  c.schedule.warmup_steps = 10_000
  c.optim.update(name="adamw", lr=5e-3, weight_decay=0.3, clip_grad_norm=1.0)
  c.schedule.update(decay="linear", end_factor=1e-5 / 5e-3)
  return common.runlocal(c, arg)
