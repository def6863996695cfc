"""EViT: a trained DeiT (configs/imagenet/deit.py) fine-tuned to keep 70% of the attentive
tokens at blocks 4, 7 and 10, the inattentive ones fused into one token.

  python -m vitoken.train --config=configs/imagenet/evit.py:init=gs://bucket/deit_b16 --workdir=gs://bucket/evit_b16
  python -m vitoken.train --config=configs/imagenet/evit.py:variant=S/16,init=gs://bucket/deit_s16 --workdir=gs://bucket/evit_s16

Should reproduce: keep rate 0.7 with token fusion, DeiT-S 79.5% top-1 (79.8% dense; 4.6 -> 3.0
GMACs) on ImageNet-1k val (Liang et al. 2022, "Not All Patches are What You Need: Expediting
Vision Transformers via Token Reorganizations"; youweiliang/evit's README model zoo; its author
confirms 79.5% for this 30-epoch fine-tune of DeiT-S in youweiliang/evit issue #9). DeiT-B
(81.8% dense): unverified; the README and finetune.sh cover DeiT-S only, and the paper's DeiT-B
figure (81.3% at 11.6 GFLOPs, as written here before) could not be checked.

Recipe (the reference's finetune.sh, which the README's "Finetuning" section runs; written for
DeiT-S): 30 epochs from the DeiT checkpoint, 8 GPUs x 256 = 2048 a step (18,767 steps; the paper
used 16 x 128, issue #3), AdamW at 2e-5 x 2048/512 (DeiT's lr scaling) with weight decay 1e-6,
no warmup, cosine to 2e-6 (--min-lr, not scaled), no keep-rate schedule (--shrink_epochs 0
--shrink_start_epoch 0: the rate is 0.7 from the first step), and DeiT's augmentation otherwise
(the reference's main.py keeps DeiT's defaults: RandAugment, mixup / cutmix, random erasing,
label smoothing, repeated augmentation, drop path 0.1).

Hardware: the reference runs on one node of 8 GPUs (256 images each, mixed precision); this
recipe assumes 8+ accelerators with >= 32 GB, data-parallel.

Arguments: init (the DeiT workdir), variant (B/16 | S/16, the DeiT's), keep (default 0.7), and
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

VARIANTS = ("B/16", "S/16")
SMOKE = ("init=<deit.py:runlocal>,runlocal",)


def get_config(arg=None):
  arg = common.parse(arg, variant="B/16", init="", keep=0.7)
  if arg.variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {arg.variant!r}")
  if not arg.init:
    raise ValueError("EViT fine-tunes a trained DeiT: pass init=<configs/imagenet/deit.py's "
                     "workdir>")
  c = common.start(arg, variant=arg.variant)
  c.model = common.deit_model(arg.variant, token_reduction={
      "method": "evit", "keep_rate": arg.keep, "fuse_token": True,
      "layers": list(common.prune_layers(common.depth(arg, arg.variant)))})
  c.init_from.path = arg.init
  common.deit_recipe(c, total=30, batch=2048, warmup=0, base_lr=2e-5, min_lr=2e-6,
                     weight_decay=1e-6)
  return common.runlocal(c, arg)
