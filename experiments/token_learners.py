"""Token learners against dense on cluttered digits: accuracy, GFLOPs and images/s.

  python experiments/token_learners.py                        # trains every variant, ~1 h on 2 CPU cores
  python experiments/token_learners.py --runs dense,tl8_loc2  # a subset
  python experiments/token_learners.py --small                # seconds-long smoke version

Trains each variant of `configs/token_learners.py` (64x64 images, 8x8 = 64 patch tokens, six
blocks) in `--workroot/<run>` (finished runs are reused), then evaluates the full test split,
counts FLOPs from XLA's cost analysis (2 per multiply-add) and times inference of every variant
interleaved in the same process (median of several windows, with the min-max spread). One
LookupViT model is also evaluated at a second compressed grid with the same parameters.
Writes experiments/results/token_learners.{json,md,png}.
"""
import argparse
import os
import sys
from typing import Dict, List, NamedTuple, Optional

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import token_learners as configs  # noqa: E402
from experiments import common  # noqa: E402
from vitoken.engine import checkpoint as ckpt_lib  # noqa: E402

# run name -> configs/token_learners.py argument
RUNS = {
    "dense": "method=dense",
    "tl8_loc2": "method=learner,tokens=8,loc=2",
    "tl8_loc4": "method=learner,tokens=8,loc=4",
    "tl16_loc2": "method=learner,tokens=16,loc=2",
    "tl16_loc4": "method=learner,tokens=16,loc=4",
    "tl8_loc2_v1": "method=learner,tokens=8,loc=2,version=v1",
    "fuser8_loc4": "method=fuser,tokens=8,loc=4",
    "lookup4": "method=lookup,grid=4",
    "lookup2": "method=lookup,grid=2",
    "lookup_multi": "method=lookup,grid=4,grids=2/4",
}


class Eval(NamedTuple):
  label: str
  run: str
  grid: Optional[int] = None  # evaluate a LookupViT run at another compressed grid


EVALS = [
    Eval("dense", "dense"),
    Eval("TokenLearner S=8 before block 2", "tl8_loc2"),
    Eval("TokenLearner S=8 before block 4", "tl8_loc4"),
    Eval("TokenLearner S=16 before block 2", "tl16_loc2"),
    Eval("TokenLearner S=16 before block 4", "tl16_loc4"),
    Eval("TokenLearner v1 S=8 before block 2", "tl8_loc2_v1"),
    Eval("TokenFuser S=8 from block 4", "fuser8_loc4"),
    Eval("LookupViT 4x4 (trained 4x4)", "lookup4"),
    Eval("LookupViT 2x2 (trained 2x2)", "lookup2"),
    Eval("LookupViT 2x2 (trained 4x4)", "lookup4", grid=2),
    Eval("LookupViT 4x4 (trained 2x2 and 4x4)", "lookup_multi"),
    Eval("LookupViT 2x2 (trained 2x2 and 4x4)", "lookup_multi", grid=2),
]


def run_config(run: str, small: bool, steps: Optional[int]) -> ml_collections.ConfigDict:
  return common.run_config(configs.get_config, RUNS[run], small, steps)


def train(run: str, workdir: str, small: bool, steps: Optional[int]) -> Dict:
  """Trains (or resumes) one run; returns its summary (the saved one when it had finished)."""
  return common.train_or_reuse(run_config(run, small, steps), workdir)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workroot", default="/tmp/vitoken_token_learners")
  p.add_argument("--runs", default=",".join(r for r in RUNS if r != "tl8_loc2_v1"),
                 help="subset of: " + ",".join(RUNS))
  p.add_argument("--steps", type=int, default=None, help="override every run's total_steps")
  p.add_argument("--small", action="store_true", help="runlocal-sized runs (a smoke test)")
  p.add_argument("--batch", type=int, default=256, help="batch of the timed inference")
  p.add_argument("--windows", type=int, default=7)
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = p.parse_args(argv)
  runs = [r for r in args.runs.split(",") if r]
  unknown = sorted(set(runs) - set(RUNS))
  if unknown:
    raise SystemExit(f"unknown runs {unknown}; known: {sorted(RUNS)}")

  summaries = {}
  for run in runs:
    print(f"== training {run}: {RUNS[run]}", flush=True)
    summaries[run] = train(run, os.path.join(args.workroot, run), args.small, args.steps)

  rows: List[Dict] = []
  predicts: Dict[str, callable] = {}
  probe = None
  for ev in (e for e in EVALS if e.run in runs):
    workdir = os.path.join(args.workroot, ev.run)
    config = ckpt_lib.load_run_config(workdir)
    reduction = "config"
    if ev.grid is not None:
      reduction = dict(config.model.token_reduction.to_dict(), grid=ev.grid)
    model, params, config, info = common.load_run(workdir, reduction)
    fields, predict, probe = common.evaluate_run(model, params, config, info, args.batch,
                                                 summaries.get(ev.run, {}))
    rows.append({"variant": ev.label, "run": ev.run, "config": RUNS[ev.run]
                 + ("" if ev.grid is None else f" (evaluated at grid={ev.grid})"), **fields})
    predicts[ev.label] = predict
    print(rows[-1], flush=True)

  speed = common.interleaved_throughput(predicts, probe, batch=args.batch, windows=args.windows,
                                        iters=args.iters)
  dense = next((r for r in rows if r["run"] == "dense"), rows[0])
  table = common.compare_to_dense(rows, speed, dense)
  print(table)
  meta = common.cost_meta(args, run_config("dense", args.small, args.steps).model)
  common.write_results(args.out, "token_learners", rows, table, meta)
  _plot(rows, os.path.join(args.out, "token_learners.png"))


MARKERS = {"dense": "s", "tl": "o", "fuser": "^", "lookup": "D"}


def _plot(rows, path):
  common.plot_accuracy_vs_cost(
      rows, path, "Token learners vs dense ViT on cluttered digits (64 patch tokens, 6 blocks)",
      marker=lambda row: next(m for k, m in MARKERS.items() if row["run"].startswith(k)),
      label=lambda row: row["variant"].replace("TokenLearner", "TL").replace("LookupViT", "LV"))


if __name__ == "__main__":
  main()
