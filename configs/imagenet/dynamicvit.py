"""DynamicViT: a trained DeiT (configs/imagenet/deit.py) fine-tuned with learned keep predictors
before blocks 4, 7 and 10 (keeping 70%, 49%, 34% of the patch tokens), distilled from the dense
DeiT as teacher.

  python -m vitoken.train --config=configs/imagenet/dynamicvit.py:init=gs://bucket/deit_b16,teacher=gs://bucket/deit_b16 --workdir=gs://bucket/dynamicvit_b16
  python -m vitoken.train --config=configs/imagenet/dynamicvit.py:variant=S/16,init=gs://bucket/deit_s16,teacher=gs://bucket/deit_s16 --workdir=gs://bucket/dynamicvit_s16

Should reproduce: ρ = 0.7, DeiT-S 79.3% top-1 (79.8% dense; 4.6 -> 2.9 GFLOPs) and DeiT-B 81.3%
(81.8% dense; 17.5 -> 11.2 GFLOPs) on ImageNet-1k val (Rao et al. 2021, "DynamicViT: Efficient
Vision Transformers with Dynamic Token Sparsification", Table 1).

Recipe (the reference's README and main.py): 30 epochs from the DeiT checkpoint, 8 GPUs x 96 =
768 a step (50,045 steps), AdamW at 5e-4 x 768/512, weight decay 0.05, 5 warmup epochs, cosine
to 1e-5, the predictors at the full lr and the pretrained backbone at 0.01x (lr_scale), DeiT's
augmentation; the loss is labels 1.0 + keep-ratio MSE 2.0 + 0.5 each of the KL to the dense
teacher's logits and the MSE to its final tokens (configs/token_pruning.py's DYNAMICVIT_TASK).

Hardware: the reference runs on one node of 8 GPUs; this recipe assumes 8+ accelerators with
>= 32 GB (the frozen teacher runs forward beside the student), data-parallel.

Arguments: init and teacher (the DeiT workdir, both), variant (B/16 | S/16, the DeiT's), keep
(ρ, default 0.7), and folder, data_dir, runlocal (configs/imagenet/common.py).
"""
import os
import sys

# Config files are loaded by path: the repository root goes on the path so that the shared
# recipe module imports whatever directory the command runs from.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
from configs import token_pruning  # noqa: E402
from configs.imagenet import common  # noqa: E402

VARIANTS = ("B/16", "S/16")
_DENSE = "<deit.py:runlocal>"
SMOKE = (f"init={_DENSE},teacher={_DENSE},runlocal",)


def get_config(arg=None):
  arg = common.parse(arg, variant="B/16", init="", teacher="", keep=0.7)
  if arg.variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {arg.variant!r}")
  if not (arg.init and arg.teacher):
    raise ValueError("DynamicViT fine-tunes a trained DeiT and distills from it: pass "
                     "init=<configs/imagenet/deit.py's workdir>,teacher=<the same workdir>")
  c = common.start(arg, variant=arg.variant)
  c.model = common.deit_model(arg.variant, token_reduction={
      "method": "dynamicvit", "keep_rate": arg.keep,
      "layers": list(common.prune_layers(common.depth(arg, arg.variant)))})
  c.init_from.path = arg.init
  # The predictors start fresh; the backbone keeps the DeiT weights and moves at 0.01x.
  c.init_from.exclude = r"(^|/)dynamicvit/"
  c.optim.lr_scale = ((r"(^|/)dynamicvit/", 1.0), (".*", 0.01))
  c.task = dict(token_pruning.DYNAMICVIT_TASK, teacher=dict(path=arg.teacher))
  common.deit_recipe(c, total=30, batch=768, warmup=5)
  return common.runlocal(c, arg)
