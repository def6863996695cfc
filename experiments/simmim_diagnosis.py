"""Why does SimMIM pretraining hurt fine-tuning on cluttered digits? Runs that separate the data,
the schedule, the recipe and a possible bug.

  python experiments/simmim_diagnosis.py --small        # runlocal-sized smoke version (minutes)
  python experiments/simmim_diagnosis.py                # every run (about an hour on 2 CPU cores)
  python experiments/simmim_diagnosis.py --extras ""    # without the optional MAE / ratio-0.4 runs

Trains `configs/masked_modeling.py` stages in `--workroot/<run>` (finished runs are reused):
- SimMIM pretraining as configured (16 px mask cells, ratio 0.6) and with 8 px cells (= the
  model patch: random patch masking), `--steps` each; extras: ratio 0.4 at 16 px ("r04") and
  MAE ("mae") with the same steps;
- fine-tunes (`--finetune_steps`, stage=finetune) from each with the config's layer decay 0.75,
  from the 16 px run also with layer decay 1.0, and stage=scratch; train losses are logged every
  10 steps to see how each starts;
then, on the pretrained encoders and a random-init one: the reconstruction L1 against the
trivial "predict the background" answer, a per-layer linear probe (mean of the patch tokens
of every block's output, logistic regression on `--probe_train` train / `--probe_test` test
images) and the scale of the weights and of the residual stream per block.
Writes `--out`/simmim_diagnosis.{json,md}.
"""
import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import common  # noqa: E402

# pretraining run -> (configs/masked_modeling.py method, task overrides, extra name or None)
PRETRAIN = {
    "simmim16": ("simmim", {}, None),
    "simmim8": ("simmim", {"mask_patch_size": 8}, None),
    # SimMIM with a squared-error loss (a task defined below, not in vitoken): the L1 loss's
    # optimum is each pixel's conditional median, the L2 loss's its mean.
    "simmim16_l2": ("simmim", {"name": "simmim_l2"}, "l2"),
    "mae": ("mae", {}, "mae"),
    "simmim16_r04": ("simmim", {"mask_ratio": 0.4}, "r04"),
}
# fine-tune run -> (pretraining run or None for scratch, layer_decay override or None)
FINETUNE = {
    "scratch": (None, None),
    "simmim16_ft": ("simmim16", None),
    "simmim16_ft_ld1": ("simmim16", 1.0),
    "simmim8_ft": ("simmim8", None),
    "simmim16_l2_ft": ("simmim16_l2", None),
    "mae_ft": ("mae", None),
    "simmim16_r04_ft": ("simmim16_r04", None),
}
FT_LOG_EVERY = 10
LOSS_STEPS = (10, 20, 50, 100, 200, 500)
BACKGROUND = -1.0  # an empty pixel: 0 in [0, 1], normalised by mean 0.5 / std 0.5

# What the reference (microsoft/SimMIM, ViT-B config) does differently from vitoken here.
REFERENCE_DIFFERENCES = [
    ("masking", "same: ceil(ratio * cells) random cells of `mask_patch_size`, repeated over the "
     "model patches (MaskGenerator); 32 px cells on 224 px images (7x7 cells), here 16 px on "
     "64 px (4x4 cells)"),
    ("mask token", "same: learned token (std 0.02) replaces the masked patch embeddings before "
     "the position embedding; the class token is kept and gets no prediction"),
    ("loss", "same: L1 over masked pixels summed over channels / (masked pixels + 1e-5) / "
     "channels; prediction by a per-token linear layer (1x1 conv + PixelShuffle) from every "
     "patch token after the encoder's final LayerNorm"),
    ("encoder", "differs: reference ViT-B uses no absolute position embedding (USE_APE False) "
     "but one relative position bias shared by all blocks (USE_SHARED_RPB), layer scale "
     "(INIT_VALUES 0.1), BEiT init (trunc-normal 0.02, out-projections / sqrt(2 * layer)), "
     "q/v bias only; vitoken uses fixed 2-D sin-cos positions, no layer scale, flax init"),
    ("pretraining recipe", "differs: reference lr 1e-4 * batch/512 (4e-4 at batch 2048; "
     "2.5e-5 scaled to batch 128), AdamW b2 0.999, weight decay 0.05, grad clip 5, drop path 0.1, "
     "10 warmup epochs then step decay, RandomResizedCrop(0.67-1) + flip; here lr 1.5e-3, "
     "b2 0.95, no clip, no drop path, no augmentation, 200 warmup steps then cosine"),
    ("fine-tune recipe", "similar: mean pooling + fresh fc_norm (the pretrained final norm is "
     "dropped), drop path 0.1, layer decay 0.65 (here 0.75), lr 1.25e-3 * batch/512, 20 "
     "warmup of 100 epochs, mixup/cutmix/RandAugment/label smoothing (not here)"),
]


