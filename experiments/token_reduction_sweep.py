"""Every token method on one backbone: accuracy, FLOPs, inference and training images/s.

  python experiments/token_reduction_sweep.py                   # every row, ~1.5 h on 2 CPU cores
  python experiments/token_reduction_sweep.py --small           # a minutes-long smoke version
  python experiments/token_reduction_sweep.py --methods=dense,tome_off,evit --budgets=0.7 --seeds=1

The runs are those of configs/token_reduction_sweep.py (one backbone, one recipe): a dense ViT
trained from scratch, then every method fine-tuned from it for the same steps, the dense
fine-tune being the baseline; top-k and ToMe off the shelf are applied, training-free, to the
fine-tuned dense params; MAE pretrains the same encoder and fine-tunes it with ToMe on (and off,
MAE's own dense reference). Each method runs at two or three budgets (`BUDGETS`: about 0.7x and
0.5x dense FLOPs, and a lower one where the method reaches it). Dense and the most accurate row
of each family (merging, learning, pruning, masked modeling) run with `--seeds` seeds (mean and
spread; a seed varies the fine-tune: data order, dropout and new modules, on one dense base),
the other rows with one.

Every row is evaluated on the whole test split; analytic GFLOPs come from
`vitoken.bench.flops`, XLA GFLOPs from the compiled inference program (both 2 per multiply-add);
inference and training (forward, backward, AdamW) images/s of all rows are timed in one
interleaved run on the current device (median of `--windows` windows, min-max spread).
Finished runs and evaluations are reused (`--workroot`). Writes
experiments/results/sweep.{json,md,png}.
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import token_reduction_sweep as configs  # noqa: E402
from experiments import common  # noqa: E402

DENSE_BASE = "dense"  # from scratch; every fine-tune starts from it
MAE_BASE = "mae_pretrain"
FAMILIES = {"merging": ("tome_off", "tome", "evit_tome"),
            "learning": ("token_learner", "token_fuser", "lookup"),
            "pruning": ("topk", "evit", "dynamicvit"),
            "masked modeling": ("mae_tome",)}
# method -> budget -> its setting: configs/token_reduction_sweep.py arguments for the trained
# methods; for the training-free ones (applied to the fine-tuned dense run) a token_reduction.
# The budget names are the intended FLOPs fraction; the table reports the measured one.
PRUNE = list(configs.PRUNE_LAYERS)
BUDGETS: Dict[str, Dict[str, Any]] = {
    "tome_off": {"0.7": {"method": "tome", "r": 6, "prop_attn": True},
                 "0.5": {"method": "tome", "r": 11, "prop_attn": True},
                 "low": {"method": "tome", "r": 16, "prop_attn": True}},
    "tome": {"0.7": "r=6", "0.5": "r=11"},
    "token_learner": {"0.7": "tokens=16,loc=4", "0.5": "tokens=8,loc=3", "low": "tokens=8,loc=2"},
    "token_fuser": {"0.7": "tokens=16,loc=4", "0.5": "tokens=8,loc=3"},
    "lookup": {"0.7": "grid=4", "low": "grid=2"},
    "topk": {"0.7": {"method": "topk", "keep_rate": 0.7, "layers": PRUNE},
             "0.5": {"method": "topk", "keep_rate": 0.5, "layers": PRUNE},
             "low": {"method": "topk", "keep_rate": 0.3, "layers": PRUNE}},
    "evit": {"0.7": "keep=0.7", "0.5": "keep=0.5"},
    "dynamicvit": {"0.7": "keep=0.7", "0.5": "keep=0.5"},
    "evit_tome": {"0.7": "keep=0.7,r=8", "0.5": "keep=0.5,r=4"},
    "mae_tome": {"1": "r=0", "0.7": "r=6", "0.5": "r=11"},
}
METHODS = ("dense", *BUDGETS)
TRAINING_FREE = ("tome_off", "topk")
LABELS = {"dense": "dense", "tome_off": "ToMe off the shelf", "tome": "ToMe trained",
          "token_learner": "TokenLearner", "token_fuser": "TokenFuser", "lookup": "LookupViT",
          "topk": "top-k (training-free)", "evit": "EViT", "dynamicvit": "DynamicViT",
          "evit_tome": "EViT then ToMe", "mae_tome": "MAE → fine-tune with ToMe"}


@dataclasses.dataclass(frozen=True)
class Row:
  """One table row: a method at a budget, evaluated from one trained run per seed."""
  method: str
  budget: str

  @property
  def label(self) -> str:
    return LABELS[self.method] + ("" if self.method == "dense" else f" {self.setting_text}")

  @property
  def setting_text(self) -> str:
    s = BUDGETS[self.method][self.budget]
    if isinstance(s, dict):
      return ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("method", "layers"))
    return s

  def run(self, seed: int) -> str:
    """The workdir name of the trained run this row evaluates."""
    if self.method == "dense" or self.method in TRAINING_FREE:
      return f"dense_ft_s{seed}"
    return f"{self.method}_{self.setting_text.replace('=', '').replace(',', '_')}_s{seed}"

  def run_arg(self, workroot: str, seed: int) -> str:
    base = os.path.join(workroot, DENSE_BASE)
    if self.method == "dense" or self.method in TRAINING_FREE:
      return f"method=dense,init={base},seed={seed}"
    if self.method == "mae_tome":
      return f"method=mae,{self.setting_text},init={os.path.join(workroot, MAE_BASE)},seed={seed}"
    return f"method={self.method},{self.setting_text},init={base},seed={seed}"

  @property
  def reduction(self):
    """What the evaluation applies to the run's params: its own config, or a training-free method."""
    return BUDGETS[self.method][self.budget] if self.method in TRAINING_FREE else "config"

  @property
  def family(self) -> str:
    return next((f for f, ms in FAMILIES.items() if self.method in ms), "dense")


