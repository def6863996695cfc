"""Video on moving cluttered digits: what reads time, what inflation and VideoMAE give, and what
token reduction over space-time costs in accuracy.

  python experiments/video.py                 # every row, ~3 hours on 2 CPU cores
  python experiments/video.py --small         # a minutes-long smoke version (moving_digits/tiny)

The runs are those of configs/video.py (one video ViT: depth 4, width 64, tubelets of
4 frames x 8 x 8 px, 2 x 8 x 8 = 128 tokens; both labels, digit and direction):

- `frame`: the same model on the middle frame only; it can read the digit but not the motion;
- `scratch`: the dense video ViT from scratch, the baseline of every Δ;
- `inflated`: the same, initialised from an image model trained on cluttered digits
  (`stage=image`: configs/quickstart.py's model and recipe, the same blocks on single 64 px
  images) by ViViT's central-frame inflation;
- `tl8`: TokenLearner, S = 8 tokens per time slice after block `loc` = 1, trained from scratch;
- ToMe over all space-time tokens and per time slice, off the shelf (proportional attention
  on) on the scratch model's and the inflated model's params, at two merge rates each with
  the same token schedule for both modes;
- `videomae`: VideoMAE pretraining (90% tubes), then fine-tuning; `framemae`: the same with 90%
  of each time slice masked independently (the paper's frame masking baseline).
- merging across time (configs/video.py's `temporal` presets): TESTA (the two slices merged in
  block 0, then 0 or 12 patches per slice per block) and TempMe (the slices run as frames, ToMe
  per frame in block 0, joined in block 1), about 50% and 25% of the dense tokens leaving a
  block, off the shelf on the inflated params and trained from the inflated init, against ToMe
  over space-time at the same FLOPs (r = 32 and r = 60), off the shelf and trained alike;
- `violet`: VIOLET-style masked visual-token modeling (the codes of a k-means tokenizer of
  single digits' patches, `stage=tokenizer`; space-time block masks), then fine-tuning.

Every classifier trains `--steps` steps (pretraining `--pretrain_steps`); accuracies are on the
whole test split (4,000 clips of glyphs no training clip shows); Δ is against the dense run a
row starts from or runs on (column "vs"). GFLOPs per clip come from XLA's
cost analysis of the compiled inference (2 per multiply-add); inference clips/s of all rows are
timed in one interleaved run (median of `--windows` windows, min-max spread). Finished runs and
evaluations are reused (`--workroot`). Writes experiments/results/video.{json,md,png},
video_reconstructions.png (VideoMAE's reconstructions of test clips) and video_testa.png
(which frames and patches TESTA merged).
"""
import argparse
import os
import shutil
import sys
import time
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import video as configs  # noqa: E402
from experiments import common  # noqa: E402

