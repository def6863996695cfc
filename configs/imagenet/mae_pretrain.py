"""MAE pretraining of ViT-B/16 (or L/16, FSDP) on ImageNet-1k images, labels unused.

  python -m vitoken.train --config=configs/imagenet/mae_pretrain.py --workdir=gs://bucket/mae_b16
  python -m vitoken.train --config=configs/imagenet/mae_pretrain.py:variant=L/16 --workdir=gs://bucket/mae_l16

Should reproduce (through configs/imagenet/mae_finetune.py and mae_linear_probe.py, which start
from this workdir): after 1600 epochs, ViT-B/16 83.6% top-1 fine-tuned and 68.0% linear probe;
ViT-L/16 85.9% fine-tuned and 75.8% probed (He et al. 2022, "Masked Autoencoders Are Scalable
Vision Learners", Table 3 and appendix A). Pretraining itself reports the eval split's masked
pixel loss.

Recipe (MAE's PRETRAIN.md, main_pretrain.py and appendix A.1): 1600 epochs of 4096 (500,455
steps; epochs=800 halves it: the paper's 800-epoch ablations are of ViT-L, 85.4% fine-tuned,
"paper Table 1d" in PRETRAIN.md; a ViT-B 800-epoch figure is unverified), AdamW (0.9, 0.95) at
1.5e-4 x 4096/256 with weight decay 0.05, 40 warmup epochs then cosine to 0, random-resized
crops of scale 0.2-1 and flips only, mask ratio 0.75, per-patch normalised pixel loss, decoder 8
blocks of 512 with 16 heads.

Hardware: the paper's runs are TensorFlow on TPUs (FINETUNE.md; their size is unverified here);
PRETRAIN.md's PyTorch run of ViT-L, 800 epochs, takes ~42 h on 64 V100s (64 images each). This
recipe assumes a TPU pod slice of 128+ cores or 32+ GPUs of >= 40 GB; B/16 is data-parallel,
L/16 shards its parameters and Adam moments over 8 devices (FSDP, one host or node) and
data-parallel across.

Arguments: variant (B/16 | L/16), epochs (default 1600), and folder, data_dir, runlocal
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

SMOKE = ("runlocal", "variant=L/16,runlocal")


def get_config(arg=None):
  arg = common.parse(arg, variant="B/16", epochs=1600)
  if arg.variant not in common.MAE_VARIANTS:
    raise ValueError(f"variant must be one of {common.MAE_VARIANTS}, got {arg.variant!r}")
  c = common.start(arg, variant=arg.variant)
  c.model = dict(variant=arg.variant, **common.MAE_ENCODER)
  c.task = dict(name="mae", mask_ratio=0.75, norm_pix_loss=True, decoder_width=512,
                decoder_depth=8, decoder_heads=16)
  c.data.crop_scale = (0.2, 1.0)
  common.epochs(c, total=arg.epochs, batch=4096, warmup=40)
  common.adamw(c, lr=1.5e-4 * 4096 / 256, weight_decay=0.05, b2=0.95)
  common.runlocal(c, arg)
  if arg.runlocal:
    c.task.update(decoder_width=32, decoder_depth=1, decoder_heads=2)
  return c
