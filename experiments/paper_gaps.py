"""Where a digits result contradicts its paper, runs that find out why: TokenLearner with 16
tokens against 8, and DynamicViT's gap to dense. (SimMIM's: experiments/simmim_diagnosis.py.)

  python experiments/paper_gaps.py --sweep_workroot=/tmp/vitoken_sweep     # its runs: 6 x 1,500 + 2,000 steps
  python experiments/paper_gaps.py --small --sweep_workroot=/tmp/sweep_small

TokenLearner (configs/token_learners.py, trained from scratch as in docs/token_learners.md's
table, 1500 steps): S = 8 and S = 16 learned tokens before block 2, three seeds each, and for
every model the learned maps on test images: their mean entropy (nats; log 64 = 4.16 is a
uniform map) and the mean cosine similarity between two different tokens' maps (1: the tokens
pool the same patches).

DynamicViT (configs/token_reduction_sweep.py, fine-tuned 500 steps from the sweep's dense run,
ρ = 0.7): the reference multiplies the pretrained backbone's lr by 0.01 (its predictors train at
the full lr), which over the paper's 30 ImageNet epochs (50k steps) still moves the backbone;
over 500 steps it barely does. Runs at backbone lr multipliers 0.01 (the sweep's run), 0.1 and
1 (EViT's setting: EViT fine-tunes the whole network at the full lr), and at 0.01 for 2000
steps, tell whether the gap is the lr or the schedule; the 500-step model evaluated as it
trains (Gumbel keep decisions, masked attention, every token present) and at inference with
more tokens (ρ = 0.8) tells whether its predictor's top-k at inference is what loses.
Writes experiments/results/paper_gaps.{json,md}.
"""
import argparse
import os
import statistics
import sys
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import (
  token_learners as tl_configs,  # noqa: E402
  token_reduction_sweep as sweep_configs,  # noqa: E402
)
from experiments import common  # noqa: E402
from vitoken.data import pipeline  # noqa: E402

TL_TOKENS = (8, 16)
TL_STEPS = 1500
DYNAMICVIT_BACKBONE_LR = (0.01, 0.1, 1.0)
DYNAMICVIT_LONG = 2000  # steps of the longer fine-tune at the reference's lr


def _train(get_config, arg: str, workdir: str, small: bool, seed: int = 0, steps: int = 0):
  config = get_config(arg + (",runlocal" if small else ""))
  config.seed = seed
  if steps and not small:
    config.total_steps = config.eval_every_steps = config.checkpoint.every_steps = steps
  config.progress_bar = False
  print(f"== {workdir}: {arg} seed={seed}", flush=True)
  return common.train_or_reuse(config, workdir)


def _accuracy(workdir: str) -> float:
  model, params, config, _ = common.load_run(workdir)
  predict = jax.jit(lambda x: model.apply({"params": params}, x)[0])
  return common.accuracy(predict, config.data)[0]


def map_statistics(weights: np.ndarray) -> Dict[str, float]:
  """weights [B, S, N] (each row a softmax over N): mean entropy of a map, and the mean cosine
  similarity between the maps of two different learned tokens of one image."""
  w = np.asarray(weights, np.float64)
  entropy = -(w * np.log(np.maximum(w, 1e-30))).sum(-1).mean()
  unit = w / np.linalg.norm(w, axis=-1, keepdims=True)
  cos = np.einsum("bsn,btn->bst", unit, unit)
  s = w.shape[1]
  off = cos[:, ~np.eye(s, dtype=bool)]
  return {"map entropy (nats)": float(entropy), "map cosine (between tokens)": float(off.mean()),
          "token pairs with cosine > 0.9": float((off > 0.9).mean())}


def _learned_maps(workdir: str, images) -> np.ndarray:
  model, params, _, _ = common.load_run(workdir)
  _, aux = jax.jit(lambda x: model.apply({"params": params}, x))(images)
  (weights,) = [v["weights"] for k, v in _flatten_reducer_aux(aux) if "weights" in v]
  return np.asarray(weights)


def _flatten_reducer_aux(aux):
  """(name, dict) of every reducer output the ViT returns in its aux dict."""
  out = []
  def walk(prefix, node):
    if isinstance(node, dict):
      if "weights" in node:
        out.append((prefix, node))
      for k, v in node.items():
        walk(f"{prefix}/{k}", v)
  walk("", aux)
  return out


def token_learner_study(args) -> List[Dict]:
  rows = []
  images = None
  for tokens in TL_TOKENS:
    accs, stats = [], []
    for seed in range(args.seeds):
      workdir = os.path.join(args.workroot, f"tl{tokens}_loc2_s{seed}")
      summary = _train(tl_configs.get_config, f"method=learner,tokens={tokens},loc=2", workdir, args.small,
             seed, TL_STEPS)
      accs.append(_accuracy(workdir))
      if images is None:
        config = common.load_run(workdir)[2]
        images = jnp.asarray(next(iter(pipeline.eval_iterator(config.data,
                                                              global_batch_size=256)))["image"])
      stats.append(map_statistics(_learned_maps(workdir, images)))
    row = {"study": "token_learner", "setting": f"S={tokens} before block 2",
           "steps": summary.get("final_step"), "seeds": list(range(args.seeds)), "accuracies": accs,
           "accuracy": statistics.mean(accs),
           "accuracy std": statistics.stdev(accs) if len(accs) > 1 else None}
    for key in stats[0]:
      row[key] = statistics.mean(s[key] for s in stats)
    rows.append(row)
    print(row, flush=True)
  return rows