STEPS, PRETRAIN_STEPS = 1000, 2000
IMAGE_STEPS = 2400  # configs/quickstart.py's model and recipe
# name -> (configs/video.py argument, run it starts from or None, what the row is)
TRAINED = {
    "image": ("stage=image", None, "image model (cluttered digits), for inflation"),
    "frame": ("stage=frame", None, "one frame"),
    "scratch": ("stage=scratch", None, "dense, from scratch"),
    "inflated": ("stage=inflate,kernel=central", "image", "dense, inflated (central)"),
    "tl8": ("tl=8,loc=1", None, "TokenLearner S=8 per slice"),
    "videomae_pretrain": ("stage=pretrain,masking=tube", None, "VideoMAE pretraining"),
    "videomae": ("stage=finetune", "videomae_pretrain", "VideoMAE (90% tubes) → fine-tune"),
    "framemae_pretrain": ("stage=pretrain,masking=frame", None, "frame-masking pretraining"),
    "framemae": ("stage=finetune", "framemae_pretrain", "90% per-frame masking → fine-tune"),
    # VIOLET-style masked visual-token modeling: a k-means tokenizer of single digits' patches,
    # whose codes the pretraining predicts (`{tokenizer}` is that run's workdir).
    "tokenizer": ("stage=tokenizer", None, "k-means tokenizer (VIOLET's targets)"),
    "violet_pretrain": ("stage=violet,tokenizer={tokenizer}", None, "VIOLET-style pretraining"),
    "violet": ("stage=finetune", "violet_pretrain", "VIOLET-style MVM → fine-tune"),
    # Merging across time (configs/video.py's TEMPORAL), trained from the inflated init, and
    # ToMe over space-time trained alike at the same FLOPs (r = 32: 0.6x, r = 60: 0.47x).
    **{f"inflated_{k}_trained": (f"stage=inflate,kernel=central,temporal={k}", "image",
                                 f"inflated + {label}, trained")
       for k, label in (("testa50", "TESTA 50%"), ("testa25", "TESTA 25%"),
                        ("tempme50", "TempMe 50%"), ("tempme25", "TempMe 25%"))},
    **{f"inflated_tome{r}_trained": (f"stage=inflate,kernel=central,tome={r}", "image",
                                     f"inflated + ToMe space-time r={r}, trained")
       for r in (32, 60)},
}
PRETRAINING = ("image", "videomae_pretrain", "framemae_pretrain", "tokenizer", "violet_pretrain")
# Training-free rows: ToMe over all tokens (r per block) and per time slice (r per slice per
# block, 2 slices: the same token schedule at half the r), on a dense run's params.
# name -> (token_reduction, the dense run it runs on, what the row is)
OFF_THE_SHELF = {
    "tome_st32": ({"method": "tome", "r": 32, "prop_attn": True}, "scratch",
                  "ToMe space-time r=32"),
    "tome_slice16": ({"method": "tome", "r": 16, "prop_attn": True, "per_slice": True},
                     "scratch", "ToMe per slice r=16"),
    "tome_st56": ({"method": "tome", "r": 56, "prop_attn": True}, "scratch",
                  "ToMe space-time r=56"),
    "tome_slice28": ({"method": "tome", "r": 28, "prop_attn": True, "per_slice": True},
                     "scratch", "ToMe per slice r=28"),
    "inflated_tome_st32": ({"method": "tome", "r": 32, "prop_attn": True}, "inflated",
                           "inflated + ToMe space-time r=32"),
    "inflated_tome_slice16": ({"method": "tome", "r": 16, "prop_attn": True, "per_slice": True},
                              "inflated", "inflated + ToMe per slice r=16"),
    "inflated_tome_st56": ({"method": "tome", "r": 56, "prop_attn": True}, "inflated",
                           "inflated + ToMe space-time r=56"),
    "inflated_tome_slice28": ({"method": "tome", "r": 28, "prop_attn": True, "per_slice": True},
                              "inflated", "inflated + ToMe per slice r=28"),
    "inflated_tome_st60": ({"method": "tome", "r": 60, "prop_attn": True}, "inflated",
                           "inflated + ToMe space-time r=60"),
    # TESTA and TempMe off the shelf (TempMe's per-frame position embedding would start at
    # zero: left out).
    **{f"inflated_{k}": (dict(configs.TEMPORAL[k], **({"frame_pos": False} if "tempme" in k
                                                     else {})),
                         "inflated", f"inflated + {label}")
       for k, label in (("testa50", "TESTA 50%"), ("testa25", "TESTA 25%"),
                        ("tempme50", "TempMe 50%"), ("tempme25", "TempMe 25%"))},
}
TEMPORAL_ROWS = ("inflated_testa50", "inflated_testa25", "inflated_tempme50", "inflated_tempme25",
                 "inflated_testa50_trained", "inflated_testa25_trained",
                 "inflated_tempme50_trained", "inflated_tempme25_trained",
                 "inflated_tome32_trained", "inflated_tome60_trained")
ROWS = ("frame", "scratch", "inflated", "tl8",
        *(k for k in OFF_THE_SHELF if k not in TEMPORAL_ROWS), *TEMPORAL_ROWS, "videomae",
        "framemae", "violet")
BASELINE = "scratch"
# Trained rows that start from the inflated model are compared with it.
VERSUS = {name: "inflated" for name in TEMPORAL_ROWS if name.endswith("_trained")}


