"""ToMe off the shelf: a trained dense ViT-B/16 evaluated on ImageNet-1k val with token merging
(r tokens merged in every block, proportional attention), without training.

  python -m vitoken.train --config=configs/imagenet/tome_off_the_shelf.py:init=gs://bucket/deit_b16 --workdir=gs://bucket/deit_b16_tome16
  python -m vitoken.train --config=configs/imagenet/tome_off_the_shelf.py:weights=augreg,r=13,init=gs://vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz --workdir=gs://bucket/augreg_b16_tome13

Should reproduce: the second command, AugReg's ViT-B/16 (ImageNet-21k, fine-tuned on 1k; timm's
vit_base_patch16_224 of 2022) at r=13: 84.57% dense -> 82.60% with ToMe, off the shelf (the ToMe
reference README, facebookresearch/ToMe, "expected results ... off-the-shelf"; Bolya et al.
2023, "Token Merging: Your ViT but Faster"). The first, r=16 on configs/imagenet/deit.py's
DeiT-B (81.8% dense), has no verified reference figure: the README gives off-the-shelf numbers
for AugReg, SWAG and MAE models only, and its DeiT rows (DeiT-S 79.36%, DeiT-Ti 71.27% at r=13)
are models trained with ToMe; an off-the-shelf DeiT-B accuracy at r=16 in the paper is
unverified.

How: the dense weights load through init_from (a vitoken workdir, or a big_vision .npz such as
AugReg's), then one step at learning rate 0 (weight decay is scaled by it, so nothing moves:
the trainer evaluates after steps) and the evaluation of the whole validation split with ToMe.

Hardware: evaluation only: one accelerator with >= 16 GB suffices (ToMe's README measures on
one V100); the mesh is data-parallel, so a pod slice only finishes sooner.

Arguments: init (the dense run's workdir or an .npz), r (default 16), weights (deit: timm's DeiT
preprocessing, ImageNet mean/std and crop 0.875; augreg: mean/std 0.5 and crop 0.9, as timm
evaluates AugReg), and folder, data_dir, runlocal (configs/imagenet/common.py).
"""
import os
import sys

# Config files are loaded by path: the repository root goes on the path so that the shared
# recipe module imports whatever directory the command runs from.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
from configs.imagenet import common  # noqa: E402

WEIGHTS = ("deit", "augreg")
# ToMe merges r of the 65 tokens runlocal's toy encoder starts with in each of its 4 blocks.
TOY_R = 2
SMOKE = ("init=<deit.py:runlocal>,runlocal",)


def get_config(arg=None):
  arg = common.parse(arg, init="", r=16, weights="deit")
  if arg.weights not in WEIGHTS:
    raise ValueError(f"weights must be one of {WEIGHTS}, got {arg.weights!r}")
  if not arg.init:
    raise ValueError("ToMe off the shelf evaluates trained weights: pass init=<a dense run's "
                     "workdir (configs/imagenet/deit.py) or a big_vision .npz>")
  c = common.start(arg)
  c.model = common.deit_model("B/16", drop_path_rate=0.0)
  c.model.token_reduction = {"method": "tome", "r": TOY_R if arg.runlocal else arg.r,
                             "prop_attn": True}
  if arg.weights == "augreg":
    c.data.mean, c.data.std, c.data.crop_pct = (0.5,), (0.5,), 0.9
  c.init_from.path = arg.init
  c.batch_size = 1024
  c.total_steps = 1
  c.optim.lr = 0.0
  c.schedule.decay = "constant"
  c.data.random_resized_crop = False
  c.data.flip = False
  common.runlocal(c, arg)
  c.total_steps = 1
  c.schedule.warmup_steps = 0
  return c
