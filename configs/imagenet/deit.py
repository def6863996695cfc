"""DeiT: a dense ViT-B/16 (or S/16, Ti/16) trained on ImageNet-1k alone, with DeiT's recipe.

  python -m vitoken.train --config=configs/imagenet/deit.py --workdir=gs://bucket/deit_b16
  python -m vitoken.train --config=configs/imagenet/deit.py:variant=S/16 --workdir=gs://bucket/deit_s16

Should reproduce: DeiT-B 81.8% top-1 on ImageNet-1k val (S/16 79.8%, Ti/16 72.2%; Touvron et al.
2021, "Training data-efficient image transformers & distillation through attention", Table 5,
without the distillation token; facebookresearch/deit's README lists 81.8 / 79.9 / 72.2 for the
released checkpoints, which evaluate at 81.85 / 79.85 / 72.20). This run is the dense checkpoint
the ToMe, EViT and DynamicViT recipes start from (init=<this workdir>) and DynamicViT's teacher.

Recipe (DeiT, Table 9): 300 epochs of 1024 (375,341 steps), AdamW at 5e-4 x 1024/512 with weight
decay 0.05, 5 warmup epochs from 1e-6, cosine to 1e-5, label smoothing 0.1, mixup 0.8 / cutmix
1.0, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, repeated augmentation 3, drop path
0.1; bicubic filters, eval at 224 from a 256 resize. Weight decay applies to kernels only (DeiT:
everything but biases, norms, position embeddings and the class token; kernels are the rest).

Hardware: the paper trains DeiT-B for 300 epochs in 53 hours on a single 8-GPU node (37 hours on
two; the README's two-node command gives 64 images to each of 16 GPUs, mixed precision). This
recipe assumes at least 8 accelerators with >= 32 GB each, data-parallel (128 images a device on
8, fewer on a pod slice: TPU v4-32 or 16 x A100 / H100), float32.

Arguments: variant (B/16 | S/16 | Ti/16) and folder, data_dir, runlocal (configs/imagenet/common.py).
"""
import os
import sys

# Config files are loaded by path: the repository root goes on the path so that the shared
# recipe module imports whatever directory the command runs from.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
from configs.imagenet import common  # noqa: E402

VARIANTS = ("B/16", "S/16", "Ti/16")
# Smoke runs (tests/test_imagenet_recipes.py trains each on mock ImageNet).
SMOKE = ("runlocal",)


def get_config(arg=None):
  arg = common.parse(arg, variant="B/16")
  if arg.variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS} (DeiT's sizes), got {arg.variant!r}")
  c = common.start(arg, variant=arg.variant)
  c.model = common.deit_model(arg.variant)
  common.deit_recipe(c)
  return common.runlocal(c, arg)