def plan(methods: Sequence[str], budgets: Optional[Sequence[str]]) -> List[Row]:
  rows = [Row("dense", "1")]
  for m in methods:
    if m == "dense":
      continue
    rows += [Row(m, b) for b in BUDGETS[m] if budgets is None or b in budgets or
             (m == "mae_tome" and b == "1")]
  return rows


def _train(row: Row, seed: int, args, summaries: Dict[str, Dict]) -> None:
  name = row.run(seed)
  if name in summaries:
    return
  needs = [DENSE_BASE] if row.method != "mae_tome" else [MAE_BASE]
  for base, arg in ((DENSE_BASE, "method=dense"), (MAE_BASE, "method=mae_pretrain")):
    if base in needs and base not in summaries:
      summaries[base] = _train_one(base, arg, args)
  summaries[name] = _train_one(name, row.run_arg(args.workroot, seed), args)


def _train_one(name: str, arg: str, args) -> Dict:
  print(f"== {name}: {arg}", flush=True)
  config = configs.get_config(arg + (",runlocal" if args.small else ""))
  config.progress_bar = False
  return common.train_or_reuse(config, os.path.join(args.workroot, name))


def _evaluate(row: Row, seed: int, args, cache: Dict[str, Dict]) -> Dict:
  """Test accuracy of a row's seed (cached in the workroot: evaluations are reused too)."""
  key = f"{row.run(seed)}|{json.dumps(row.reduction, sort_keys=True)}"
  if key not in cache:
    model, params, config, _ = common.load_run(os.path.join(args.workroot, row.run(seed)),
                                               row.reduction)
    predict = jax.jit(lambda x: model.apply({"params": params}, x)[0])
    acc, total = common.accuracy(predict, config.data)
    cache[key] = {"accuracy": acc, "examples": total}
    common.save_json(os.path.join(args.workroot, "evaluations.json"), cache)
  return cache[key]


def _best_rows(rows: List[Row], accuracy: Dict[Row, float]) -> List[Row]:
  """The most accurate reduced row of each family (seed 0), the rows that get more seeds."""
  best = {}
  for row in rows:
    if row.method == "dense" or (row.method == "mae_tome" and row.budget == "1"):
      continue
    if row.family not in best or accuracy[row] > accuracy[best[row.family]]:
      best[row.family] = row
  return list(best.values())