def dynamicvit_study(args) -> List[Dict]:
  base = os.path.join(args.sweep_workroot, "dense")
  if not os.path.isdir(base):
    raise SystemExit(f"no dense run in --sweep_workroot ({base}): run "
                     "experiments/token_reduction_sweep.py first, or pass its workroot")
  rows = []
  for name, arg in [("dense fine-tune", f"method=dense,init={base}"),
                    ("EViT ρ=0.7", f"method=evit,keep=0.7,init={base}"),
                    *((f"DynamicViT ρ=0.7, backbone lr x{m:g}",
                       f"method=dynamicvit,keep=0.7,init={base},backbone_lr={m}")
                      for m in DYNAMICVIT_BACKBONE_LR)]:
    # The sweep's own runs are reused where they exist (same config, seed 0).
    run = {"dense fine-tune": "dense_ft_s0", "EViT ρ=0.7": "evit_keep0.7_s0",
           "DynamicViT ρ=0.7, backbone lr x0.01": "dynamicvit_keep0.7_s0"}.get(name)
    workdir = os.path.join(args.sweep_workroot, run or f"dynamicvit_keep0.7_blr{arg.rsplit('=', 1)[1]}_s0")
    summary = _train(sweep_configs.get_config, arg, workdir, args.small)
    rows.append({"study": "dynamicvit", "setting": name, "steps": summary.get("final_step"),
                 "accuracy": _accuracy(workdir), "seeds": [0]})
    print(rows[-1], flush=True)
  steps = 12 if args.small else DYNAMICVIT_LONG
  workdir = os.path.join(args.sweep_workroot, f"dynamicvit_keep0.7_steps{steps}_s0")
  summary = _train(sweep_configs.get_config, f"method=dynamicvit,keep=0.7,init={base},steps={steps}",
                   workdir, args.small)
  rows.append({"study": "dynamicvit", "setting": f"DynamicViT ρ=0.7, backbone lr x0.01, {steps} steps",
               "steps": summary.get("final_step"), "accuracy": _accuracy(workdir), "seeds": [0]})
  print(rows[-1], flush=True)
  rows += _dynamicvit_modes(os.path.join(args.sweep_workroot, "dynamicvit_keep0.7_s0"))
  return rows


def _dynamicvit_modes(workdir: str) -> List[Dict]:
  """The trained model as it trains (Gumbel decisions on every token, seeded) and at inference
  with ρ = 0.8, and the kept fractions per stage in training mode against the targets."""
  model, params, config, _ = common.load_run(workdir)
  key = jax.random.key(0)
  as_trained = jax.jit(lambda x: model.apply({"params": params}, x, train=True,
                                             rngs={"reduction": key, "dropout": key})[0])
  rows = [{"study": "dynamicvit", "setting": "the x0.01 model evaluated as it trains (Gumbel "
           "keep decisions, masked attention)", "accuracy": common.accuracy(as_trained, config.data)[0],
           "seeds": [0]}]
  entry = dict(config.model.token_reduction.to_dict() if hasattr(config.model.token_reduction, "to_dict")
               else config.model.token_reduction)
  looser, loose_params, _, _ = common.load_run(workdir, dict(entry, keep_rate=0.8))
  predict = jax.jit(lambda x: looser.apply({"params": loose_params}, x)[0])
  rows.append({"study": "dynamicvit", "setting": "the x0.01 model at inference with ρ=0.8",
               "accuracy": common.accuracy(predict, config.data)[0], "seeds": [0]})
  images = next(iter(pipeline.eval_iterator(config.data, global_batch_size=500)))["image"]
  _, aux = model.apply({"params": params}, jnp.asarray(images), train=True,
                       rngs={"reduction": key, "dropout": key})
  kept = {k: float(np.mean(v["keep_fraction"])) for k, v in sorted(aux["reduction"].items())
          if "keep_fraction" in v}
  targets = [entry["keep_rate"] ** (i + 1) for i in range(len(kept))]
  rows[0]["kept fractions (training mode) / targets"] = ", ".join(
      f"{v:.3f}/{t:.3f}" for v, t in zip(kept.values(), targets))
  for r in rows:
    print(r, flush=True)
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workroot", default="/tmp/vitoken_paper_gaps")
  p.add_argument("--sweep_workroot", default="/tmp/vitoken_sweep",
                 help="experiments/token_reduction_sweep.py's workroot (its dense run)")
  p.add_argument("--studies", default="token_learner,dynamicvit")
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--small", action="store_true")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = p.parse_args(argv)
  from vitoken.engine.metrics import quiet_libraries  # pylint: disable=import-outside-toplevel
  quiet_libraries(verbose=False)
  studies = {"token_learner": token_learner_study, "dynamicvit": dynamicvit_study}
  rows = []
  for name in args.studies.split(","):
    rows += studies[name](args)
  columns = ["study", "setting", "steps", "seeds", "accuracy (%)", "map entropy (nats)",
             "map cosine (between tokens)", "token pairs with cosine > 0.9",
             "kept fractions (training mode) / targets"]
  lines = []
  for r in rows:
    acc = f"{100 * r['accuracy']:.2f}"
    if r.get("accuracy std") is not None:
      acc += f" ± {100 * r['accuracy std']:.2f}"
    lines.append({**{c: r.get(c, "-") for c in columns}, "seeds": str(len(r["seeds"])),
                  "accuracy (%)": acc})
  table = common.markdown_table(lines, columns)
  print(table)
  common.write_results(args.out, "paper_gaps", rows, table,
                       {"device": common.device_name(), "small": args.small,
                        "workroot": args.workroot, "sweep_workroot": args.sweep_workroot})
  return rows


if __name__ == "__main__":
  main()
