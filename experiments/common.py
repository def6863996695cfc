"""What the experiment scripts share: timing a jitted function, FLOPs from XLA, tables."""
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax

from vitoken.bench import flops as flops_lib
from vitoken.bench.core import interleaved_throughput  # noqa: F401  (the experiments' timer)


def flops(jitted: Callable, *args) -> float:
  """FLOPs of one call, from XLA's cost analysis of the compiled program."""
  return flops_lib.compiled_flops(jitted.lower(*args).compile())


def throughput(fn: Callable, *args, batch: int, warmup: int = 2, iters: int = 10) -> float:
  """Items per second of `fn(*args)` after warm-up (one timed window; waits for the device)."""
  return interleaved_throughput({"fn": fn}, *args, batch=batch, windows=1, iters=iters,
                                warmup=warmup)["fn"]["median"]


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
  return trainer.run(config, workdir)


def load_run(workdir: str, token_reduction: Any = "config"):
  """(model, params, config, info) of a finished run; `token_reduction` replaces the run's own
  (None: dense), e.g. a training-free method applied to a dense model's params."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from vitoken import tasks  # pylint: disable=import-outside-toplevel
  from vitoken.data import pipeline  # pylint: disable=import-outside-toplevel
  from vitoken.engine import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  config = ckpt_lib.load_run_config(workdir)
  info = pipeline.dataset_info(config.data)
  overrides = {} if token_reduction == "config" else {"token_reduction": token_reduction}
  model = tasks.vit_from_config(config.model, info, overrides=overrides)
  params = jax.tree.map(jnp.asarray, ckpt_lib.load_params(workdir))
  return model, params, config, info


def accuracy(predict: Callable, data_config, batch: int = 250) -> Tuple[float, int]:
  """(top-1 accuracy, examples) of `predict(images) -> logits` over a whole eval split."""
  from vitoken.bench import budget  # pylint: disable=import-outside-toplevel
  return budget.predict_accuracy(predict, data_config, batch_size=batch)


def evaluate_run(model, params, config, info, batch: int, summary: Dict):
  """The cost-table fields of one model (tokens per block, GFLOPs/img, test accuracy, its
  training time) with its jitted `predict` and the timing `probe` batch."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  predict = jax.jit(lambda x: model.apply({"params": params}, x)[0])
  acc, total = accuracy(predict, config.data)
  probe = jnp.zeros((batch, *info.image_shape), jnp.float32)
  fields = {"tokens": tokens_per_block(model, params, probe),
            "GFLOPs/img": flops(predict, probe) / batch / 1e9, "accuracy": acc, "examples": total,
            "train_s": summary.get("wall_time_s"), "train_steps": summary.get("final_step")}
  return fields, predict, probe


def tokens_per_block(model, params, probe) -> str:
  """Token counts entering each block and after the last ("65>65>9>9>9>9>9" style)."""
  return flops_lib.tokens_string(flops_lib.token_counts(model, params, probe)[0])


COST_COLUMNS = ["variant", "tokens", "GFLOPs/img", "FLOPs vs dense", "img/s (min-max)",
                "x dense img/s", "accuracy", "Δ acc (points)"]


def compare_to_dense(rows: List[Dict], speed: Dict[str, Dict[str, float]], dense: Dict) -> str:
  """Adds images/s (from `interleaved_throughput`, keyed by each row's "variant") and the
  ratios to the `dense` row to every row; returns the markdown table of COST_COLUMNS."""
  dense_speed = speed[dense["variant"]]["median"]
  for row in rows:
    s = speed[row["variant"]]
    row.update({"img/s": s["median"], "img/s min": s["min"], "img/s max": s["max"],
                "x dense img/s": s["median"] / dense_speed,
                "FLOPs vs dense": row["GFLOPs/img"] / dense["GFLOPs/img"],
                "Δ acc (points)": 100 * (row["accuracy"] - dense["accuracy"])})
    row["img/s (min-max)"] = f"{s['median']:,.0f} ({s['min']:,.0f}-{s['max']:,.0f})"
  return markdown_table(rows, COST_COLUMNS)


def cost_meta(args, model_config) -> Dict[str, Any]:
  """What a cost table's numbers depend on: device, workroot, steps, timing and FLOPs method."""
  return {"device": device_name(), "workroot": os.path.abspath(args.workroot),
          "small": args.small, "steps": args.steps, "timed_batch": args.batch,
          "windows": args.windows, "iters_per_window": args.iters,
          "flops": "XLA cost analysis of the jitted inference, 2 per multiply-add",
          "model": model_config.to_dict(), "jax": jax.__version__}


def plot_accuracy_vs_cost(rows: List[Dict], path: str, title: str,
                          marker: Callable[[Dict], str], label: Callable[[Dict], str]) -> None:
  """Test accuracy against GFLOPs and against images/s, one point per row."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, key, xlabel in ((axes[0], "GFLOPs/img", "GFLOPs / image (XLA, 2 per MAC)"),
                          (axes[1], "img/s", "images / s (inference, median)")):
    for row in rows:
      ax.plot(row[key], 100 * row["accuracy"], marker(row), markersize=6)
      ax.annotate(label(row), (row[key], 100 * row["accuracy"]), fontsize=6,
                  textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def markdown_table(rows: List[Dict], columns: Sequence[str]) -> str:
  def fmt(v):
    return f"{v:,.3g}" if isinstance(v, float) and abs(v) < 10 else (f"{v:,.0f}" if isinstance(v, float) else str(v))
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def write_results(out_dir: str, name: str, rows: List[Dict], table: str, meta: Dict) -> None:
  """<out_dir>/<name>.json (meta and rows) and <name>.md (the table, meta in a comment)."""
  os.makedirs(out_dir, exist_ok=True)
  save_json(os.path.join(out_dir, f"{name}.json"), {"meta": meta, "rows": rows})
  with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
    f.write(f"<!-- {json.dumps(meta, default=_plain)} -->\n{table}\n")


def load_json(path: str) -> Dict:
  """The JSON at `path`, {} when there is none (a cache not written yet)."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def save_json(path: str, value) -> None:
  """Writes `value` to `path` atomically (a killed run leaves the old file whole)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=1, default=_plain)
  os.replace(path + ".tmp", path)


def _plain(value):
  return value.item() if hasattr(value, "item") else str(value)


def device_name() -> str:
  d = jax.devices()[0]
  return f"{d.platform}:{getattr(d, 'device_kind', '')} x{jax.device_count()}"
