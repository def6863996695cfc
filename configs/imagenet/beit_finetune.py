"""BEiT fine-tuning: the encoder of configs/imagenet/beit_pretrain.py trained end to end on
ImageNet-1k labels.

  python -m vitoken.train --config=configs/imagenet/beit_finetune.py:init=gs://bucket/beit_b16 --workdir=gs://bucket/beit_b16_ft

Should reproduce: BEiT's 83.2% top-1 for ViT-B/16 at 224 px after 800 pretraining epochs (Bao
et al. 2022, "BEiT: BERT Pre-Training of Image Transformers", Table 1), measured with DALL-E's
tokenizer; vitoken's k-means codes (configs/imagenet/beit_tokenizer.py) are not DALL-E's.

Recipe (the BEiT-base command for self-supervised-only checkpoints in unilm's
beit/get_started_for_image_classification.md, written for the ImageNet-22k-pretrained one, over
run_class_finetuning.py's defaults; the paper's appendix table was not checked): 100 epochs of
1024 (8 GPUs x 128; 125,113 steps), AdamW at 4e-3, weight decay 0.05, layer-wise lr decay 0.65,
drop path 0.1, 20 warmup epochs, cosine to 1e-6 (min_lr; the warmup starts from 1e-6, from 0
here), mean pooling with a LayerNorm and a fresh head, RandAugment rand-m9-mstd0.5-inc1, random
erasing 0.25, mixup 0.8 / cutmix 1.0, label smoothing 0.1. Difference: the reference fine-tunes
with a relative position bias in every block (copies of the pretraining's shared one), vitoken
with its learned absolute position embeddings.

Hardware: 8+ accelerators with >= 32 GB at 1024 a step, data-parallel (the reference command
runs 128 images on each of 8 GPUs, with DeepSpeed mixed precision).

Arguments: init (the BEiT pretraining workdir), and folder, data_dir, runlocal
(configs/imagenet/common.py).
"""
import os
import sys

# Config files are loaded by path: the repository root goes on the path so that the shared
# recipe module imports whatever directory the command runs from.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
from configs.imagenet import beit_pretrain, common  # noqa: E402

SMOKE = ("init=<beit_pretrain.py:tokenizer=<beit_tokenizer.py:runlocal>,runlocal>,runlocal",)


def get_config(arg=None):
  arg = common.parse(arg, init="")
  c = common.start(arg)
  c.model = dict(variant="B/16")
  common.masked_finetune(c, init=arg.init, total=100, batch=1024, lr=4e-3, layer_decay=0.65,
                         drop_path=0.1, warmup=20, **beit_pretrain.ENCODER)
  return common.runlocal(c, arg)
