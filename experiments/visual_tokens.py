"""Compact visual tokens for a language model on digit scenes QA: accuracy per question type
against K (the visual tokens the LM reads) and inference FLOPs, for every compressor.

  python experiments/visual_tokens.py            # every row (CPU, see the README for the time)
  python experiments/visual_tokens.py --small    # a minutes-long smoke version (digit_scenes/tiny)

The runs are configs/visual_qa.py's: a patch-8 ViT pretrained on which digits a scene holds
(`stage=encoder`), frozen; its features at block -2 (144 patches and a class token); a
compressor to K; LLaVA-1.5's projector; a tiny causal LM (`small` or `big`) over [K tokens,
question], trained on the answer word.

- **training-free**: the LM trained at full K (all 144 patches), then read through each
  training-free compressor (FasterVLM's class-attention top-K, VisionZip, PruMerge fixed-K,
  AIM's ToMe to K, M3's pooling) at K in KS;
- **trained**: the projector and LM (and a learned compressor's params) trained at the row's K:
  class-attention top-K and the learned compressors (TokenLearner, QueCC) at each of
  TRAINED_KS; M3 (pooling trained at all of SCALES at once) and MQT-LLaVA (a resampler of 144
  queries trained with the first m, m drawn per step) as one run each, read at every K.

Accuracy is on the whole test split (5,000 scenes of glyphs no training scene shows), overall
and per question type. GFLOPs per example (encoder to the feature block, compressor, projector
and LM; XLA's count, 2 per multiply-add) and examples/s (inference, one interleaved timing of
every row: median of `--windows` windows and the min-max spread). Finished runs are reused
(`--workroot`). Writes experiments/results/visual_tokens.{json,md,png}.
"""
import argparse
import os
import sys
from typing import Dict, List

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import visual_qa as configs  # noqa: E402
from experiments import common  # noqa: E402

KS = (144, 36, 16, 9, 4, 1)
TRAINED_KS = (16, 4, 1)
TRAINING_FREE = ("cls_topk", "visionzip", "prumerge", "tome_to_k", "pool")
TRAINED_PER_K = ("cls_topk", "token_learner", "quecc")
SMALL_KS = (36, 9)  # the smoke version's 6 x 6 grid
QTYPES = ("presence", "count", "largest", "cell")
COLUMNS = ["row", "lm", "K", "GFLOPs/ex", "ex/s (min-max)", "accuracy", *QTYPES]


def _arg(compressor: str = "none", k: int = 144, lm: str = "small", extra: str = "") -> str:
  return ",".join(filter(None, [f"compressor={compressor}", f"k={k}", f"lm={lm}", extra]))