def register_l2_task():
  """Task "simmim_l2": SimMIM with the mean squared error over the masked pixels in place of
  the L1 error (model, masks and everything else as vitoken's SimMIM)."""
  from vitoken.models import masking  # pylint: disable=import-outside-toplevel
  from vitoken.tasks import base, masked_modeling  # pylint: disable=import-outside-toplevel
  if "simmim_l2" in base.registered_tasks():
    return

  @base.register("simmim_l2")
  class SimMIML2Task(masked_modeling.SimMIMTask):  # pylint: disable=unused-variable

    def per_example(self, images, pred, mask):
      target = masking.patchify(jnp.asarray(images, jnp.float32), tuple(self.encoder().patch_size))
      sq = ((pred.astype(jnp.float32) - target) ** 2).sum(axis=-1)
      mask = mask.astype(jnp.float32)
      return (sq * mask).sum(axis=1), mask.sum(axis=1) * target.shape[-1] + 1e-5

    def loss(self, params, frozen, batch, rng, step, progress):
      _, pred, mask = self.apply(params, batch, rng, train=True)
      num, den = self.per_example(batch["image"], pred, mask)
      loss = num.sum() / den.sum()
      return loss, {"loss": loss, "masked_share": mask.mean()}


def _configs():
  from configs import masked_modeling  # pylint: disable=import-outside-toplevel
  return masked_modeling


def pretrain_config(name: str, small: bool, steps: int):
  method, overrides, _ = PRETRAIN[name]
  c = _configs().get_config(f"stage=pretrain,method={method},steps={steps}"
                            + (",runlocal" if small else ""))
  for k, v in overrides.items():
    c.task[k] = v
  if not small:
    c.eval_every_steps = steps  # one eval at the end (checkpoints still every 1000)
  c.progress_bar = False
  return c


def finetune_config(name: str, workroot: str, small: bool, steps: int):
  init, layer_decay = FINETUNE[name]
  arg = "stage=scratch" if init is None else f"stage=finetune,init={os.path.join(workroot, init)}"
  c = _configs().get_config(f"{arg},steps={steps}" + (",runlocal" if small else ""))
  if layer_decay is not None:
    c.optim.layer_decay = layer_decay
  if not small:
    c.log_every_steps = FT_LOG_EVERY
  c.progress_bar = False
  return c


def read_metrics(workdir: str) -> List[Dict]:
  from vitoken.engine.metrics import records  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, records.METRICS_FILE)
  return records.read_jsonl(path) if os.path.exists(path) else []


def finetune_row(name: str, workdir: str, summary: Dict, small: bool) -> Dict:
  init, layer_decay = FINETUNE[name]
  recs = read_metrics(workdir)
  train = {r["step"]: r for r in recs if r["split"] == "train"}
  evals = {r["step"]: r for r in recs if r["split"] == "eval"}
  steps = sorted(train)
  row = {"run": name, "init": init or "random", "layer_decay": layer_decay or (
      0.75 if init else None), "steps": summary["final_step"],
         "accuracy": summary["eval"]["accuracy"], "train s": summary.get("wall_time_s")}
  # The first logged windows (each the mean over the steps since the previous record).
  for s in (steps[:4] if small else LOSS_STEPS):
    if s in train:
      row[f"loss@{s}"] = train[s]["loss"]
  row["first_losses"] = {s: train[s]["loss"] for s in steps[:12]}
  mid = [s for s in sorted(evals) if s < summary["final_step"]]
  if mid:
    row["acc@mid"] = evals[mid[0]]["accuracy"]
    row["mid step"] = mid[0]
  return row


