"""Off-the-shelf ImageNet evaluation of published weights, dense and with training-free token
reduction: `python -m vitoken.evaluate` (flags in `__main__`).

    rows, info = evaluate("vit_b16.safetensors", data_folder="/imagenet",
                          timm_model="vit_base_patch16_224.augreg2_in21k_ft_in1k",
                          methods="dense,tome:8,topk:0.7,evit:0.7")
    print(table(rows))

A timm checkpoint (a local state dict, .safetensors or .pth) is read into the timm architecture
`timm_model` built with `pretrained=False` (nothing is downloaded), which also gives timm's eval
preprocessing for that model (`pretrained_cfg`: mean, std, crop_pct, interpolation); the
resolution is the one the model is built for (`patch_embed.img_size`, which `timm_kwargs`
like {"img_size": 384} change). A big_vision `.npz` is evaluated as big_vision does: the image
squashed (no crop) to the resolution of its position embedding, bilinear, mean = std = 0.5.

The data is an image folder (root/<split>/<wnid>/*.JPEG) or a TFDS split, read by vitoken's eval
pipeline (padding masked, so every image counts once). A folder's labels index its sorted class
folder names; for ImageNet these are the sorted wnids, which is the in1k label order of timm and
TFDS, so a folder of the 1000 classes lines up with a 1000-way head (a folder holding only some
classes does not, and is refused).

Every method runs on each batch as it is read (one decode for all), jitted; images/s is timed
apart, on one batch of random images, with `vitoken.bench.core.interleaved_throughput`, and
GFLOPs are `vitoken.bench.flops`' analytic count of the model's matmuls.
"""
import dataclasses
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from vitoken.bench import core as bench_core, flops as flops_lib
from vitoken.convert import from_big_vision, from_timm
from vitoken.convert.torch_reference import import_timm
from vitoken.data import pipeline
from vitoken.data.ops import INTERPOLATIONS
from vitoken.errors import CheckpointError, ConfigError, MissingPathError, UserError
from vitoken.paths import resolve

__all__ = ["Method", "Preprocessing", "evaluate", "load", "parse_methods", "table"]

# Training-free methods by name: (token_reduction key of the setting, its type). EViT runs with
# its fused token, as published, but without the training it was published with.
METHODS = {"dense": None, "tome": ("r", int), "topk": ("keep_rate", float),
           "evit": ("keep_rate", float)}


@dataclasses.dataclass(frozen=True)
class Method:
  name: str  # "dense", "tome", "topk", "evit"
  setting: Optional[Union[int, float]]  # ToMe's r, the keep rate of top-k and EViT
  token_reduction: Optional[Dict[str, Any]]  # the ViT field


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """The eval transform, as data config keys (crop_pct None: squash, no crop)."""
  image_size: int
  crop_pct: Optional[float]
  interpolation: str
  mean: Tuple[float, ...]
  std: Tuple[float, ...]


def parse_methods(spec: Union[str, Sequence[str]]) -> List[Method]:
  """"dense,tome:8,topk:0.7,evit:0.7" (or its list) -> Methods, in that order."""
  items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
  if not items:
    raise ConfigError("methods is empty; give e.g. dense,tome:8,topk:0.7,evit:0.7")
  methods = []
  for item in items:
    name, _, value = item.partition(":")
    if name not in METHODS:
      raise ConfigError(f"unknown method {item!r}; the training-free methods are "
                        f"{sorted(METHODS)}: dense, tome:<r>, topk:<keep rate>, evit:<keep rate>")
    if name == "dense":
      if value:
        raise ConfigError(f"method {item!r}: dense takes no setting")
      methods.append(Method("dense", None, None))
      continue
    key, kind = METHODS[name]
    try:
      setting = kind(value)
    except ValueError:
      raise ConfigError(f"method {item!r}: {name} needs {key} as a number after ':' "
                        f"(e.g. {name}:{8 if kind is int else 0.7})") from None
    methods.append(Method(name, setting, {"method": name, key: setting}))
  return methods


def load(checkpoint: str, *, timm_model: Optional[str] = None,
         timm_kwargs: Optional[Dict[str, Any]] = None, variant: Optional[str] = None):
  """(module, params, Preprocessing) of a timm state dict file or a big_vision .npz."""
  if not resolve(checkpoint).exists():
    raise MissingPathError(f"checkpoint {checkpoint} does not exist")
  if timm_model and variant:
    raise ConfigError("give timm_model (a timm checkpoint) or variant (a big_vision .npz), "
                      "not both")
  if timm_model:
    return _load_timm(checkpoint, timm_model, timm_kwargs or {})
  if timm_kwargs:
    raise ConfigError("timm_kwargs needs timm_model")
  if not str(checkpoint).endswith(".npz"):
    raise ConfigError(f"checkpoint {checkpoint} is not a big_vision .npz: for a timm state dict "
                      "give timm_model=<architecture>, e.g. "
                      "vit_base_patch16_224.augreg2_in21k_ft_in1k")
  return _load_big_vision(checkpoint, variant)


