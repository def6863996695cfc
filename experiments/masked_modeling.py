"""Masked modeling on cluttered digits: scratch vs MAE, SimMIM and BEiT pretraining (BEiT with a
k-means and an FSQ visual tokenizer), fine-tuned and linearly probed with equal steps, and
MAE's pretraining speed against SimMIM's.

  python experiments/masked_modeling.py                  # every run, tens of minutes on 2 CPU cores
  python experiments/masked_modeling.py --small          # seconds-long smoke version
  python experiments/masked_modeling.py --speed-only --variant B/16 --image 224 --batch 256 --dtype bfloat16

Fits the two tokenizers of `configs/visual_tokenizer.py`, then trains `configs/masked_modeling.py`
stages in `--workroot/<run>` (finished runs are reused): MAE, SimMIM and the two BEiT
pretrainings, then for each a fine-tune and a linear probe from its workdir, and a
from-scratch fine-tune with the same steps. Then times one pretraining train step (forward,
backward, AdamW update) of MAE and of SimMIM on the same batch, interleaved in one process
(median of several windows, min-max spread), with XLA's FLOPs (2 per multiply-add).
Writes experiments/results/masked_modeling.{json,md,png} and the MAE reconstruction grid.
"""
import argparse
import os
import shutil
import sys
from typing import Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import common  # noqa: E402
from vitoken import tasks  # noqa: E402

# The training runs need the configs and the data pipeline (ml_collections, grain, tfds); the
# timing alone (`--speed-only --variant ...`) needs only jax, flax and optax, so it also runs
# on a machine without them. Hence the imports inside the functions below.

# tokenizer run -> configs/visual_tokenizer.py argument (BEiT's targets)
TOKENIZERS = {"tok_kmeans": "kind=kmeans", "tok_fsq": "kind=fsq"}
# pretraining run -> (configs/masked_modeling.py argument, the tokenizer run it predicts)
PRETRAIN = {"mae": ("stage=pretrain,method=mae", None),
            "simmim": ("stage=pretrain,method=simmim", None),
            "beit_kmeans": ("stage=pretrain,method=beit", "tok_kmeans"),
            "beit_fsq": ("stage=pretrain,method=beit", "tok_fsq")}
# run name -> (configs/masked_modeling.py argument, the pretraining run it starts from)
DOWNSTREAM = {
    "scratch": ("stage=scratch", None),
    "mae_finetune": ("stage=finetune", "mae"),
    "simmim_finetune": ("stage=finetune", "simmim"),
    "beit_kmeans_finetune": ("stage=finetune", "beit_kmeans"),
    "beit_fsq_finetune": ("stage=finetune", "beit_fsq"),
    "mae_probe": ("stage=probe", "mae"),
    "simmim_probe": ("stage=probe", "simmim"),
    "beit_kmeans_probe": ("stage=probe", "beit_kmeans"),
    "beit_fsq_probe": ("stage=probe", "beit_fsq"),
}
METHOD_LABELS = {"mae": "MAE", "simmim": "SimMIM", "beit_kmeans": "BEiT (k-means codes)",
                 "beit_fsq": "BEiT (FSQ codes)"}
LABELS = {"scratch": "scratch (no pretraining)",
          **{f"{m}_finetune": f"{label} → fine-tune" for m, label in METHOD_LABELS.items()},
          **{f"{m}_probe": f"{label} → linear probe" for m, label in METHOD_LABELS.items()}}


def _tokenizer_config(arg: str, small: bool):
  from configs import visual_tokenizer  # pylint: disable=import-outside-toplevel
  return common.run_config(visual_tokenizer.get_config, arg, small)


def _config(arg: str, small: bool, steps: Optional[int]):
  from configs import masked_modeling as configs  # pylint: disable=import-outside-toplevel
  return common.run_config(configs.get_config, arg, small, steps)


class _Config(dict):
  """A plain config (attribute access), so timing needs no ml_collections."""
  __getattr__ = dict.__getitem__


class _Info:
  """The dataset facts a task needs, for timing without a dataset."""

  def __init__(self, image_shape, num_classes=10):
    self.image_shape, self.num_classes = tuple(image_shape), num_classes
    self.train_examples = self.eval_examples = 0


