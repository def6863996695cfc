"""Accuracy of a dense-trained model evaluated with ToMe at several r (off the shelf).

  python -m vitoken.train --config=configs/quickstart.py --workdir=/tmp/qs
  python experiments/tome_accuracy.py --workdir=/tmp/qs --rs=0,4,8,12,16,12@-1,14@-1

Reads the run's config and latest checkpoint, evaluates the full test split for each r
(`r`, `r@inflection` for the reference's trending schedules, or `a/b/c/d` per layer;
proportional attention on), and writes a table (r, GFLOPs, images/s, accuracy) and a plot
to experiments/results/tome_accuracy.{md,json,png}.
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import common  # noqa: E402
from vitoken import tasks  # noqa: E402
from vitoken.data import pipeline  # noqa: E402
from vitoken.engine import checkpoint as ckpt_lib  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a finished vitoken.train run")
  p.add_argument("--rs", default="0,4,8,12,16,12@-1,14@-1,16@-1")
  p.add_argument("--batch", type=int, default=500)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = p.parse_args(argv)

  config = ckpt_lib.load_run_config(args.workdir)
  info = pipeline.dataset_info(config.data)
  params = jax.tree.map(jnp.asarray, ckpt_lib.load_params(args.workdir))
  rows = []
  for spec in args.rs.split(","):
    r, _, inflection = spec.partition("@")
    r = [int(v) for v in r.split("/")] if "/" in r else int(r)  # "8/8/4/4": one r per layer
    tome = {"method": "tome", "r": r, "prop_attn": True}
    if inflection:
      tome["inflection"] = float(inflection)
    config.eval_model_overrides = ml_collections.ConfigDict({"token_reduction": tome} if r else {})
    model = tasks.vit_from_config(config.model, info, overrides=config.eval_model_overrides)
    predict = jax.jit(lambda x, m=model: m.apply({"params": params}, x)[0])
    acc, total = common.accuracy(predict, config.data, batch=args.batch)
    probe = jnp.zeros((args.batch, *info.image_shape), jnp.float32)
    rows.append({"r": spec, "GFLOPs/img": common.flops(predict, probe) / args.batch / 1e9,
                 "img/s": common.throughput(predict, probe, batch=args.batch, iters=5),
                 "accuracy": acc, "examples": total})
    print(rows[-1], flush=True)
  dense = rows[0]
  for row in rows:
    row["FLOPs vs dense"] = row["GFLOPs/img"] / dense["GFLOPs/img"]
    row["Δ acc (points)"] = 100 * (row["accuracy"] - dense["accuracy"])
  columns = ["r", "GFLOPs/img", "FLOPs vs dense", "img/s", "accuracy", "Δ acc (points)"]
  table = common.markdown_table(rows, columns)
  print(table)
  meta = {"workdir": os.path.abspath(args.workdir), "device": common.device_name(),
          "model": config.model.to_dict()}
  common.write_results(args.out, "tome_accuracy", rows, table, meta)
  _plot(rows, os.path.join(args.out, "tome_accuracy.png"))


def _plot(rows, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(5, 3.5))
  rows = sorted(rows, key=lambda r: r["GFLOPs/img"])
  ax.plot([r["GFLOPs/img"] for r in rows], [100 * r["accuracy"] for r in rows], "o-")
  for r in rows:
    ax.annotate(f"r={r['r']}", (r["GFLOPs/img"], 100 * r["accuracy"]), fontsize=8,
                textcoords="offset points", xytext=(4, 4))
  ax.set_xlabel("GFLOPs / image")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("ToMe off the shelf on a dense-trained ViT")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
