"""MAE fine-tuning: the encoder of configs/imagenet/mae_pretrain.py trained end to end on
ImageNet-1k labels.

  python -m vitoken.train --config=configs/imagenet/mae_finetune.py:init=gs://bucket/mae_b16 --workdir=gs://bucket/mae_b16_ft
  python -m vitoken.train --config=configs/imagenet/mae_finetune.py:variant=L/16,init=gs://bucket/mae_l16 --workdir=gs://bucket/mae_l16_ft

Should reproduce: ViT-B/16 83.6% top-1 on ImageNet-1k val, ViT-L/16 85.9%, from 1600-epoch
pretraining (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners", Table 3).

Recipe (MAE's FINETUNE.md, appendix A.2): B/16 100 epochs, L/16 50, of 1024 (125,113 / 62,556
steps), AdamW (0.9, 0.999) at 5e-4 (B) / 1e-3 (L) x 1024/256, weight decay 0.05, layer-wise lr
decay 0.65 (B) / 0.75 (L), drop path 0.1 (B) / 0.2 (L), 5 warmup epochs, cosine to 1e-6,
global average pooling with a LayerNorm after it and a fresh head, RandAugment
rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8 / cutmix 1.0, label smoothing 0.1.

Hardware: FINETUNE.md fine-tunes B/16 in ~7h11m and L/16 in ~8h52m on 32 V100s (32 images each;
the paper's TensorFlow/TPU setup is unverified here). This recipe assumes 8+ accelerators with
>= 32 GB; L/16 shards over 8 devices (FSDP) as in pretraining.

Arguments: init (the pretraining workdir), variant (B/16 | L/16, the pretraining's), and
folder, data_dir, runlocal (configs/imagenet/common.py).
"""
import os
import sys

# Config files are loaded by path: the repository root goes on the path so that the shared
# recipe module imports whatever directory the command runs from.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
from configs.imagenet import common  # noqa: E402

SMOKE = ("init=<mae_pretrain.py:runlocal>,runlocal",
         "variant=L/16,init=<mae_pretrain.py:variant=L/16,runlocal>,runlocal")


def get_config(arg=None):
  arg = common.parse(arg, variant="B/16", init="")
  c = common.start(arg, variant=arg.variant)
  common.mae_finetune(c, arg, arg.variant)
  return common.runlocal(c, arg)