def _config(name: str, args, workdirs: Dict[str, str]):
  arg, parent, _ = TRAINED[name]
  if parent:
    arg += f",init={workdirs[parent]}"
  arg = arg.format(tokenizer=workdirs["tokenizer"])
  steps = (args.pretrain_steps if name.endswith("_pretrain")
           else IMAGE_STEPS if name == "image" else None if name == "tokenizer" else args.steps)
  return common.run_config(configs.get_config, arg, args.small,
                           None if args.small else steps)


def train_all(args) -> Dict[str, Dict]:
  """Trains (or reuses) every run the rows need; {name: summary}."""
  workdirs = {name: os.path.join(args.workroot, name) for name in TRAINED}
  summaries = {}
  for name in TRAINED:
    t0 = time.time()
    summaries[name] = common.train_or_reuse(_config(name, args, workdirs), workdirs[name])
    print(f"[video] {name}: {time.time() - t0:.0f}s {summaries[name].get('wall_time_s')}",
          flush=True)
  return summaries


def load(name: str, args):
  """(model, params, config, info) of a row: a trained run, or ToMe on a dense run's params."""
  if name in OFF_THE_SHELF:
    reduction, base, _ = OFF_THE_SHELF[name]
    return common.load_run(os.path.join(args.workroot, base), reduction)
  return common.load_run(os.path.join(args.workroot, name))


def per_key_accuracy(predict, data_config, batch: int = 200) -> Dict[str, Any]:
  """{"accuracy/<key>": ..., "examples": n} of `predict(clips) -> logits` over the eval split."""
  from vitoken.data import pipeline  # pylint: disable=import-outside-toplevel
  from vitoken.tasks import classification  # pylint: disable=import-outside-toplevel
  splits = pipeline.dataset_info(data_config).label_splits()
  correct = {key: 0 for key, _ in splits}
  total = 0
  for b in pipeline.eval_iterator(data_config, global_batch_size=batch):
    logits = classification.per_key(np.asarray(predict(b["image"])), splits)
    labels = classification.per_key(b["labels"], splits)
    for key, _ in splits:
      correct[key] += int(((logits[key].argmax(-1) == labels[key].argmax(-1)) & b["mask"]).sum())
    total += int(b["mask"].sum())
  return {**{f"accuracy/{k}": v / max(total, 1) for k, v in correct.items()}, "examples": total}


def evaluate(name: str, args, cache: Dict[str, Dict]) -> Dict:
  if name in cache:
    return cache[name]
  model, params, config, info = load(name, args)
  predict = jax.jit(lambda x: model.apply({"params": params}, x)[0])
  probe = jnp.zeros((args.batch, *info.image_shape), jnp.float32)
  fields = {"tokens": common.tokens_per_block(model, params, probe),
            "GFLOPs/clip": common.flops(predict, probe) / args.batch / 1e9,
            **per_key_accuracy(predict, config.data)}
  cache[name] = fields
  common.save_json(os.path.join(args.workroot, "evaluations.json"), cache)
  return fields


def timing(args) -> Dict[str, Dict[str, float]]:
  """Inference clips/s of every row, interleaved in one run."""
  fns, probe_of = {}, {}
  for name in ROWS:
    model, params, _, info = load(name, args)
    fns[name] = jax.jit(lambda x, m=model, p=params: m.apply({"params": p}, x)[0])
    probe_of[name] = jnp.zeros((args.batch, *info.image_shape), jnp.float32)
  # Every row gets its own input shape (the one-frame model reads one frame): time each on its
  # own probe through a closure, all in one interleaved loop.
  cases = {name: (lambda f=fns[name], x=probe_of[name]: f(x)) for name in ROWS}
  from vitoken.bench import core  # pylint: disable=import-outside-toplevel
  return core.interleaved_throughput(cases, batch=args.batch, windows=args.windows,
                                     iters=args.iters)


