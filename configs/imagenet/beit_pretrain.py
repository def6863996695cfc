"""BEiT pretraining of ViT-B/16 on ImageNet-1k images: block-wise masks over 75 of the 196
patches, the masked patches' codes predicted from configs/imagenet/beit_tokenizer.py's tokenizer
(fit it first; vitoken's k-means, not BEiT's DALL-E dVAE).

  python -m vitoken.tokenizers --config=configs/imagenet/beit_tokenizer.py --workdir=gs://bucket/beit_tok
  python -m vitoken.train --config=configs/imagenet/beit_pretrain.py:tokenizer=gs://bucket/beit_tok --workdir=gs://bucket/beit_b16

Should reproduce (through configs/imagenet/beit_finetune.py): BEiT's 83.2% top-1 for ViT-B/16
after 800 epochs (Bao et al. 2022, "BEiT: BERT Pre-Training of Image Transformers", Table 1),
which used DALL-E's tokenizer: with the k-means codes expect the neighbourhood of that figure,
not the figure (docs/masked_modeling.md compares the two kinds of codes at small scale).

Recipe (BEiT's appendix, pretraining on ImageNet-1k): 800 epochs of 2048 (500,455 steps), AdamW
(0.9, 0.999) at 1.5e-3 with 10 warmup epochs and a cosine to 1e-5, weight decay 0.05, gradients
clipped at 3.0, drop path 0.1, layer scale 0.1, block-wise masking of 75 patches (at least 16 a
block, aspect ratios 0.3-3.3), random-resized crops and flips. Differences: BEiT adds a colour
jitter of 0.4 and a shared relative position bias, neither in vitoken (absolute learned position
embeddings here).

Hardware: the paper pretrains BEiT-B in about five days on 16 V100 32 GB GPUs; this recipe
assumes 16+ accelerators with >= 32 GB at 2048 a step (128 each), data-parallel, the frozen
tokenizer beside the model.

Arguments: tokenizer (the tokenizer's workdir), and folder, data_dir, runlocal
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

# The encoder's fields the fine-tune repeats so that the pretrained weights load as they are.
ENCODER = dict(class_token=True, posemb="learn", layer_scale_init=0.1)
SMOKE = ("tokenizer=<beit_tokenizer.py:runlocal>,runlocal",)


def get_config(arg=None):
  arg = common.parse(arg, tokenizer="")
  if not arg.tokenizer:
    raise ValueError("BEiT predicts a fitted tokenizer's codes: fit configs/imagenet/"
                     "beit_tokenizer.py with python -m vitoken.tokenizers, then pass "
                     "tokenizer=<its workdir>")
  c = common.start(arg)
  c.model = dict(variant="B/16", drop_path_rate=0.1, **ENCODER)
  c.task = dict(name="beit", tokenizer=arg.tokenizer, min_block_patches=16)
  common.epochs(c, total=800, batch=2048, warmup=10)
  common.adamw(c, lr=1.5e-3, weight_decay=0.05, min_lr=1e-5)
  c.optim.clip_grad_norm = 3.0
  common.runlocal(c, arg)
  if arg.runlocal:
    c.task.min_block_patches = 4  # blocks of the 8x8 toy grid (BEiT's 16 are of 14x14)
  return c
