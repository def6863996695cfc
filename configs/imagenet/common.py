"""What the ImageNet-1k recipes share: the data (TFDS `imagenet2012` stored as array_record, or
an image folder tree), epochs turned into steps, DeiT's training recipe, the masked-modeling
fine-tune, and the `runlocal` shrink their smoke runs use.

Every recipe takes these arguments besides its own (comma-separated, after the file's colon):
  folder    an ImageNet folder tree, <folder>/train/<wnid>/*.JPEG and <folder>/val/<wnid>/*.JPEG,
            read instead of TFDS (no preparation, no TensorFlow)
  data_dir  the TFDS data dir holding imagenet2012/<version>/ (default: $TFDS_DATA_DIR, else
            ~/tensorflow_datasets); see docs/training.md, ImageNet, to build it once
  runlocal  the recipe at toy size for smoke runs: two steps of 32 images at 64 px through a
            four-block encoder of width 32 with 8 px patches, evaluated at the end, still reading
            imagenet2012 (tests/test_imagenet_recipes.py serves it with tfds.testing.mock_data)
            and keeping the recipe's mesh
"""
import ml_collections

from vitoken.data import config as data_config
from vitoken.models import variants
from vitoken.train.config import base_config, parse_arg, runlocal as base_runlocal

IMAGENET_TRAIN = 1_281_167
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# runlocal's encoder and images: 8x8 = 64 patches keep every reducer's token arithmetic
# non-trivial (ToMe r=2, pruning to 70%, 49%, 34%, 8 learned tokens) while a step takes
# milliseconds. At 16 patches (32 px) DynamicViT's three stages (11, 7, 5 kept) turned its
# training loss NaN within three steps, even at lr 0; one stage, or 64 patches, trains.
TOY_MODEL = dict(width=32, depth=4, mlp_dim=64, num_heads=2, patch_size=(8, 8))
TOY_IMAGE = 64
# L/16's params and Adam moments (~3.6 GB in float32) are sharded over 8 devices: one TPU host or
# GPU node, so FSDP's all-gathers stay on the fast interconnect and data parallelism spans hosts.
FSDP_VARIANTS = {"L/16": 8}


def parse(arg, **defaults) -> ml_collections.ConfigDict:
  """The recipe's arguments plus the shared ones (see the module docstring)."""
  return parse_arg(arg, **defaults, folder="", data_dir="", runlocal=False)