def rows_table(summaries, cache, speed) -> List[Dict]:
  """The table's rows; Δ against the dense run a row starts from or runs on (scratch for the
  runs trained from scratch or from pretraining, the inflated run for ToMe on its params)."""
  rows = []
  for name in ROWS:
    fields = dict(cache[name])
    s = speed[name]
    base = OFF_THE_SHELF[name][1] if name in OFF_THE_SHELF else VERSUS.get(name, BASELINE)
    label = OFF_THE_SHELF[name][2] if name in OFF_THE_SHELF else TRAINED[name][2]
    rows.append({
        "run": name, "row": label, "vs": base, **fields,
        "x dense FLOPs": fields["GFLOPs/clip"] / cache[base]["GFLOPs/clip"],
        "clips/s": s["median"], "clips/s min": s["min"], "clips/s max": s["max"],
        "clips/s (min-max)": f"{s['median']:,.0f} ({s['min']:,.0f}-{s['max']:,.0f})",
        "x dense clips/s": s["median"] / speed[base]["median"],
        "digit (%)": 100 * fields["accuracy/label"],
        "direction (%)": 100 * fields["accuracy/direction"],
        "Δ digit (points)": 100 * (fields["accuracy/label"] - cache[base]["accuracy/label"]),
        "Δ direction (points)": 100 * (fields["accuracy/direction"]
                                       - cache[base]["accuracy/direction"]),
        "train s": (0.0 if name in OFF_THE_SHELF
                    else summaries.get(name, {}).get("wall_time_s") or 0.0),
    })
  return rows


COLUMNS = ["row", "tokens", "GFLOPs/clip", "x dense FLOPs", "clips/s (min-max)",
           "x dense clips/s", "digit (%)", "direction (%)", "vs", "Δ digit (points)",
           "Δ direction (points)", "train s"]


def _shown(row: Dict) -> Dict:
  """The row as the table prints it: accuracies to 0.1 point, differences signed."""
  return {**row, **{k: f"{row[k]:.1f}" for k in ("digit (%)", "direction (%)")},
          **{k: f"{row[k]:+.1f}" for k in ("Δ digit (points)", "Δ direction (points)")}}