# ---- analysis of the encoders ----------------------------------------------------------------
def load_images(data_config, split: str, n: int, batch: int = 250):
  from vitoken.data import pipeline  # pylint: disable=import-outside-toplevel
  images, labels = [], []
  it = pipeline.eval_iterator(data_config, global_batch_size=batch, split=f"{split}[:{n}]")
  for b in it:
    m = np.asarray(b["mask"], bool)
    images.append(np.asarray(b["image"])[m])
    labels.append(np.asarray(b["labels"])[m].argmax(-1))
  return np.concatenate(images), np.concatenate(labels)


def encoder_model(model_fields: Dict, channels: int):
  from vitoken.models import vit  # pylint: disable=import-outside-toplevel
  fields = dict(model_fields)
  for k in ("token_reduction", "drop_path_rate", "pool_type", "fc_norm", "num_classes"):
    fields.pop(k, None)
  return vit.Model(0, channels=channels, pool_type="none", fc_norm=False, **fields)


def encoder_params(workdir: Optional[str], model, images):
  """The pretraining run's encoder params (minus the mask token), or a random init."""
  if workdir is None:
    return model.init(jax.random.key(0), images[:2])["params"]
  from vitoken.engine import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  enc = dict(ckpt_lib.load_params(workdir)["encoder"])
  enc.pop("mask_token", None)
  return jax.tree.map(jnp.asarray, enc)


def layer_features(model, params, images, batch: int = 250):
  """{tap: [N, width]} mean over patch tokens of the stem, each block's output and the final
  LayerNorm's output, plus {tap: residual-stream RMS} and the final block's token RMS."""
  p = model.num_prefix

  @jax.jit
  def taps(x):
    _, aux = model.apply({"params": params}, x)
    out = {"stem": aux["stem"].reshape(x.shape[0], -1, aux["stem"].shape[-1])}
    out.update({k: v[:, p:] for k, v in aux["blocks"].items()})
    out["encoded"] = aux["encoded"][:, p:]
    means = {k: v.mean(axis=1) for k, v in out.items()}
    rms = {k: jnp.sqrt((v ** 2).mean(axis=-1)).mean(axis=1) for k, v in out.items()}
    # Mean pairwise cosine of an image's patch tokens (self-pairs included): 1 = all alike.
    unit = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-6)
    cos = {k: (unit(v).mean(axis=1) ** 2).sum(axis=-1) for k, v in out.items()}
    return means, rms, cos

  feats, rms, cos = {}, {}, {}
  for i in range(0, len(images), batch):
    m, r, c = jax.device_get(taps(jnp.asarray(images[i:i + batch])))
    for k in m:
      feats.setdefault(k, []).append(np.asarray(m[k]))
      rms.setdefault(k, []).append(np.asarray(r[k]))
      cos.setdefault(k, []).append(np.asarray(c[k]))
  order = ["stem"] + sorted(k for k in feats if k.startswith("block_")) + ["encoded"]
  return ({k: np.concatenate(feats[k]) for k in order},
          {k: float(np.concatenate(rms[k]).mean()) for k in order},
          {k: float(np.concatenate(cos[k]).mean()) for k in order})


def probe_accuracy(xtr, ytr, xte, yte) -> float:
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel
  from sklearn.pipeline import make_pipeline  # pylint: disable=import-outside-toplevel
  from sklearn.preprocessing import StandardScaler  # pylint: disable=import-outside-toplevel
  clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
  clf.fit(xtr, ytr)
  return float(clf.score(xte, yte))