def steps(epochs: float, batch: int) -> int:
  """Optimizer steps of `epochs` passes over ImageNet's 1,281,167 training images."""
  return int(epochs * IMAGENET_TRAIN // batch)


def depth(arg, variant: str) -> int:
  """The encoder's depth: the variant's, or runlocal's toy one (reducer layers scale with it)."""
  return TOY_MODEL["depth"] if arg.runlocal else variants.decode_variant(variant)["depth"]


def start(arg, *, variant: str = "B/16") -> ml_collections.ConfigDict:
  """base_config() reading ImageNet at 224 px with the recipes' logging, checkpoints and mesh."""
  c = base_config()
  c.data.image_size = 224
  c.data.random_resized_crop = True
  c.data.flip = True
  c.data.mean, c.data.std = MEAN, STD
  # timm's eval transform (shorter side 256, centre 224) and filters, as DeiT and MAE evaluate.
  c.data.crop_pct = 0.875
  c.data.interpolation = "bicubic"
  if arg.folder:
    c.data.folder = arg.folder
    c.data.train_split, c.data.eval_split = "train", "val"
  else:
    c.data.name = "imagenet2012"
    c.data.eval_split = "validation"
    if arg.data_dir:
      c.data.data_dir = arg.data_dir
  c.mesh.fsdp = FSDP_VARIANTS.get(variant, 1)
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint.every_steps = 2500
  return c


def epochs(c, *, total: float, batch: int, warmup: float) -> None:
  c.batch_size = batch
  c.total_steps = steps(total, batch)
  c.schedule.warmup_steps = steps(warmup, batch)


def deit_augmentation(c) -> None:
  """DeiT's training augmentation and regularisation (Touvron et al. 2021, Table 9)."""
  c.data.randaugment = "rand-m9-mstd0.5-inc1"
  c.data.random_erasing = 0.25
  c.data.random_erasing_mode = "pixel"
  c.data.mixup_alpha, c.data.cutmix_alpha = 0.8, 1.0
  c.label_smoothing = 0.1
  # DeiT shows each image 3 times per epoch (repeated augmentation), which it found essential.
  if "repeated_augmentation" in data_config.DEFAULTS:
    c.data.repeated_augmentation = 3


def deit_model(variant: str, **fields) -> dict:
  """timm's DeiT ViT: class token read by the head, learned position embeddings."""
  return {**dict(variant=variant, class_token=True, pool_type="tok", posemb="learn",
                 drop_path_rate=0.1), **fields}


def adamw(c, *, lr: float, weight_decay: float = 0.05, min_lr: float = 0.0,
          warmup_lr: float = 0.0, b2: float = 0.999) -> None:
  """AdamW with linear warmup from `warmup_lr` and a cosine to `min_lr` (timm's schedule)."""
  c.optim.name = "adamw"
  c.optim.lr = lr
  c.optim.b2 = b2
  c.optim.weight_decay = weight_decay
  c.schedule.decay = "cosine"
  c.schedule.end_factor = min_lr / lr
  c.schedule.warmup_init_factor = warmup_lr / lr


def deit_recipe(c, *, total: float = 300, batch: int = 1024, warmup: float = 5,
                base_lr: float = 5e-4, min_lr: float = 1e-5, weight_decay: float = 0.05) -> None:
  """DeiT's optimisation: AdamW at base_lr x batch / 512, warmup from 1e-6, cosine to min_lr."""
  epochs(c, total=total, batch=batch, warmup=warmup)
  adamw(c, lr=base_lr * batch / 512, weight_decay=weight_decay, min_lr=min_lr, warmup_lr=1e-6)
  deit_augmentation(c)


def prune_layers(n: int) -> tuple:
  """EViT's and DynamicViT's pruning blocks: 3, 6, 9 of 12 (0-based; 4, 7, 10 counted from 1)."""
  return (n // 4, n // 2, 3 * n // 4)


def masked_finetune(c, *, init: str, total: float, batch: int, lr: float, layer_decay: float,
                    drop_path: float, warmup: float, **model) -> None:
  """Fine-tuning a masked-modeling encoder (MAE's main_finetune.py; SimMIM and BEiT the same
  but for their numbers): global pooling with a LayerNorm after it and a fresh head, AdamW
  with layer-wise lr decay, DeiT's augmentation, cosine to 1e-6. `model`: the encoder fields
  its pretraining set beyond the variant (they must match for its weights to load)."""
  if not init:
    raise ValueError("a fine-tune starts from a pretraining run: pass init=<its workdir>")
  c.init_from.path = init
  c.init_from.subtree = "encoder"
  c.init_from.exclude = "^(head|fc_norm)/"
  c.model.update(pool_type="gap", fc_norm=True, drop_path_rate=drop_path, **model)
  epochs(c, total=total, batch=batch, warmup=warmup)
  adamw(c, lr=lr, weight_decay=0.05, min_lr=1e-6)
  c.optim.layer_decay = layer_decay
  deit_augmentation(c)
  # MAE's fine-tune samples with timm's default sampler, not DeiT's repeated augmentation.
  if "repeated_augmentation" in c.data:
    c.data.repeated_augmentation = 1


def runlocal(c, arg) -> ml_collections.ConfigDict:
  """The recipe at toy size when `runlocal` is set (see the module docstring)."""
  if not arg.runlocal:
    return c
  base_runlocal(c, checkpoint_every=2)
  c.total_steps = 2
  c.schedule.warmup_steps = 1
  c.eval_every_steps = 0  # once, at the end
  c.log_every_steps = 1
  c.data.image_size = TOY_IMAGE
  if "variant" in c.model:
    c.model.update(TOY_MODEL)
  return c


# MAE's encoder (facebookresearch/mae models_vit.py): a class token and fixed 2-D sin-cos
# position embeddings, the same in pretraining, fine-tuning and the linear probe.
MAE_ENCODER = dict(class_token=True, posemb="sincos2d_mae")
MAE_VARIANTS = ("B/16", "L/16")
# MAE's FINETUNE.md per size: epochs, base lr (per 256 images), layer decay, drop path.
MAE_FINETUNE = {"B/16": (100, 5e-4, 0.65, 0.1), "L/16": (50, 1e-3, 0.75, 0.2)}


def mae_finetune(c, arg, variant: str) -> None:
  """MAE's end-to-end fine-tune of its pretrained encoder (batch 1024, 5 warmup epochs)."""
  if variant not in MAE_VARIANTS:
    raise ValueError(f"variant must be one of {MAE_VARIANTS}, got {variant!r}")
  total, base_lr, layer_decay, drop_path = MAE_FINETUNE[variant]
  c.model = dict(variant=variant, **MAE_ENCODER)
  masked_finetune(c, init=arg.init, total=total, batch=1024, lr=base_lr * 1024 / 256,
                  layer_decay=layer_decay, drop_path=drop_path, warmup=5)