def _load_timm(checkpoint, name, kwargs):
  timm = import_timm()
  try:
    model = timm.create_model(name, pretrained=False, **kwargs)
  except RuntimeError as e:  # timm's "Unknown model (...)"
    raise ConfigError(f"timm_model {name!r}: {e}") from None
  model.eval()
  # timm's own loader: .safetensors or .pth, an EMA or "state_dict"/"model" entry, and the
  # remapping of older ViT layouts (pos_embed resized to this model's grid).
  filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
  try:
    timm.models.load_checkpoint(model, str(checkpoint), strict=True, filter_fn=filter_fn)
  except (RuntimeError, KeyError, ValueError, OSError) as e:
    raise CheckpointError(f"checkpoint {checkpoint} does not load into timm model {name!r} "
                          f"(another architecture, or timm_kwargs needed?): "
                          f"{' '.join(str(e).split())[:600]}") from None
  cfg = timm.data.resolve_model_data_config(model)
  if cfg.get("crop_mode", "center") != "center":
    raise ConfigError(f"timm model {name!r} evaluates with crop_mode={cfg['crop_mode']!r}; "
                      "vitoken's eval transform is timm's 'center' crop")
  if cfg["interpolation"] not in INTERPOLATIONS:
    raise ConfigError(f"timm model {name!r} evaluates with {cfg['interpolation']!r} "
                      f"interpolation; vitoken has {sorted(INTERPOLATIONS)}")
  # The resolution the model is built for: its pretrained_cfg keeps the default one when
  # timm_kwargs (img_size=...) changed it, as timm's validate.py with --img-size does.
  height, width = model.patch_embed.img_size
  if height != width:
    raise ConfigError(f"timm model {name!r} takes {height}x{width} images; the eval pipeline "
                      "makes square ones")
  try:
    module, params = from_timm(model)
  except ValueError as e:
    raise CheckpointError(f"timm model {name!r} cannot be converted: {e}") from None
  return module, params, Preprocessing(height, float(cfg["crop_pct"]), cfg["interpolation"],
                                       tuple(cfg["mean"]), tuple(cfg["std"]))


def _load_big_vision(checkpoint, variant):
  try:
    module, params = from_big_vision(checkpoint, variant)
  except UserError:
    raise
  except (ValueError, KeyError, OSError) as e:
    raise CheckpointError(f"checkpoint {checkpoint} is not a big_vision ViT .npz vitoken can "
                          f"read: {e}") from None
  size = _posemb_size(module, params)
  # big_vision's ImageNet fine-tuning evals resize the whole image to the model's size (no
  # crop) into [-1, 1], bilinear (tf.image.resize's default; PIL's here is antialiased).
  return module, params, Preprocessing(size, None, "bilinear", (0.5,), (0.5,))


def _posemb_size(module, params) -> int:
  ph, pw = module.patch_size
  if "pos_embedding" not in params:
    return 224
  grid = int(round((params["pos_embedding"].shape[1] - (module.num_prefix if module.posemb_prefix
                                                        else 0)) ** 0.5))
  if ph != pw:
    raise ConfigError(f"patch size {ph}x{pw}: the eval pipeline makes square images")
  return grid * ph


def _data_config(prep: Preprocessing, *, data_folder, tfds, data_dir, max_examples, workers):
  if (data_folder is None) == (tfds is None):
    raise ConfigError("give one of data_folder (root/val/<wnid>/*.JPEG) and tfds "
                      "(e.g. imagenet2012:validation)")
  config = dict(image_size=prep.image_size, crop_pct=prep.crop_pct,
                interpolation=prep.interpolation, mean=prep.mean, std=prep.std,
                eval_examples=max_examples, worker_count=workers, data_dir=data_dir)
  if data_folder is not None:
    root, split = _folder_split(data_folder)
    config.update(folder=root, eval_split=split)
  else:
    name, _, split = tfds.partition(":")
    config.update(name=name, eval_split=split or "validation")
  # Only the eval split is read: the train split must not be required to exist.
  config["train_split"] = config["eval_split"]
  return config


def _folder_split(folder: str) -> Tuple[str, str]:
  """An ImageNet root holding val/ (or validation/), or the split folder itself."""
  folder = str(resolve(folder))
  for split in ("val", "validation"):
    if resolve(f"{folder}/{split}").is_dir():
      return folder, split
  if not resolve(folder).is_dir():
    raise MissingPathError(f"data folder {folder} does not exist")
  root, _, split = folder.rpartition("/")
  return root or ".", split