def param_norms(params) -> Dict[str, float]:
  """L2 norm of every block's kernels (attention + MLP) and of the patch embedding."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  out: Dict[str, float] = {}
  for k, v in flat.items():
    if not k.endswith("kernel"):
      continue
    group = k.split("/")[0]
    out[group] = out.get(group, 0.0) + float(np.sum(np.square(v)))
  return {k: float(np.sqrt(v)) for k, v in sorted(out.items())}


def reconstruction_check(workdir: str, run_config, images) -> Dict[str, float]:
  """The SimMIM model's masked-pixel L1 on `images` against predicting the background
  everywhere, on all masked pixels and on the masked ink pixels (|x - background| > 0.2)."""
  from vitoken.engine import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from vitoken.models import masking, simmim  # pylint: disable=import-outside-toplevel
  task = dict(run_config.task)
  fields = dict(run_config.model)
  fields["channels"] = images.shape[-1]
  model = simmim.SimMIM(encoder=fields, mask_patch_size=task["mask_patch_size"],
                        mask_ratio=task["mask_ratio"])
  params = jax.tree.map(jnp.asarray, ckpt_lib.load_params(workdir))
  (gh, gw), _ = model.grids(images.shape[1:3])
  rng = np.random.default_rng(0)
  patch = tuple(model.encoder_model().patch_size)

  @jax.jit
  def sums(x, noise):
    _, pred, mask = model.apply({"params": params}, x, noise=noise)
    target = masking.patchify(x, patch)
    ink = (jnp.abs(target - BACKGROUND) > 0.2).astype(jnp.float32) * mask[..., None]
    allm = jnp.broadcast_to(mask[..., None], target.shape)
    err_model = jnp.abs(pred - target)
    err_bg = jnp.abs(BACKGROUND - target)
    return {"pixels": allm.sum(), "ink": ink.sum(),
            "sq_model": (err_model ** 2 * allm).sum(), "sq_background": (err_bg ** 2 * allm).sum(),
            "model": (err_model * allm).sum(), "background": (err_bg * allm).sum(),
            "model_ink": (err_model * ink).sum(), "background_ink": (err_bg * ink).sum()}

  tot = None
  for i in range(0, len(images), 250):
    x = jnp.asarray(images[i:i + 250])
    noise = jnp.asarray(rng.random((x.shape[0], gh * gw), dtype=np.float32))
    s = jax.device_get(sums(x, noise))
    tot = s if tot is None else {k: tot[k] + s[k] for k in s}
  tot = {k: float(v) for k, v in tot.items()}
  return {"L1 model": tot["model"] / tot["pixels"], "L1 background": tot["background"] / tot["pixels"],
          "ink L1 model": tot["model_ink"] / max(tot["ink"], 1),
          "ink L1 background": tot["background_ink"] / max(tot["ink"], 1),
          "ink share of masked": tot["ink"] / tot["pixels"],
          "L2 model": tot["sq_model"] / tot["pixels"],
          "L2 background": tot["sq_background"] / tot["pixels"]}


# ---- main ------------------------------------------------------------------------------------
def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workroot", default="/tmp/vitoken_simmim_diag")
  p.add_argument("--small", action="store_true", help="runlocal-sized runs (a smoke test)")
  p.add_argument("--steps", type=int, default=2000, help="pretraining steps")
  p.add_argument("--finetune_steps", type=int, default=1000)
  p.add_argument("--extras", default="l2,mae,r04",
                 help="optional runs, comma-separated: l2 (SimMIM with an L2 loss), mae, r04 "
                      "(ratio 0.4 at 16 px)")
  p.add_argument("--probe_train", type=int, default=5000)
  p.add_argument("--probe_test", type=int, default=2000)
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  args = p.parse_args(argv)
  register_l2_task()
  extras = set(filter(None, args.extras.split(",")))
  pre_runs = [n for n, (_, _, e) in PRETRAIN.items() if e is None or e in extras]
  ft_runs = [n for n, (init, _) in FINETUNE.items() if init is None or init in pre_runs]
  t0 = time.time()

  summaries: Dict[str, Dict] = {}
  configs: Dict[str, object] = {}
  # Core runs first (so a stopped run leaves the main comparison done), extras after.
  order = [("pre", "simmim16"), ("ft", "scratch"), ("ft", "simmim16_ft"), ("ft", "simmim16_ft_ld1"),
           ("pre", "simmim8"), ("ft", "simmim8_ft")]
  for n in pre_runs:
    if ("pre", n) not in order:
      order += [("pre", n)] + [("ft", f) for f in ft_runs if FINETUNE[f][0] == n]
  for kind, name in order:
    wd = os.path.join(args.workroot, name)
    c = (pretrain_config(name, args.small, args.steps) if kind == "pre"
         else finetune_config(name, args.workroot, args.small, args.finetune_steps))
    configs[name] = c
    print(f"== {name} ({time.time() - t0:.0f}s)", flush=True)
    summaries[name] = common.train_or_reuse(c, wd)

  ft_rows = [finetune_row(n, os.path.join(args.workroot, n), summaries[n], args.small)
             for n in ft_runs]
  scratch = next(r["accuracy"] for r in ft_rows if r["run"] == "scratch")
  for r in ft_rows:
    r["Δ vs scratch (points)"] = 100 * (r["accuracy"] - scratch)

  # ---- encoders: reconstruction, per-layer probe, scale ----
  from vitoken.data import pipeline  # pylint: disable=import-outside-toplevel
  data_config = configs["scratch"].data
  info = pipeline.dataset_info(data_config)
  xtr, ytr = load_images(data_config, "train", args.probe_train)
  xte, yte = load_images(data_config, "test", args.probe_test)
  print(f"probe data: {len(xtr)} train, {len(xte)} test ({time.time() - t0:.0f}s)", flush=True)

  pre_rows = []
  for name in pre_runs:
    c, s = configs[name], summaries[name]
    row = {"run": name, "method": c.task["name"], "mask cell px": c.task.get("mask_patch_size"),
           "mask ratio": c.task["mask_ratio"], "steps": s["final_step"],
           "eval loss": s["eval"]["loss"], "train s": s.get("wall_time_s")}
    recs = read_metrics(os.path.join(args.workroot, name))
    train = {r["step"]: r["loss"] for r in recs if r["split"] == "train"}
    row["train loss curve"] = train
    for frac, col in ((0.025, "loss@2.5%"), (0.1, "loss@10%"), (0.5, "loss@50%"), (1.0, "loss@end")):
      logged = sorted(train)
      if logged:
        nearest = min(logged, key=lambda k, f=frac: abs(k - f * row["steps"]))
        row[col] = train[nearest]
    if c.task["name"].startswith("simmim"):
      row.update(reconstruction_check(os.path.join(args.workroot, name), c, xte))
    pre_rows.append(row)

  encoders = {"random init": None, **{n: os.path.join(args.workroot, n) for n in pre_runs}}
  probe_rows, scale_rows, norm_rows, cos_rows = [], [], [], []
  for name, wd in encoders.items():
    model = encoder_model(dict(configs[pre_runs[0]].model), info.image_shape[-1])
    params = encoder_params(wd, model, jnp.asarray(xtr[:2]))
    ftr, rms, cos = layer_features(model, params, xtr)
    fte, _, _ = layer_features(model, params, xte)
    row = {"encoder": name}
    for tap in ftr:
      row[tap] = probe_accuracy(ftr[tap], ytr, fte[tap], yte)
    probe_rows.append(row)
    scale_rows.append({"encoder": name, **rms})
    cos_rows.append({"encoder": name, **cos})
    norm_rows.append({"encoder": name, **param_norms(params)})
    print(f"probe {name}: {row} ({time.time() - t0:.0f}s)", flush=True)

  taps = [k for k in probe_rows[0] if k != "encoder"]
  norm_cols = [k for k in norm_rows[0] if k != "encoder"]
  loss_cols = [k for k in ft_rows[0] if k.startswith("loss@")]
  ft_cols = (["run", "init", "layer_decay"] + loss_cols
             + (["acc@mid"] if any("acc@mid" in r for r in ft_rows) else [])
             + ["accuracy", "Δ vs scratch (points)"])
  pre_cols = ["run", "method", "mask cell px", "mask ratio", "steps", "loss@2.5%", "loss@10%",
              "loss@50%", "loss@end", "eval loss", "L1 model",
              "L1 background", "ink L1 model", "ink L1 background", "L2 model", "L2 background",
              "ink share of masked"]
  for r in ft_rows + pre_rows:
    for col in ft_cols + pre_cols:
      r.setdefault(col, float("nan") if col not in ("run", "init", "method") else "-")
  meta = {"device": common.device_name(), "workroot": os.path.abspath(args.workroot),
          "small": args.small, "pretrain_steps": args.steps,
          "finetune_steps": args.finetune_steps, "extras": sorted(extras),
          "probe": {"train": len(xtr), "test": len(xte),
                    "classifier": "StandardScaler + LogisticRegression(C=1, lbfgs)",
                    "features": "mean over the 64 patch tokens of each tap"},
          "encoder": configs[pre_runs[0]].model.to_dict(), "jax": jax.__version__,
          "wall_s": time.time() - t0}
  results = {"meta": meta, "pretraining": pre_rows, "finetune": ft_rows, "probe": probe_rows,
             "residual_rms": scale_rows, "token_cosine": cos_rows, "param_norms": norm_rows,
             "reference_differences": dict(REFERENCE_DIFFERENCES)}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "simmim_diagnosis.json"), "w") as f:
    json.dump(results, f, indent=1, default=float)
  md = render_md(results, pre_cols, ft_cols, taps, norm_cols)
  with open(os.path.join(args.out, "simmim_diagnosis.md"), "w") as f:
    f.write(md)
  print(md)


def render_md(results, pre_cols, ft_cols, taps, norm_cols) -> str:
  t = common.markdown_table
  meta = results["meta"]
  lines = [f"<!-- {json.dumps({k: meta[k] for k in meta if k != 'encoder'})} -->",
           "# SimMIM on cluttered digits: diagnosis", "",
           f"Pretraining {meta['pretrain_steps']} steps, fine-tuning {meta['finetune_steps']} "
           "steps (configs/masked_modeling.py; `experiments/simmim_diagnosis.py`"
           + (", --small" if meta["small"] else "") + ").", "",
           "## Pretraining and reconstruction",
           "",
           f"L1 on masked pixels (normalised units, {meta['probe']['test']} test images, fresh masks): the model's, "
           "and that of predicting the empty background (-1) everywhere; `ink` restricts both "
           "to masked pixels that are not background; L2 = mean squared error likewise. "
           "simmim16_l2 is trained with the L2 loss (its loss columns are squared errors).", "",
           t(results["pretraining"], pre_cols), "",
           "## Fine-tuning", "",
           f"Train loss = mean over the {FT_LOG_EVERY} steps up to the step shown; acc@mid = test "
           "accuracy at the mid-run eval.", "",
           t(results["finetune"], ft_cols), "",
           "## Per-layer linear probe (test accuracy)", "",
           f"Features: {meta['probe']['features']} (stem = patch embedding before positions, "
           f"encoded = after the final LayerNorm); {meta['probe']['classifier']} on "
           f"{meta['probe']['train']} train, scored on {meta['probe']['test']} test images.", "",
           t(results["probe"], ["encoder"] + taps), "",
           "## Scale", "",
           "Residual-stream RMS per token at each tap (test images):", "",
           t(results["residual_rms"], ["encoder"] + taps), "",
           "Mean pairwise cosine similarity of an image's patch tokens at each tap (1: every "
           "token alike):", "",
           t(results["token_cosine"], ["encoder"] + taps), "",
           "L2 norm of each group's kernels:", "",
           t(results["param_norms"], ["encoder"] + norm_cols), "",
           "## Reference (microsoft/SimMIM) vs vitoken", ""]
  lines += [f"- **{k}**: {v}" for k, v in REFERENCE_DIFFERENCES]
  lines += ["", "## Finding", "", finding(results), ""]
  return "\n".join(lines)


def finding(results) -> str:
  """The facts the tables support, in words (numbers filled in from this run)."""
  ft = {r["run"]: r for r in results["finetune"]}
  pre = {r["run"]: r for r in results["pretraining"]}
  probe = {r["encoder"]: r for r in results["probe"]}
  pct = lambda v: f"{100 * v:.1f}%"
  parts = []
  if "simmim16_ft" in ft:
    parts.append(
        f"Fine-tuned for {ft['scratch']['steps']} steps, the 16 px SimMIM encoder reaches "
        f"{pct(ft['simmim16_ft']['accuracy'])} against {pct(ft['scratch']['accuracy'])} from "
        f"scratch; with layer decay 1.0 {pct(ft['simmim16_ft_ld1']['accuracy'])}; from 8 px "
        f"(random patch) masking {pct(ft['simmim8_ft']['accuracy'])}"
        + (f"; SimMIM with an L2 loss {pct(ft['simmim16_l2_ft']['accuracy'])}"
           if "simmim16_l2_ft" in ft else "")
        + (f"; ratio 0.4 {pct(ft['simmim16_r04_ft']['accuracy'])}" if "simmim16_r04_ft" in ft else "")
        + (f"; MAE {pct(ft['mae_ft']['accuracy'])}" if "mae_ft" in ft else "") + ".")
  if "simmim16" in pre and "L1 model" in pre["simmim16"]:
    r = pre["simmim16"]
    parts.append(
        f"The 16 px model's masked-pixel L1 is {r['L1 model']:.3f} against {r['L1 background']:.3f} "
        f"for predicting the background everywhere; on masked ink pixels {r['ink L1 model']:.3f} "
        f"against {r['ink L1 background']:.3f}"
        + (f" (8 px cells: {pre['simmim8']['L1 model']:.3f} vs {pre['simmim8']['L1 background']:.3f},"
           f" ink {pre['simmim8']['ink L1 model']:.3f} vs {pre['simmim8']['ink L1 background']:.3f})"
           if "simmim8" in pre and "L1 model" in pre["simmim8"] else "") + ".")
  best = lambda r: max(v for k, v in r.items() if k != "encoder")
  parts.append("Best per-layer probe accuracy: " + ", ".join(
      f"{n} {pct(best(r))} (last block {pct(r.get('block_05', float('nan')))})"
      for n, r in probe.items()) + ".")
  return " ".join(parts) + ("\n\n" + INTERPRETATION if INTERPRETATION else "")


# What the full run's tables show (2000 pretraining / 1000 fine-tuning steps, 2026-12-03).
INTERPRETATION = ('SimMIM collapses to the trivial answer on these digits: its masked-pixel error equals pr'
    'edicting the empty background everywhere (L1 0.205 against 0.205, on ink 1.13 against 1.'
    '13), with 16 px cells and with 8 px ones. About 82% of masked pixels are background, and'
    " the L1 loss's optimum is each pixel's conditional median, which the background is almos"
    't everywhere. The encoder that learns this is worse than a random one: its patch tokens '
    'become all alike (mean cosine 0.999 after block 2, against 0.92 at random init), its res'
    'idual stream grows to an RMS of 15 (2.6 at random init), and a linear probe on it reads '
    "24% against 29% for a random init. Fine-tuning with MAE's layer decay of 0.75 keeps the "
    'collapsed early blocks nearly frozen, which gives 57.6% against 74.7% from scratch. With'
    ' a layer decay of 1.0 the same start recovers to 74.0%, 0.7 points below scratch. So the'
    " cause is the data and the loss: SimMIM's L1 target on mostly empty images teaches nothi"
    'ng. A recipe detail, the layer decay, then turns that into harm. It is not a bug: the lo'
    'ss, masks and mask token match the reference (tests). MAE on the same data, with its per'
    '-patch normalised targets and dropped tokens, gains 2.4 points over supervised training '
    '(the sweep).')


if __name__ == "__main__":
  main()
