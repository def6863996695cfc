"""Token pruning against dense on cluttered digits: accuracy, GFLOPs and images/s.

  python experiments/token_pruning.py                 # trains every run, ~1 h on 2 CPU cores
  python experiments/token_pruning.py --small         # minutes-long smoke version
  python experiments/token_pruning.py --runs dense,dense_ft,evit70   # a subset

Trains a dense ViT of `configs/token_pruning.py` (64 patch tokens plus a class token, eight
blocks, 3000 steps), then fine-tunes it for 500 steps each: dense (the baseline the others are
compared to), with EViT and with DynamicViT (its dense teacher: the same dense run) at two keep
rates each, and with EViT followed by ToMe. Top-k, training-free, is applied to the fine-tuned dense
model's params, alone and followed by ToMe. Every variant is evaluated on the full test split;
FLOPs come from XLA's cost analysis (2 per multiply-add) and inference images/s are timed
interleaved in one process (median of several windows, with the min-max spread). Writes
experiments/results/token_pruning.{json,md,png} and a survivors picture per method.
"""
import argparse
import os
import sys
from typing import Dict, List, NamedTuple, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import token_pruning as configs  # noqa: E402
from experiments import common  # noqa: E402
from vitoken import visualize  # noqa: E402
from vitoken.data import pipeline  # noqa: E402

BASE = "dense"  # trained from scratch; every other run starts from it


def runs(workroot: str) -> Dict[str, str]:
  """run name -> configs/token_pruning.py argument."""
  base = os.path.join(workroot, BASE)
  return {
      BASE: "method=dense",
      "dense_ft": f"method=dense,init={base}",
      "evit70": f"method=evit,keep=0.7,init={base}",
      "evit50": f"method=evit,keep=0.5,init={base}",
      "dynamicvit70": f"method=dynamicvit,keep=0.7,init={base},teacher={base}",
      "dynamicvit50": f"method=dynamicvit,keep=0.5,init={base},teacher={base}",
      "evit70_tome": f"method=evit_tome,keep=0.7,tome=4,init={base}",
  }


class Eval(NamedTuple):
  label: str
  run: str
  # A training-free method applied to the run's params instead of its own token_reduction.
  reduction: Optional[object] = "config"


LAYERS = list(configs.PRUNE_LAYERS)
EVALS = [
    Eval("dense (fine-tuned as the others)", "dense_ft"),
    Eval("top-k ρ=0.7 (training-free)", "dense_ft",
         {"method": "topk", "keep_rate": 0.7, "layers": LAYERS}),
    Eval("top-k ρ=0.5 (training-free)", "dense_ft",
         {"method": "topk", "keep_rate": 0.5, "layers": LAYERS}),
    Eval("EViT ρ=0.7", "evit70"),
    Eval("EViT ρ=0.5", "evit50"),
    Eval("DynamicViT ρ=0.7", "dynamicvit70"),
    Eval("DynamicViT ρ=0.5", "dynamicvit50"),
    Eval("EViT ρ=0.7 at 2, 4 then ToMe r=4", "evit70_tome"),
    Eval("top-k ρ=0.7 at 2, 4 then ToMe r=4 (training-free)", "dense_ft",
         configs.token_reduction("topk_tome", keep=0.7, tome=4)),
]