def _timing(rows: List[Row], args) -> Dict[str, Dict[str, Dict[str, float]]]:
  """Inference and training images/s and XLA GFLOPs of every row (seed 0), interleaved."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from vitoken.bench import core, flops as flops_lib  # pylint: disable=import-outside-toplevel
  out: Dict[str, Dict[str, Any]] = {}
  programs = {mode: {} for mode in ("inference", "train")}
  for row in rows:
    model, params, config, info = common.load_run(os.path.join(args.workroot, row.run(0)),
                                                  row.reduction)
    images = jnp.zeros((1, *info.image_shape), jnp.float32)
    out[row.label] = flops_lib.summary(model, params, images)
    for mode in programs:
      case = core.TimedProgram(model, params, mode, args.batch, info.image_shape[0],
                               info.image_shape[-1])
      programs[mode][row.label] = case
      out[row.label][f"XLA GFLOPs/img ({mode})"] = case.xla_flops / 1e9
  for mode, cases in programs.items():
    speed = core.interleaved_throughput({k: c.run for k, c in cases.items()}, batch=args.batch,
                                        windows=args.windows, iters=args.iters)
    for label, s in speed.items():
      out[label][f"{mode} img/s"] = s
  return out


def _row_fields(row: Row, seeds: List[int], evals: List[Dict], timing: Dict, summaries,
                args) -> Dict[str, Any]:
  accs = [e["accuracy"] for e in evals]
  t = timing[row.label]
  trained = row.method not in TRAINING_FREE
  wall = [summaries.get(row.run(s), {}).get("wall_time_s") for s in seeds] if trained else []
  return {
      "method": row.method, "label": LABELS[row.method], "budget": row.budget,
      "setting": "" if row.method == "dense" else row.setting_text, "family": row.family,
      "config": row.run_arg("<workroot>", 0) + ("" if trained else f", evaluated with {row.reduction}"),
      "seeds": seeds, "accuracy": statistics.mean(accs), "accuracies": accs,
      "accuracy std": statistics.stdev(accs) if len(accs) > 1 else None,
      "examples": evals[0]["examples"], "tokens": t["tokens"],
      "analytic GFLOPs/img": t["analytic GFLOPs/img"],
      "XLA GFLOPs/img": t["XLA GFLOPs/img (inference)"],
      "XLA train GFLOPs/img": t["XLA GFLOPs/img (train)"],
      "inference img/s": t["inference img/s"]["median"],
      "inference img/s min": t["inference img/s"]["min"],
      "inference img/s max": t["inference img/s"]["max"],
      "train img/s": t["train img/s"]["median"],
      "train img/s min": t["train img/s"]["min"], "train img/s max": t["train img/s"]["max"],
      "train wall s": statistics.mean(wall) if wall and None not in wall else (0.0 if not trained else None)}


COLUMNS = ["method", "setting", "seeds", "tokens", "XLA GFLOPs/img", "analytic GFLOPs/img",
           "x dense FLOPs", "inference img/s (min-max)", "x dense", "train img/s (min-max)",
           "accuracy (%)", "Δ acc (points)", "train wall s"]


def table(rows: List[Dict]) -> str:
  dense = rows[0]
  lines = []
  for r in rows:
    acc = f"{100 * r['accuracy']:.2f}"
    if r["accuracy std"] is not None:
      acc += f" ± {100 * r['accuracy std']:.2f}"
    lines.append({
        "method": r["label"], "setting": r["setting"] or "-", "seeds": str(len(r["seeds"])),
        "tokens": r["tokens"], "XLA GFLOPs/img": r["XLA GFLOPs/img"],
        "analytic GFLOPs/img": r["analytic GFLOPs/img"],
        "x dense FLOPs": r["XLA GFLOPs/img"] / dense["XLA GFLOPs/img"],
        "inference img/s (min-max)": _speed(r, "inference"),
        "x dense": r["inference img/s"] / dense["inference img/s"],
        "train img/s (min-max)": _speed(r, "train"), "accuracy (%)": acc,
        "Δ acc (points)": f"{100 * (r['accuracy'] - dense['accuracy']):+.2f}",
        "train wall s": "-" if r["train wall s"] is None else f"{r['train wall s']:.0f}"})
  return common.markdown_table(lines, COLUMNS)


def _speed(r, mode):
  return (f"{r[f'{mode} img/s']:,.0f} ({r[f'{mode} img/s min']:,.0f}-"
          f"{r[f'{mode} img/s max']:,.0f})")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workroot", default="/tmp/vitoken_sweep")
  p.add_argument("--methods", default=",".join(METHODS), help="subset of: " + ",".join(METHODS))
  p.add_argument("--budgets", default="", help="subset of budget names (0.7, 0.5, low); default all")
  p.add_argument("--seeds", type=int, default=3,
                 help="seeds of dense and of each family's most accurate row (others: one)")
  p.add_argument("--small", action="store_true", help="runlocal-sized runs (a smoke test)")
  p.add_argument("--batch", type=int, default=128, help="batch of the timed programs")
  p.add_argument("--windows", type=int, default=5)
  p.add_argument("--iters", type=int, default=2)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  p.add_argument("--name", default="sweep", help="output files' name in --out")
  args = p.parse_args(argv)
  methods = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise SystemExit(f"--methods: unknown {unknown}; known: {','.join(METHODS)}")
  budgets = [b for b in args.budgets.split(",") if b] or None
  if budgets and set(budgets) - {"0.7", "0.5", "low"}:
    raise SystemExit(f"--budgets must be among 0.7, 0.5, low; got {args.budgets}")
  if args.seeds < 1:
    raise SystemExit("--seeds must be at least 1")
  from vitoken.engine.metrics import quiet_libraries  # pylint: disable=import-outside-toplevel
  quiet_libraries(verbose=False)  # orbax's restore chatter, once per evaluated run
  start = time.time()
  rows = plan(methods, budgets)
  summaries: Dict[str, Dict] = {}
  cache = common.load_json(os.path.join(args.workroot, "evaluations.json"))
  for row in rows:
    _train(row, 0, args, summaries)
  first = {row: _evaluate(row, 0, args, cache)["accuracy"] for row in rows}
  many = [rows[0]] + _best_rows(rows, first)
  seeds = {row: list(range(args.seeds if row in many else 1)) for row in rows}
  for row in rows:
    for seed in seeds[row][1:]:
      _train(row, seed, args, summaries)
  timing = _timing(rows, args)
  results = [_row_fields(row, seeds[row], [_evaluate(row, s, args, cache) for s in seeds[row]],
                         timing, summaries, args) for row in rows]
  text = table(results)
  print(text)
  meta = {"command": "python experiments/token_reduction_sweep.py " + " ".join(argv or sys.argv[1:]),
          "device": common.device_name(), "date": time.strftime("%Y-%m-%d"),
          "jax": jax.__version__, "small": args.small, "backbone": configs.BACKBONE,
          "steps": {"dense from scratch": configs.BASE_STEPS, "fine-tune": configs.FINETUNE_STEPS,
                    "MAE pretraining": configs.BASE_STEPS, "MAE fine-tune": configs.MAE_FINETUNE_STEPS},
          "timed batch": args.batch, "windows": args.windows, "iters per window": args.iters,
          "flops": "XLA: cost analysis of the compiled inference (train: of the train step); "
                   "analytic: vitoken.bench.flops; both 2 per multiply-add",
          "seeds": f"{args.seeds} for dense and each family's most accurate row, 1 elsewhere; "
                   "a seed varies the fine-tune (data order, dropout, new modules) on one base",
          "train wall s": "of the row's own run (fine-tune), mean over seeds; the dense base "
                          "and MAE pretraining are shared: " + json.dumps(
                              {k: summaries.get(k, {}).get("wall_time_s")
                               for k in (DENSE_BASE, MAE_BASE)}),
          "sweep wall s": time.time() - start}
  common.write_results(args.out, args.name, results, text, meta)
  plot(results, os.path.join(args.out, f"{args.name}.png"), meta)
  return results, meta


def pareto_front(points: List[tuple]) -> List[tuple]:
  """The (speed, accuracy) points no other point beats in both, by increasing speed."""
  front = []
  for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
    if not front or y > front[-1][1]:
      front.append((x, y))
  return front[::-1]


def plot(rows: List[Dict], path: str, meta: Dict) -> None:
  """Accuracy against inference images/s: one line per method, dense marked, the frontier."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(9, 5.5))
  dense = rows[0]
  for method in dict.fromkeys(r["method"] for r in rows[1:]):
    mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["inference img/s"])
    ax.plot([r["inference img/s"] for r in mine], [100 * r["accuracy"] for r in mine], "o-",
            markersize=5, linewidth=1, label=LABELS[method])
    for r in mine:
      ax.annotate(r["setting"], (r["inference img/s"], 100 * r["accuracy"]), fontsize=6,
                  textcoords="offset points", xytext=(3, 3))
  ax.plot(dense["inference img/s"], 100 * dense["accuracy"], "k*", markersize=14, label="dense")
  front = pareto_front([(r["inference img/s"], 100 * r["accuracy"]) for r in rows])
  ax.plot(*zip(*front), "k--", linewidth=1, alpha=0.6, label="Pareto frontier")
  # Rows far below dense would flatten every other line: they are listed, not drawn to scale.
  floor = 100 * dense["accuracy"] - 6
  low = [r for r in rows if 100 * r["accuracy"] < floor]
  if low:
    ax.set_ylim(bottom=floor)
    ax.text(0.99, 0.02, "below the axis: " + "; ".join(
        f"{LABELS[r['method']]} {r['setting']} {100 * r['accuracy']:.1f}%" for r in low),
            transform=ax.transAxes, ha="right", va="bottom", fontsize=7)
  ax.set_xlabel(f"inference images / s (median; {meta['device']}, batch {meta['timed batch']})")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("Token methods on one ViT (6 blocks, 64+1 tokens), cluttered digits")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower left")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
