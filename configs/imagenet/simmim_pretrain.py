"""SimMIM pretraining of ViT-B/16 on ImageNet-1k images: 60% of 32 px cells masked, their raw
pixels regressed (L1) from a linear head on the encoder.

  python -m vitoken.train --config=configs/imagenet/simmim_pretrain.py --workdir=gs://bucket/simmim_b16

Should reproduce (through configs/imagenet/simmim_finetune.py, which starts from this workdir):
83.8% top-1 on ImageNet-1k val after 800 epochs (Xie et al. 2022, "SimMIM: A Simple Framework
for Masked Image Modeling", ViT-B/16 in its system-level comparison). Pretraining itself reports
the eval split's masked pixel loss.

Recipe (the reference's simmim_pretrain__vit_base__img224__800ep.yaml): 800 epochs of 2048
(500,455 steps), AdamW (0.9, 0.999) at 1e-4 x 2048/512 from 5e-7 x 4 over 10 warmup epochs,
weight decay 0.05, gradients clipped at 5.0, drop path 0.1, layer scale 0.1, random-resized
crops of scale 0.67-1 and flips, mask patches of 32 px at ratio 0.6. Differences: the
reference's ViT uses a shared relative position bias instead of absolute position embeddings
(vitoken learns absolute ones) and a step decay at epoch 700 (a cosine to 5e-6 x 4 here).

Hardware: the reference's configs feed 128 images to each of 16 GPUs (batch 2048); this recipe
assumes 16+ accelerators with >= 32 GB, data-parallel (a TPU v4-32 slice, or two 8-GPU nodes).

Arguments: folder, data_dir, runlocal (configs/imagenet/common.py).
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
SMOKE = ("runlocal",)


def get_config(arg=None):
  arg = common.parse(arg)
  c = common.start(arg)
  c.model = dict(variant="B/16", drop_path_rate=0.1, **ENCODER)
  # runlocal: 16 px cells, 2x2 of its 8 px patches as 32 px cells are of 16 px ones.
  c.task = dict(name="simmim", mask_patch_size=16 if arg.runlocal else 32, mask_ratio=0.6)
  c.data.crop_scale = (0.67, 1.0)
  common.epochs(c, total=800, batch=2048, warmup=10)
  lr_scale = 2048 / 512
  common.adamw(c, lr=1e-4 * lr_scale, weight_decay=0.05, min_lr=5e-6 * lr_scale,
               warmup_lr=5e-7 * lr_scale)
  c.optim.clip_grad_norm = 5.0
  return common.runlocal(c, arg)
