"""Benchmarks for `python -m vitoken.bench`: images/s and MFU, inference and train steps.

  python -m vitoken.bench --config=configs/bench.py:cpu      # minutes on 2 CPU cores: ratios to dense
  python -m vitoken.bench --config=configs/bench.py:gpu      # the GPU table: S/16, B/16, L/16 at 224 px
  python -m vitoken.bench --config=configs/bench.py:gpu,variant=B/16 --config.batch_sizes=(256,512,1024)

Presets:
  cpu  a small ViT (64 px, 8 px patches, width 192, 4 blocks) in float32, dense against ToMe,
       EViT, top-k and TokenLearner, interleaved in one process: the ratios that matter
  gpu  bf16 on fp32 weights at 224 px, batch 256 (and the largest that fits), attention
       through cuDNN where it can (padded to a multiple of 64 tokens) else XLA, dense against
       ToMe r=8 / r=16 (scatter and one-hot merges) and XLA attention, the L/16 train step
       also scanned with remat; timm and the ToMe reference in the same run
Arguments: the preset, then `variant=S/16` (one backbone), `only=dense+tome_r16` (those
variants; the baseline always runs), `modes=inference`, `batch=256+512`, `tiny` (seconds-long,
for tests).
"""
import ml_collections

from vitoken.train.config import parse_arg

PRESETS = ("cpu", "gpu")
# Every preset's seconds-long mode (tests/test_presets.py runs each through vitoken.bench).
SMOKE = tuple(f"{p},tiny" for p in PRESETS)


def get_config(arg=None):
  preset = (arg or "cpu").split(",")[0]
  if preset not in PRESETS:
    raise ValueError(f"the first argument is the preset, one of {PRESETS}; got {preset!r}")
  arg = parse_arg(",".join((arg or "").split(",")[1:]), variant="", only="", modes="", batch="",
                  tiny=False)
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict({"class_token": True})
  c.num_classes = 1000
  c.channels = 3
  c.modes = ("inference", "train")
  c.peak_tflops = 0.0  # 0: the device's bf16 peak from vitoken.bench.core.PEAK_TFLOPS
  c.check_parity = True
  c.baseline = "dense"  # the variant every "x dense" ratio divides by
  c.out = ""
  c.torch = ml_collections.ConfigDict({"enabled": True, "tome_rs": (0, 8, 16)})
  if preset == "cpu":
    c.backbones = (dict(name="S-64/8", variant="S/8", width=192, depth=4, num_heads=3, mlp_dim=768),)
    c.image_size = 64
    c.batch_sizes = (64,)
    c.dtype = ""
    c.windows, c.iters, c.warmup = 7, 3, 2
    c.variants = {
        "dense": {},
        "tome_r8": {"token_reduction": {"method": "tome", "r": 8}},
        "evit_70": {"token_reduction": {"method": "evit", "keep_rate": 0.7, "layers": [1, 2]}},
        "topk_50": {"token_reduction": {"method": "topk", "keep_rate": 0.5, "layers": [1, 2]}},
        "tokenlearner_8": {"token_reduction": {"method": "token_learner", "num_tokens": 8, "loc": 1}},
    }
    c.torch.tome_rs = (0, 8)
    c.out = "experiments/results"
  else:
    c.backbones = ("S/16", "B/16", "L/16")
    c.image_size = 224
    c.batch_sizes = (256,)
    c.dtype = "bfloat16"
    c.windows, c.iters, c.warmup = 5, 10, 3
    c.variants = {
        "dense": {},
        "dense_xla_attention": {"attention_impl": "xla"},
        "tome_r8": {"token_reduction": {"method": "tome", "r": 8}},
        "tome_r16": {"token_reduction": {"method": "tome", "r": 16}},
        "tome_r16_onehot": {"token_reduction": {"method": "tome", "r": 16, "merge_impl": "onehot"}},
        "dense_scan_remat": {"scan": True, "remat_policy": "dots_with_no_batch_dims_saveable"},
    }
    c.out = "experiments/results"
  if arg.variant:
    c.backbones = (arg.variant,)
  if arg.only:  # e.g. only=dense+tome_r16: those variants (and the baseline)
    names = [c.baseline] + [n for n in arg.only.split("+") if n != c.baseline]
    unknown = sorted(set(names) - set(c.variants))
    if unknown:
      raise ValueError(f"only={arg.only!r} names unknown variants {unknown}; known: {sorted(c.variants)}")
    c.variants = {n: c.variants[n] for n in names}
  if arg.modes:  # e.g. modes=inference or modes=inference+train
    c.modes = tuple(arg.modes.split("+"))
  if arg.batch:  # e.g. batch=256+512+1024
    c.batch_sizes = tuple(int(b) for b in arg.batch.split("+"))
  if arg.tiny:
    c.backbones = (dict(name="tiny", variant="S/8", width=192, depth=3, num_heads=3, mlp_dim=768),)
    c.image_size, c.batch_sizes, c.num_classes = 64, (4,), 10
    c.windows, c.iters, c.warmup = 2, 1, 1
    c.variants = {k: v for k, v in c.variants.items() if k in ("dense", "tome_r8", "evit_70")}
    c.torch.tome_rs = ()
    c.out = ""
  return c
