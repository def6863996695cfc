"""SimMIM fine-tuning: the encoder of configs/imagenet/simmim_pretrain.py trained end to end on
ImageNet-1k labels.

  python -m vitoken.train --config=configs/imagenet/simmim_finetune.py:init=gs://bucket/simmim_b16 --workdir=gs://bucket/simmim_b16_ft

Should reproduce: ViT-B/16 83.8% top-1 on ImageNet-1k val after 800 pretraining epochs (Xie et
al. 2022, "SimMIM: A Simple Framework for Masked Image Modeling"; microsoft/SimMIM's README,
ViT-Base 800 epochs, 224 px).

Recipe (the reference's simmim_finetune__vit_base__img224__800ep.yaml over config.py's defaults,
128 images on each of 16 GPUs): 100 epochs of 2048 (62,556 steps), AdamW (0.9, 0.999) at 1.25e-3
x 2048/512, weight decay 0.05, layer-wise lr decay 0.65, drop path 0.1, 20 warmup epochs, cosine
to 1e-6 (MIN_LR 2.5e-7 x 2048/512; the warmup starts there too, from 0 here), mean pooling with
a LayerNorm and a fresh head, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8 /
cutmix 1.0, label smoothing 0.1 (as configs/imagenet/common.py's masked_finetune). Difference:
the reference fine-tunes with a relative position bias in every block (USE_RPB), each a copy of
the pretraining's shared one (utils.py), and no absolute position embeddings; vitoken keeps its
learned absolute ones.

Hardware: as the pretraining, 16+ accelerators with >= 32 GB at 2048 a step, data-parallel.

Arguments: init (the SimMIM pretraining workdir), and folder, data_dir, runlocal
(configs/imagenet/common.py).
"""
import os
import sys

# Config files are loaded by path: the repository root goes on the path so that the shared
# recipe module imports whatever directory the command runs from.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
from configs.imagenet import common, simmim_pretrain  # noqa: E402

SMOKE = ("init=<simmim_pretrain.py:runlocal>,runlocal",)


def get_config(arg=None):
  arg = common.parse(arg, init="")
  c = common.start(arg)
  c.model = dict(variant="B/16")
  common.masked_finetune(c, init=arg.init, total=100, batch=2048, lr=1.25e-3 * 2048 / 512,
                         layer_decay=0.65, drop_path=0.1, warmup=20, **simmim_pretrain.ENCODER)
  return common.runlocal(c, arg)