def pretraining_speed(model: Dict, task_settings: Dict[str, Dict], image_shape, *, batch: int,
                      windows: int, iters: int, dtype: Optional[str] = None,
                      count_flops: bool = True) -> Dict[str, Dict]:
  """Images/s and FLOPs of one pretraining train step per task, timed interleaved."""
  steps, args, out = {}, {}, {}
  images = jax.random.normal(jax.random.key(0), (batch, *image_shape), jnp.float32)
  for name, settings in task_settings.items():
    c = _Config(model=dict(model, **({"dtype": dtype} if dtype else {})), task=dict(settings))
    task = tasks.build(c, _Info(image_shape))
    example = task.batch_fields()({"image": np.zeros((batch, *image_shape), np.float32)},
                                  np.random.default_rng(0))
    example["image"] = images
    params = jax.jit(task.init_params)(jax.random.key(1), example)
    tx = optax.adamw(1e-4, b2=0.95, weight_decay=0.05)
    state = (params, tx.init(params))

    def step(state, batch, task=task, tx=tx):
      params, opt_state = state
      (loss, _), grads = jax.value_and_grad(
          lambda p: task.loss(p, {}, batch, jax.random.key(2), 0, 0.0), has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    steps[name] = jax.jit(step)
    args[name] = (state, example)
    out[name] = {"train GFLOPs/img": (common.flops(steps[name], state, example) / batch / 1e9
                                      if count_flops else float("nan"))}
  speed = common.interleaved_throughput(
      {n: (lambda n=n: steps[n](*args[n])[1]) for n in steps}, batch=batch, windows=windows,
      iters=iters)
  for name, s in speed.items():
    out[name].update({"img/s": s["median"], "img/s min": s["min"], "img/s max": s["max"]})
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workroot", default="/tmp/vitoken_masked_modeling")
  p.add_argument("--pretrain-steps", type=int, default=None, help="default: the config's")
  p.add_argument("--steps", type=int, default=None, help="fine-tune/probe steps (default: the config's)")
  p.add_argument("--small", action="store_true", help="runlocal-sized runs (a smoke test)")
  p.add_argument("--speed-only", action="store_true", help="only time MAE vs SimMIM pretraining")
  p.add_argument("--variant", default=None, help="encoder variant for --speed-only, e.g. B/16")
  p.add_argument("--image", type=int, default=None, help="image side for --speed-only")
  p.add_argument("--dtype", default=None, help="compute dtype for the timing, e.g. bfloat16")
  p.add_argument("--batch", type=int, default=128, help="batch of the timed train steps")
  p.add_argument("--no-flops", action="store_true",
                 help="skip XLA's FLOP count (a second compile; on GPU it misses cuBLAS calls)")
  p.add_argument("--windows", type=int, default=5)
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = p.parse_args(argv)

  if args.speed_only:
    return _speed_only(args)
  from configs import masked_modeling as configs  # pylint: disable=import-outside-toplevel
  from vitoken import tokenizers  # pylint: disable=import-outside-toplevel
  from vitoken.data import pipeline  # pylint: disable=import-outside-toplevel
  summaries = {}
  for name, arg in TOKENIZERS.items():
    print(f"== tokenizer {name}: {arg}", flush=True)
    summaries[name] = tokenizers.fit(_tokenizer_config(arg, args.small),
                                     os.path.join(args.workroot, name))
  for name, (arg, tokenizer) in PRETRAIN.items():
    if tokenizer:
      arg += f",tokenizer={os.path.join(args.workroot, tokenizer)}"
    print(f"== pretraining {name}: {arg}", flush=True)
    summaries[name] = common.train_or_reuse(_config(arg, args.small, args.pretrain_steps),
                                            os.path.join(args.workroot, name))
  for name, (arg, init) in DOWNSTREAM.items():
    if init:
      arg += f",init={os.path.join(args.workroot, init)}"
    print(f"== {name}: {arg}", flush=True)
    summaries[name] = common.train_or_reuse(_config(arg, args.small, args.steps), os.path.join(args.workroot, name))

  rows: List[Dict] = []
  for name, (arg, init) in DOWNSTREAM.items():
    s = summaries[name]
    pre = summaries.get(init, {})
    tok = summaries.get(PRETRAIN.get(init, (None, None))[1], {})
    rows.append({
        "run": name, "variant": LABELS[name], "config": arg,
        "pretraining": init or "-", "pretrain steps": pre.get("final_step", 0),
        "pretrain eval loss": pre.get("eval", {}).get("loss", float("nan")),
        "pretrain s": pre.get("wall_time_s", 0.0), "steps": s["final_step"],
        "accuracy": s["eval"]["accuracy"], "examples": s["eval"]["examples"],
        "train s": s["wall_time_s"], **_tokenizer_fields(tok)})
    print(rows[-1], flush=True)
  scratch = rows[0]["accuracy"]
  for row in rows:
    row["Δ vs scratch (points)"] = 100 * (row["accuracy"] - scratch)

  config = _config(PRETRAIN["mae"][0], args.small, args.pretrain_steps)
  info = pipeline.dataset_info(config.data)
  speed = pretraining_speed(config.model.to_dict(), {n: configs.TASKS[n] for n in ("mae", "simmim")},
                            info.image_shape, batch=args.batch, windows=args.windows,
                            iters=args.iters)
  speed_rows = _speed_rows(speed)
  table = (common.markdown_table(rows, ["variant", "pretrain steps", "pretrain eval loss", "steps",
                                        "accuracy", "Δ vs scratch (points)", "codebook usage",
                                        "code perplexity"])
           + "\n\nVisual tokenizers (BEiT's targets), on the test split:\n\n"
           + common.markdown_table(_tokenizer_rows(summaries), TOKENIZER_COLUMNS)
           + "\n\nPretraining train step (forward, backward, AdamW), same batch, interleaved:\n\n"
           + common.markdown_table(speed_rows, ["method", "train GFLOPs/img", "img/s (min-max)",
                                                "x SimMIM img/s"]))
  print(table)
  meta = {"device": common.device_name(), "workroot": os.path.abspath(args.workroot),
          "small": args.small, "timed_batch": args.batch, "windows": args.windows,
          "iters_per_window": args.iters, "jax": jax.__version__,
          "flops": "XLA cost analysis of the jitted train step, 2 per multiply-add",
          "encoder": config.model.to_dict(), "tasks": configs.TASKS,
          "tokenizers": _tokenizer_rows(summaries), "pretraining_speed": speed_rows}
  common.write_results(args.out, "masked_modeling", rows, table, meta)
  _plot(rows, speed_rows, os.path.join(args.out, "masked_modeling.png"))
  for run, name in (("mae", "masked_modeling_reconstructions.png"),
                    ("beit_fsq", "masked_modeling_beit_fsq_predictions.png")):
    preview = os.path.join(args.workroot, run, "previews", "reconstructions.png")
    if os.path.exists(preview):
      shutil.copy(preview, os.path.join(args.out, name))


TOKENIZER_COLUMNS = ["tokenizer", "codes", "codebook usage", "code perplexity", "eval error",
                     "steps", "fit s"]


def _tokenizer_fields(summary) -> Dict:
  e = summary.get("eval", {})
  return {"codebook usage": e.get("codebook_usage", float("nan")),
          "code perplexity": e.get("perplexity", float("nan"))}


def _tokenizer_rows(summaries) -> List[Dict]:
  """One row per tokenizer: codebook usage and perplexity on the test split, fit time."""
  rows = []
  for name, arg in TOKENIZERS.items():
    s = summaries[name]
    config = _tokenizer_config(arg, small=False)
    codes = (config.task["codebook_size"] if "codebook_size" in config.task
             else int(np.prod(config.task["levels"])))
    rows.append({"tokenizer": name, "config": arg, "codes": codes, **_tokenizer_fields(s),
                 "eval error": s["eval"]["loss"], "steps": s["final_step"],
                 "fit s": s["wall_time_s"]})
  return rows


def _speed_rows(speed):
  base = speed["simmim"]["img/s"]
  return [{"method": name, "train GFLOPs/img": s["train GFLOPs/img"], "img/s": s["img/s"],
           "img/s (min-max)": f"{s['img/s']:,.0f} ({s['img/s min']:,.0f}-{s['img/s max']:,.0f})",
           "x SimMIM img/s": s["img/s"] / base} for name, s in speed.items()]


def _speed_only(args):
  image = args.image or 64
  if args.variant:
    # The papers' settings: MAE's 8x512 decoder, SimMIM's 32 px mask cells.
    model = {"variant": args.variant, "class_token": True, "posemb": "sincos2d_mae"}
    settings = {"mae": dict(name="mae", mask_ratio=0.75, norm_pix_loss=True),
                "simmim": dict(name="simmim", mask_patch_size=32, mask_ratio=0.6)}
  else:
    from configs import masked_modeling as configs  # pylint: disable=import-outside-toplevel
    model = dict(configs.ENCODER)
    settings = {n: configs.TASKS[n] for n in ("mae", "simmim")}  # BEiT needs a fitted tokenizer
  speed = pretraining_speed(model, settings, (image, image, 3), batch=args.batch,
                            windows=args.windows, iters=args.iters, dtype=args.dtype,
                            count_flops=not args.no_flops)
  rows = _speed_rows(speed)
  table = common.markdown_table(rows, ["method", "train GFLOPs/img", "img/s (min-max)", "x SimMIM img/s"])
  print(table)
  meta = {"device": common.device_name(), "model": model, "tasks": settings, "image": image,
          "batch": args.batch, "dtype": args.dtype, "jax": jax.__version__}
  common.write_results(args.out, f"masked_modeling_speed_{jax.devices()[0].platform}", rows,
                       table, meta)
  return rows


def _plot(rows, speed_rows, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(10, 5.2), gridspec_kw={"width_ratios": [2, 1]})
  labels = [r["variant"] for r in rows]
  axes[0].barh(labels, [100 * r["accuracy"] for r in rows], color="tab:blue")
  for i, r in enumerate(rows):
    axes[0].annotate(f"{100 * r['accuracy']:.1f}", (100 * r["accuracy"], i), fontsize=8,
                     xytext=(3, -3), textcoords="offset points")
  axes[0].set_xlabel(f"test accuracy (%) after {rows[0]['steps']} steps")
  axes[0].invert_yaxis()
  axes[1].bar([r["method"] for r in speed_rows], [r["img/s"] for r in speed_rows], color="tab:orange")
  axes[1].set_ylabel("pretraining images / s")
  fig.suptitle("Masked modeling on cluttered digits")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