def evaluate(checkpoint: str, *, timm_model: Optional[str] = None,
             timm_kwargs: Optional[Dict[str, Any]] = None, variant: Optional[str] = None,
             data_folder: Optional[str] = None, tfds: Optional[str] = None,
             data_dir: Optional[str] = None, methods: Union[str, Sequence[str]] = "dense",
             batch_size: int = 128, max_examples: Optional[int] = None, workers: int = 0,
             timing: Optional[Tuple[int, int, int]] = (5, 5, 2), dtype: Optional[str] = None,
             ) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
  """Top-1 accuracy, images/s and GFLOPs of the checkpoint dense and with each method.

  Returns (rows, info): a row per method with "method", "setting", "accuracy", "img/s",
  "GFLOPs", "tokens" and "predictions" (int [N], in the data's order); info describes the run
  (model, preprocessing, examples, labels [N]). `timing` is (windows, iters, warmup) of the
  throughput timer, None to skip it; `dtype` "bfloat16" computes in bf16 (fp32 weights).
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
  chosen = parse_methods(methods)
  module, params, prep = load(checkpoint, timm_model=timm_model, timm_kwargs=timm_kwargs,
                              variant=variant)
  data_config = _data_config(prep, data_folder=data_folder, tfds=tfds, data_dir=data_dir,
                             max_examples=max_examples, workers=workers)
  overrides = {} if dtype is None else {"dtype": jnp.dtype(dtype)}
  models = [module.clone(token_reduction=m.token_reduction, **overrides) for m in chosen]
  predict = [jax.jit(_predictor(m)) for m in models]

  batches = pipeline.eval_iterator(data_config, global_batch_size=batch_size,
                                   process_index=0, process_count=1)
  predictions: List[List[np.ndarray]] = [[] for _ in chosen]
  labels = []
  for batch in batches:
    if batch["labels"].shape[1] != module.num_classes:
      raise CheckpointError(
          f"the data has {batch['labels'].shape[1]} classes but the checkpoint's head has "
          f"{module.num_classes}: labels index the sorted class folders (ImageNet: the 1000 "
          "wnids), so the data must hold every class of the head")
    mask = np.asarray(batch["mask"])
    labels.append(np.argmax(batch["labels"], -1)[mask])
    for out, fn in zip(predictions, predict):
      out.append(np.asarray(fn(params, batch["image"]))[mask])
  labels = np.concatenate(labels)

  probe = jax.random.normal(jax.random.key(0),
                            (batch_size, prep.image_size, prep.image_size, module.channels))
  speed = {}
  if timing is not None:
    windows, iters, warmup = timing
    speed = bench_core.interleaved_throughput(dict(enumerate(predict)), params, probe,
                                              batch=batch_size, windows=windows, iters=iters,
                                              warmup=warmup)
  rows = []
  for i, (method, model) in enumerate(zip(chosen, models)):
    preds = np.concatenate(predictions[i])
    flops = flops_lib.summary(model, params, probe[:1])
    rows.append({"method": method.name, "setting": method.setting,
                 "accuracy": float(np.mean(preds == labels)),
                 "img/s": speed[i]["median"] if speed else float("nan"),
                 "GFLOPs": flops["analytic GFLOPs/img"], "tokens": flops["tokens"],
                 "predictions": preds})
  info = {"checkpoint": str(checkpoint), "model": timm_model or f"big_vision {variant or ''}",
          "preprocessing": prep, "examples": int(labels.size), "labels": labels,
          "data": data_folder or tfds, "batch_size": batch_size,
          "device": str(jax.devices()[0].device_kind)}
  return rows, info


def _predictor(model):
  def predict(params, images):
    logits, _ = model.apply({"params": params}, images)
    return jnp.argmax(logits, axis=-1)
  return predict


def table(rows, info: Optional[Dict[str, Any]] = None) -> str:
  """The rows as a markdown table (and a line on the run before it, given `info`)."""
  lines = []
  if info is not None:
    p = info["preprocessing"]
    crop = "squash (no crop)" if p.crop_pct is None else f"crop_pct {p.crop_pct:g}"
    lines.append(f"{info['model']} on {info['data']}: {info['examples']} images at "
                 f"{p.image_size}px, {crop}, {p.interpolation}, mean {_floats(p.mean)}, "
                 f"std {_floats(p.std)}; batch {info['batch_size']} on {info['device']}")
  lines += ["| method | setting | top-1 | img/s | GFLOPs | tokens |", "|---|---|---|---|---|---|"]
  for r in rows:
    setting = "-" if r["setting"] is None else f"{r['setting']:g}"
    speed = "-" if r["img/s"] != r["img/s"] else f"{r['img/s']:,.0f}"
    lines.append(f"| {r['method']} | {setting} | {r['accuracy']:.2%} | {speed} | "
                 f"{r['GFLOPs']:.3g} | {_short_tokens(r['tokens'])} |")
  return "\n".join(lines)


def _floats(values) -> str:
  return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _short_tokens(tokens: str) -> str:
  """'197>197>...>23': first and last counts, as the full chain is long for deep models."""
  counts = tokens.split(">")
  return tokens if len(counts) <= 4 else f"{counts[0]}>...>{counts[-1]}"

