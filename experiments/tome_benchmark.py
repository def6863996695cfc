"""ToMe inference throughput: images/s and the ratio to dense, per r, per model.

  python experiments/tome_benchmark.py                       # CPU-sized defaults
  python experiments/tome_benchmark.py --batch 256 --dtype bfloat16 --iters 30   # GPU

Random weights and inputs (no download), proportional attention on, class-token ViTs at
224 px as in the ToMe paper. Writes experiments/results/tome_benchmark_<device>.{md,json}.
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import common  # noqa: E402
from vitoken.models import vit  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variants", default="S/16,B/16")
  p.add_argument("--rs", default="0,4,8,16,24")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--attention_impl", default=None)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = p.parse_args(argv)

  dtype = jnp.dtype(args.dtype)
  images = jax.random.normal(jax.random.key(0), (args.batch, args.image_size, args.image_size, 3), dtype)
  rows = []
  for variant in args.variants.split(","):
    params = None
    dense = None
    for r in [int(v) for v in args.rs.split(",")]:
      reduction = {"method": "tome", "r": r, "prop_attn": True} if r else None
      model = vit.Model(1000, variant=variant, dtype=dtype, token_reduction=reduction,
                        attention_impl=args.attention_impl)
      if params is None:
        params = jax.jit(model.init)(jax.random.key(1), images[:1])
      apply = jax.jit(lambda v, x, m=model: m.apply(v, x)[0])
      ips = common.throughput(apply, params, images, batch=args.batch, iters=args.iters)
      gflops = common.flops(apply, params, images) / args.batch / 1e9
      dense = ips if r == 0 else dense
      rows.append({"model": f"ViT-{variant}", "r": r, "GFLOPs/img": gflops, "img/s": ips,
                   "x dense": ips / dense if dense else float("nan")})
      print(rows[-1], flush=True)
  columns = ["model", "r", "GFLOPs/img", "img/s", "x dense"]
  table = common.markdown_table(rows, columns)
  print(table)
  device = common.device_name()
  meta = {"device": device, "batch": args.batch, "dtype": args.dtype, "image_size": args.image_size,
          "iters": args.iters}
  common.write_results(args.out, "tome_benchmark_" + device.split(":")[0], rows, table, meta)


if __name__ == "__main__":
  main()