def traced(reduction):
  """The same token_reduction tracing which patches each token holds (for the pictures)."""
  if isinstance(reduction, (list, tuple)):
    return [traced(r) for r in reduction]
  if isinstance(reduction, dict) and reduction.get("method") in ("tome", "topk", "evit", "dynamicvit"):
    return dict(reduction, trace_source=True)
  return reduction


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workroot", default="/tmp/vitoken_token_pruning")
  p.add_argument("--runs", default=",".join(runs("")), help="subset of: " + ",".join(runs("")))
  p.add_argument("--steps", type=int, default=None, help="override every run's total_steps")
  p.add_argument("--finetune_steps", type=int, default=500,
                 help="steps of every run that starts from the dense one")
  p.add_argument("--small", action="store_true", help="runlocal-sized runs (a smoke test)")
  p.add_argument("--batch", type=int, default=256, help="batch of the timed inference")
  p.add_argument("--windows", type=int, default=7)
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = p.parse_args(argv)

  chosen = [r for r in args.runs.split(",") if r]
  unknown = sorted(set(chosen) - set(runs("")))
  if unknown or BASE not in chosen:
    raise SystemExit(f"--runs must include {BASE!r} and name known runs; unknown: {unknown}")
  summaries = {}
  for run, arg in runs(args.workroot).items():
    if run not in chosen:
      continue
    print(f"== training {run}: {arg}", flush=True)
    steps = args.steps or (None if run == BASE or args.small else args.finetune_steps)
    config = common.run_config(configs.get_config, arg, args.small, steps)
    summaries[run] = common.train_or_reuse(config, os.path.join(args.workroot, run))

  rows: List[Dict] = []
  predicts = {}
  probe = image = None
  pictures = []
  for ev in (e for e in EVALS if e.run in chosen):
    workdir = os.path.join(args.workroot, ev.run)
    model, params, config, info = common.load_run(workdir, ev.reduction)
    fields, predict, probe = common.evaluate_run(model, params, config, info, args.batch,
                                                 summaries.get(ev.run, {}))
    if image is None:
      image = next(iter(pipeline.eval_iterator(config.data, global_batch_size=8)))["image"][:1]
    _, aux = model.clone(token_reduction=traced(model.token_reduction)).apply({"params": params}, image)
    pictures.append((ev.label, visualize.survivors_image(
        image[0], num_prefix=model.num_prefix, grid=aux["state"].grid,
        ids=np.asarray(aux["state"].ids[0]),
        source=None if aux["state"].source is None else np.asarray(aux["state"].source[0]))))
    rows.append({"variant": ev.label, "run": ev.run,
                 "config": runs("<workroot>")[ev.run] if ev.reduction == "config"
                 else f"{runs('<workroot>')[ev.run]} evaluated with {ev.reduction}", **fields})
    predicts[ev.label] = predict
    print(rows[-1], flush=True)

  speed = common.interleaved_throughput(predicts, probe, batch=args.batch, windows=args.windows,
                                        iters=args.iters)
  dense = rows[0]
  table = common.compare_to_dense(rows, speed, dense)
  print(table)
  base = common.run_config(configs.get_config, "method=dense", args.small, args.steps)
  meta = dict(common.cost_meta(args, base.model), finetune_steps=args.finetune_steps,
              train_s={run: s.get("wall_time_s") for run, s in summaries.items()})
  common.write_results(args.out, "token_pruning", rows, table, meta)
  _plot(rows, os.path.join(args.out, "token_pruning.png"))
  _save_pictures(pictures, os.path.join(args.out, "token_pruning_survivors.png"))


def _save_pictures(pictures, path):
  """One row: each variant's survivors on the same test image, upscaled 3x."""
  gap = np.full((pictures[0][1].shape[0], 4, 3), 255, np.uint8)
  row = np.concatenate([part for _, pic in pictures for part in (pic, gap)][:-1], axis=1)
  with open(path, "wb") as f:
    f.write(visualize.png_bytes(row, scale=3))


MARKERS = {"dense": "s", "top-k": "v", "EViT": "o", "DynamicViT": "D"}


def _plot(rows, path):
  common.plot_accuracy_vs_cost(
      rows, path, "Token pruning vs dense ViT on cluttered digits (64 patch tokens, 8 blocks)",
      marker=lambda row: next((m for k, m in MARKERS.items() if row["variant"].startswith(k)), "x"),
      label=lambda row: row["variant"].split(" (")[0])


if __name__ == "__main__":
  main()
