"""What the experiment scripts share: timing a jitted function, FLOPs from XLA, tables."""
import json
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import jax


def flops(jitted: Callable, *args) -> float:
  """FLOPs of one call, from XLA's cost analysis of the compiled program."""
  cost = jitted.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def throughput(fn: Callable, *args, batch: int, warmup: int = 2, iters: int = 10) -> float:
  """Items per second of `fn(*args)` after warm-up (one timed window; waits for the device)."""
  return interleaved_throughput({"fn": fn}, *args, batch=batch, windows=1, iters=iters,
                                warmup=warmup)["fn"]["median"]


def interleaved_throughput(fns: Dict[str, Callable], *args, batch: int, windows: int = 5,
                           iters: int = 5, warmup: int = 2) -> Dict[str, Dict[str, float]]:
  """Items/s of each `fns[name](*args)`, timed in interleaved windows (each window runs every
  variant once, so drifts of a shared, noisy machine hit all alike): median and spread."""
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn(*args))
  samples: Dict[str, List[float]] = {name: [] for name in fns}
  for _ in range(windows):
    for name, fn in fns.items():
      start = time.perf_counter()
      for _ in range(iters):
        out = fn(*args)
      jax.block_until_ready(out)
      samples[name].append(batch * iters / (time.perf_counter() - start))
  return {name: {"median": statistics.median(v), "min": min(v), "max": max(v)}
          for name, v in samples.items()}


def run_config(get_config, arg: str, small: bool, steps: Optional[int] = None):
  """A config file's `get_config(arg)` as an experiment runs it: runlocal-sized when `small`,
  `steps` (if given) with one eval and checkpoint at the end, no progress bar."""
  c = get_config(arg + (",runlocal" if small else ""))
  if steps:
    c.total_steps = steps
    c.eval_every_steps = c.checkpoint.every_steps = steps
    c.schedule.warmup_steps = min(c.schedule.warmup_steps, steps // 10)
  c.progress_bar = False
  return c


def train_or_reuse(config, workdir: str) -> Dict:
  """Trains (or resumes) one run; its saved summary when it had already finished."""
  from vitoken.train import trainer  # pylint: disable=import-outside-toplevel
  summary = trainer.run(config, workdir)
  path = os.path.join(workdir, "summary.json")
  if summary.get("steps_run", 0) == 0 and os.path.exists(path):
    with open(path) as f:
      summary = json.load(f)
  return summary


def markdown_table(rows: List[Dict], columns: Sequence[str]) -> str:
  def fmt(v):
    return f"{v:,.3g}" if isinstance(v, float) and abs(v) < 10 else (f"{v:,.0f}" if isinstance(v, float) else str(v))
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def write_results(out_dir: str, name: str, rows: List[Dict], table: str, meta: Dict) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
    f.write(f"<!-- {json.dumps(meta)} -->\n{table}\n")


def device_name() -> str:
  d = jax.devices()[0]
  return f"{d.platform}:{getattr(d, 'device_kind', '')} x{jax.device_count()}"