class Runs:
  """Trains (or reuses) the runs and evaluates params under any compressor."""

  def __init__(self, args):
    self.args, self.root = args, args.workroot
    self.encoder = os.path.join(self.root, "encoder")

  def config(self, arg: str, steps: int):
    c = common.run_config(configs.get_config, arg, self.args.small, steps)
    if not self.args.small:
      c.data.eval_examples = self.args.eval_examples
    return c

  def train(self, name: str, arg: str) -> str:
    workdir = os.path.join(self.root, name)
    common.train_or_reuse(self.config(f"encoder={self.encoder},{arg}", self.args.steps), workdir)
    return workdir

  def pretrain_encoder(self):
    common.train_or_reuse(self.config("stage=encoder", self.args.encoder_steps), self.encoder)

  def row(self, name: str, workdir: str, arg: str, lm: str, k: int) -> Dict:
    """Accuracy (per type), FLOPs and the jitted predict of `workdir`'s params read through
    the compressor of `arg`."""
    from vitoken.engine import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
    from vitoken.train import trainer  # pylint: disable=import-outside-toplevel
    cache = os.path.join(self.root, "evals.json")
    evals = common.load_json(cache)
    key = f"{name}|{arg}"
    config = self.config(f"encoder={self.encoder},{arg}", self.args.steps)
    t = trainer.Trainer(config, os.path.join(self.root, "scratch"))
    params = jax.tree.map(jnp.asarray, ckpt_lib.load_params(workdir))
    if key not in evals:
      evals[key] = t.evaluate(params)
      common.save_json(cache, evals)
    metrics = evals[key]
    batch = t.task.example_batch(self.args.batch)
    batch["image"] = jnp.zeros_like(batch["image"])
    frozen = t.frozen

    def predict(images, question):
      b = dict(batch, image=images, question=question)
      return t.task.logits(params, frozen, b, train=False)[0]

    jitted = jax.jit(predict)
    flops = common.flops(jitted, batch["image"], batch["question"]) / self.args.batch
    row = {"row": name, "lm": lm, "K": k, "GFLOPs/ex": flops / 1e9,
           "accuracy": metrics["accuracy"], "examples": metrics["examples"]}
    row.update({q: metrics.get(f"accuracy/{q}", float("nan")) for q in QTYPES})
    return row, (jitted, batch["image"], batch["question"])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true")
  parser.add_argument("--workroot", default="/tmp/vitoken_visual_tokens")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  parser.add_argument("--encoder_steps", type=int, default=0)
  parser.add_argument("--steps", type=int, default=0)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--eval_examples", type=int, default=2000)
  parser.add_argument("--windows", type=int, default=3)
  parser.add_argument("--iters", type=int, default=3)
  args = parser.parse_args(argv)
  if args.small:
    args.workroot += "_small"
    args.encoder_steps, args.steps = args.encoder_steps or 20, args.steps or 10
    args.batch, args.windows, args.iters = 8, 1, 1
  args.encoder_steps, args.steps = args.encoder_steps or 1500, args.steps or 1500
  ks = SMALL_KS if args.small else KS
  trained_ks = (9,) if args.small else TRAINED_KS
  runs = Runs(args)
  runs.pretrain_encoder()
  rows: List[Dict] = []
  timed = {}

  def add(name, workdir, arg, lm, k):
    row, fn = runs.row(name, workdir, arg, lm, k)
    row["variant"] = f"{name} {lm} K={k}"
    rows.append(row)
    timed[row["variant"]] = fn

  full = ks[0]  # every patch: 144 (36 in the smoke version)
  lms = ("small",) if args.small else ("small", "big")
  for lm in lms:
    dense = runs.train(f"full_{lm}", _arg(lm=lm))
    add("full K", dense, _arg(lm=lm), lm, full)
    for method in TRAINING_FREE:
      for k in ks[1:]:
        add(f"{method} (training-free)", dense, _arg(method, k, lm), lm, k)
  for method in TRAINED_PER_K:
    for k in trained_ks:
      workdir = runs.train(f"{method}_{k}", _arg(method, k))
      add(f"{method} (trained)", workdir, _arg(method, k), "small", k)
  for lm in lms:
    m3 = runs.train(f"m3_{lm}", _arg("pool", 4, lm, "scales"))
    for k in trained_ks:
      add("M3 pool (trained, all scales)", m3, _arg("pool", k, lm), lm, k)
  mqt = runs.train("mqt", _arg("resampler", full, "small", "matryoshka"))
  for k in trained_ks:
    add("MQT resampler (trained, Matryoshka)", mqt,
        _arg("resampler", k, "small", f"queries={full}"), "small", k)

  speed = common.interleaved_throughput(
      {v: (lambda fn=fn: fn[0](fn[1], fn[2])) for v, fn in timed.items()},
      batch=args.batch, windows=args.windows, iters=args.iters, warmup=1)
  for row in rows:
    s = speed[row["variant"]]
    row.update({"ex/s": s["median"], "ex/s min": s["min"], "ex/s max": s["max"],
                "ex/s (min-max)": f"{s['median']:,.0f} ({s['min']:,.0f}-{s['max']:,.0f})"})
  table = common.markdown_table(rows, COLUMNS)
  meta = {"device": common.device_name(), "workroot": os.path.abspath(args.workroot),
          "small": args.small, "encoder_steps": args.encoder_steps, "steps": args.steps,
          "timed_batch": args.batch, "windows": args.windows, "iters_per_window": args.iters,
          "flops": "XLA cost analysis of the jitted inference (encoder to the feature block, "
                   "compressor, projector, LM), 2 per multiply-add", "jax": jax.__version__}
  name = "visual_tokens_small" if args.small else "visual_tokens"
  common.write_results(args.out, name, rows, table, meta)
  plot(rows, os.path.join(args.out, f"{name}.png"))
  print(table)
  return rows


def plot(rows: List[Dict], path: str) -> None:
  """Accuracy against inference GFLOPs: one line per compressor and LM, overall and on
  digit-at-cell (the localised, OCR-like question)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  series: Dict[str, List[Dict]] = {}
  for row in rows:
    series.setdefault(f"{row['row']} [{row['lm']}]", []).append(row)
  for ax, key, title in ((axes[0], "accuracy", "all questions"), (axes[1], "cell",
                                                                   "digit at a cell")):
    for label, points in sorted(series.items()):
      points = sorted(points, key=lambda r: r["GFLOPs/ex"])
      style = "-o" if "[small]" in label else "--s"
      ax.plot([p["GFLOPs/ex"] for p in points], [100 * p[key] for p in points], style,
              markersize=4, label=label)
      for p in points:
        ax.annotate(str(p["K"]), (p["GFLOPs/ex"], 100 * p[key]), fontsize=5,
                    textcoords="offset points", xytext=(2, 2))
    ax.set_xscale("log")
    ax.set_xlabel("inference GFLOPs / example (XLA, 2 per MAC)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=5, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=130)


if __name__ == "__main__":
  main()
