"""MAE linear probe: a linear classifier on the frozen encoder of configs/imagenet/mae_pretrain.py.

  python -m vitoken.train --config=configs/imagenet/mae_linear_probe.py:init=gs://bucket/mae_b16 --workdir=gs://bucket/mae_b16_lin

Should reproduce: ViT-B/16 68.0% top-1 on ImageNet-1k val (ViT-L/16 75.8%) from 1600-epoch
pretraining (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners"; the "paper
(TF/TPU)" row of the linear-probing table in facebookresearch/mae's FINETUNE.md, whose PyTorch
rerun gives 67.8% and 76.0%), with the optimizer caveat below.

Recipe (MAE's FINETUNE.md, "Linear Probing", and main_linprobe.py; the repository has no
LINPROBE.md): the class token after the encoder's final LayerNorm, only the head trained (the
encoder frozen, no optimizer state for it), 90 epochs of 16384 (7,037 steps), 10 warmup epochs,
cosine, no weight decay, random-resized crops and flips only. MAE trains the head with LARS (lr
0.1 x 16384/256) behind a BatchNorm without affine parameters; vitoken has neither, so this
recipe trains it with AdamW at 1e-3, which may land below the paper's figure.

Hardware: the probe runs the frozen encoder forward only: 8+ accelerators with >= 16 GB at 16384
images a step (2048 a device on 8: lower batch_size, the lr with it, on smaller memories).

Arguments: init (the pretraining workdir), variant (B/16 | L/16), and folder, data_dir, runlocal
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

SMOKE = ("init=<mae_pretrain.py:runlocal>,runlocal",)


def get_config(arg=None):
  arg = common.parse(arg, variant="B/16", init="")
  if arg.variant not in common.MAE_VARIANTS:
    raise ValueError(f"variant must be one of {common.MAE_VARIANTS}, got {arg.variant!r}")
  if not arg.init:
    raise ValueError("the linear probe reads a pretraining run: pass init=<its workdir>")
  c = common.start(arg, variant=arg.variant)
  c.model = dict(variant=arg.variant, pool_type="tok", **common.MAE_ENCODER)
  c.init_from.update(path=arg.init, subtree="encoder", exclude="^head/")
  c.optim.trainable_regex = "^head/"
  common.epochs(c, total=90, batch=16384, warmup=10)
  common.adamw(c, lr=1e-3, weight_decay=0.0)
  return common.runlocal(c, arg)
