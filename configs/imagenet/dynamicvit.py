"""DynamicViT: a trained DeiT (configs/imagenet/deit.py) fine-tuned with learned keep predictors
before blocks 4, 7 and 10 (keeping 70%, 49%, 34% of the patch tokens), distilled from the dense
DeiT as teacher.

  python -m vitoken.train --config=configs/imagenet/dynamicvit.py:init=gs://bucket/deit_b16,teacher=gs://bucket/deit_b16 --workdir=gs://bucket/dynamicvit_b16
  python -m vitoken.train --config=configs/imagenet/dynamicvit.py:variant=S/16,init=gs://bucket/deit_s16,teacher=gs://bucket/deit_s16 --workdir=gs://bucket/dynamicvit_s16

Should reproduce: ρ = 0.7, DeiT-S 79.3% top-1 (79.8% dense; 4.6 -> 2.9 GFLOPs; Rao et al. 2021,
"DynamicViT: Efficient Vision Transformers with Dynamic Token Sparsification", Table 1;
raoyongming/DynamicViT's model zoo: 79.32%, 2.9G) and DeiT-B 81.43% (81.8% dense; 11.4 GFLOPs)
on ImageNet-1k val. The DeiT-B figure is not the NeurIPS paper's (its Table 1 has DeiT-S and
LV-ViT, no DeiT-B; the 81.3% / 17.5 -> 11.2 GFLOPs written here before is unverified): it is
the model zoo's DynamicViT-DeiT-B/0.7 checkpoint, added with the journal version's code (Rao et
al. 2022, "Dynamic Spatial Sparsification for Efficient Vision Transformers and Convolutional
Neural Networks") together with the DeiT-B command below.

Recipe, per variant as the reference trained each checkpoint (its README's commands, main.py):
- S/16 (the NeurIPS code, main_dynamic_vit.py, README of 2021): 30 epochs from the DeiT
  checkpoint, 8 GPUs x 96 = 768 a step (50,045 steps), AdamW at 5e-4 x 768/512, weight decay
  0.05, cosine to 1e-5, drop path 0.1, DeiT's augmentation with repeated augmentation; the
  predictors on the cosine at the full lr, the pretrained backbone at 0.01x. Difference: the
  reference has no lr warmup; it freezes the backbone (lr 0) for the first 5 epochs and then
  runs it at min(0.01 lr, the cosine); here all parameters warm up linearly for 5 epochs and the
  backbone is at 0.01x throughout (lr_scale).
- B/16 (the journal code's main.py and its DeiT-B command): 30 epochs, 8 GPUs x 128 = 1024 a
  step (37,534 steps), AdamW at 1e-3 (5e-4 x 1024/512), weight decay 0.05, 5 warmup epochs,
  cosine to 1e-6, backbone at 0.01x (lr_scale), drop path 0.2, keep-ratio weight 5.0, DeiT's
  augmentation without repeated augmentation (its sampler is torch's DistributedSampler).
The loss is labels 1.0 + the keep-ratio MSE (weight 2.0, B/16 5.0, averaged over the three
stages) + 0.5 each of the KL to the dense teacher's logits and the MSE to its kept final tokens
(configs/token_pruning.py's DYNAMICVIT_TASK).

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
# Per variant, the reference command its checkpoint was trained with (see the docstring): batch,
# cosine floor, drop path, keep-ratio loss weight, repeated augmentation.
RECIPES = {"S/16": dict(batch=768, min_lr=1e-5, drop_path=0.1, ratio_weight=2.0, repeats=3),
           "B/16": dict(batch=1024, min_lr=1e-6, drop_path=0.2, ratio_weight=5.0, repeats=1)}
_DENSE = "<deit.py:runlocal>"
SMOKE = (f"init={_DENSE},teacher={_DENSE},runlocal",)


def get_config(arg=None):
  arg = common.parse(arg, variant="B/16", init="", teacher="", keep=0.7)
  if arg.variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {arg.variant!r}")
  if not (arg.init and arg.teacher):
    raise ValueError("DynamicViT fine-tunes a trained DeiT and distills from it: pass "
                     "init=<configs/imagenet/deit.py's workdir>,teacher=<the same workdir>")
  recipe = RECIPES[arg.variant]
  c = common.start(arg, variant=arg.variant)
  c.model = common.deit_model(arg.variant, drop_path_rate=recipe["drop_path"], token_reduction={
      "method": "dynamicvit", "keep_rate": arg.keep, "ratio_weight": recipe["ratio_weight"],
      "layers": list(common.prune_layers(common.depth(arg, arg.variant)))})
  c.init_from.path = arg.init
  # The predictors start fresh; the backbone keeps the DeiT weights and moves at 0.01x.
  c.init_from.exclude = r"(^|/)dynamicvit/"
  c.optim.lr_scale = ((r"(^|/)dynamicvit/", 1.0), (".*", 0.01))
  c.task = dict(token_pruning.DYNAMICVIT_TASK, teacher=dict(path=arg.teacher))
  common.deit_recipe(c, total=30, batch=recipe["batch"], warmup=5, min_lr=recipe["min_lr"])
  if "repeated_augmentation" in c.data:
    c.data.repeated_augmentation = recipe["repeats"]
  return common.runlocal(c, arg)