def plot(rows: List[Dict], path: str, meta: Dict) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, key in zip(axes, ("digit (%)", "direction (%)")):
    # The one-frame model reads no motion (direction near chance): left out of the direction
    # panel, whose scale would otherwise hide the differences between the video models.
    shown = [r for r in rows if key == "digit (%)" or r["run"] != "frame"]
    for r in shown:
      marker = "s" if r["run"] in ("scratch", "inflated", "frame") else (
          "^" if "mae" in r["run"] or r["run"] == "violet" else "o")
      ax.plot(r["clips/s"], r[key], marker, markersize=6)
      ax.annotate(r["run"], (r["clips/s"], r[key]), fontsize=6, textcoords="offset points",
                  xytext=(3, 3))
    ax.set_xlabel("inference clips / s (median)")
    ax.set_ylabel(f"test {key}" + ("" if len(shown) == len(rows) else " (one frame: off scale)"))
    ax.grid(alpha=0.3)
  fig.suptitle(f"moving digits, {meta['device']}, {meta['date']}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def testa_picture(args, path: str, clips: int = 3) -> Dict[str, Any]:
  """Which frames and patches TESTA (25%, off the shelf on the inflated run) merged, for a few
  test clips: per time slice, the mean of its frames and its patches painted by the token
  that holds them at the end (one colour per token, the same in both slices: the frame merge
  of block 0 joins the slices position by position). Returns per-clip counts."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  from vitoken import visualize  # pylint: disable=import-outside-toplevel
  from vitoken.data import pipeline  # pylint: disable=import-outside-toplevel
  spec = dict(configs.TEMPORAL["testa25"], trace_source=True)
  model, params, config, _ = common.load_run(os.path.join(args.workroot, "inflated"), spec)
  batch = next(iter(pipeline.eval_iterator(config.data, global_batch_size=clips)))
  _, aux = jax.jit(lambda x: model.apply({"params": params}, x))(batch["image"])
  state = aux["state"]
  grid = model.patch_grid(batch["image"].shape[1:-1])
  t, (h, w), tube = grid.frames, grid.hw, grid.patch[0]
  palette = plt.get_cmap("tab20")(np.arange(20))[:, :3]
  fig, axes = plt.subplots(clips, 2 * t, figsize=(1.8 * 2 * t, 1.9 * clips), squeeze=False)
  counts = []
  for c in range(clips):
    source = np.asarray(state.source[c])[:, state.num_prefix:]  # [N, T' h w]
    held = source.reshape(len(source), t, h * w).sum(-1) > 0  # [N, T']: slices each token holds
    counts.append({"tokens": int(len(source)), "holding every slice": int(held.all(1).sum())})
    for s in range(t):
      frames = np.asarray(batch["image"][c, s * tube:(s + 1) * tube]).mean(0)  # [H, W, C]
      groups = visualize.token_groups(source[:, s * h * w:(s + 1) * h * w], 0, (h, w))
      gray = visualize._rgb01(frames)  # pylint: disable=protected-access
      colours = np.kron(palette[groups % 20], np.ones((gray.shape[0] // h, gray.shape[1] // w, 1)))
      panels = [(gray, f"frames {s * tube}-{(s + 1) * tube - 1}"),
                (0.4 * gray + 0.6 * colours, f"{len(np.unique(groups))} tokens")]
      for k, (picture, title) in enumerate(panels):
        ax = axes[c, 2 * s + k]
        ax.imshow(np.clip(picture, 0, 1), interpolation="nearest")
        ax.set_title(title, fontsize=7)
        ax.set_xticks([]), ax.set_yticks([])
  fig.suptitle(f"TESTA 25% off the shelf ({model.depth} blocks): block 0 merges the {t} time "
               "slices position by position,\nthen every block merges 12 patches within the "
               "slice; colour = the final token holding a patch", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return {"clips": counts}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workroot", default="/tmp/vitoken_video")
  p.add_argument("--small", action="store_true", help="runlocal-sized runs (a smoke test)")
  p.add_argument("--steps", type=int, default=STEPS, help="steps of every classifier")
  p.add_argument("--pretrain_steps", type=int, default=PRETRAIN_STEPS)
  p.add_argument("--batch", type=int, default=64, help="batch of the timed programs")
  p.add_argument("--windows", type=int, default=5)
  p.add_argument("--iters", type=int, default=2)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  p.add_argument("--name", default="video", help="output files' name in --out")
  args = p.parse_args(argv)
  from vitoken.engine.metrics import quiet_libraries  # pylint: disable=import-outside-toplevel
  quiet_libraries(verbose=False)
  start = time.time()
  summaries = train_all(args)
  cache = common.load_json(os.path.join(args.workroot, "evaluations.json"))
  for name in ROWS:
    evaluate(name, args, cache)
  speed = timing(args)
  rows = rows_table(summaries, cache, speed)
  text = common.markdown_table([_shown(r) for r in rows], COLUMNS)
  print(text)
  image_eval = {k: v for k, v in summaries["image"].items() if k.startswith("eval")}
  meta = {"command": "python experiments/video.py " + " ".join(argv or sys.argv[1:]),
          "device": common.device_name(), "date": time.strftime("%Y-%m-%d"),
          "jax": jax.__version__, "small": args.small,
          "model": dict(configs.ENCODER, **configs.POOLING, patch_size=configs.VIDEO_PATCH),
          "steps": {"classifiers": args.steps, "pretraining": args.pretrain_steps,
                    "image model": IMAGE_STEPS},
          "image model eval (cluttered digits)": image_eval,
          "pretraining train s": {k: summaries[k].get("wall_time_s") for k in PRETRAINING},
          # Every run's own training wall time (compile, evals and saves in), reused or not.
          "all runs train s": sum(v.get("wall_time_s") or 0.0 for v in summaries.values()),
          "timed batch": args.batch, "windows": args.windows, "iters per window": args.iters,
          "flops": "XLA cost analysis of the compiled inference, 2 per multiply-add",
          "this call wall s": time.time() - start}
  os.makedirs(args.out, exist_ok=True)
  meta["testa picture"] = testa_picture(args, os.path.join(args.out, f"{args.name}_testa.png"))
  common.write_results(args.out, args.name, rows, text, meta)
  plot(rows, os.path.join(args.out, f"{args.name}.png"), meta)
  # VideoMAE's last reconstruction preview (clips of the test split: original, masked,
  # reconstruction), beside the table.
  shutil.copyfile(os.path.join(args.workroot, "videomae_pretrain", "previews", "reconstructions.png"),
                  os.path.join(args.out, f"{args.name}_reconstructions.png"))
  return rows, meta


if __name__ == "__main__":
  main()
