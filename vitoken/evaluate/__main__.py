"""python -m vitoken.evaluate --checkpoint=<file> (--timm_model=<name> | [--variant=B/16])
  (--data_folder=<imagenet root or val folder> | --tfds=imagenet2012:validation [--data_dir=...])
  [--methods=dense,tome:8,tome:13,tome:16,topk:0.7,evit:0.7] [--batch_size=128]
  [--max_examples=N]

Prints top-1 accuracy, images/s and analytic GFLOPs of a timm or big_vision checkpoint, dense
and with each training-free token reduction (see `vitoken.evaluate`).
"""
import json

from absl import app, flags

from vitoken import cli, evaluate
from vitoken.engine.metrics import quiet_libraries
from vitoken.errors import ConfigError

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "a timm state dict (.safetensors, .pth) or "
                                  "a big_vision .npz")
_TIMM_MODEL = flags.DEFINE_string("timm_model", None, "timm architecture of a timm checkpoint, "
                                  "e.g. vit_base_patch16_224.augreg2_in21k_ft_in1k (no downloads)")
_TIMM_KWARGS = flags.DEFINE_string("timm_kwargs", None, "JSON of timm.create_model arguments, "
                                   'e.g. \'{"img_size": 384}\'')
_VARIANT = flags.DEFINE_string("variant", None, "a big_vision .npz's variant, e.g. B/16 (sets "
                               "the head count, which the .npz does not record)")
_DATA_FOLDER = flags.DEFINE_string("data_folder", None, "an ImageNet root holding val/ "
                                   "(<wnid>/*.JPEG), or the split folder itself")
_TFDS = flags.DEFINE_string("tfds", None, "a TFDS dataset:split, e.g. imagenet2012:validation")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "the TFDS data dir")
_METHODS = flags.DEFINE_string("methods", "dense,tome:8,tome:13,tome:16,topk:0.7,evit:0.7",
                               "comma-separated: dense, tome:<r>, topk:<keep rate>, "
                               "evit:<keep rate>")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "images per batch (accuracy and timing)")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", None, "evaluate the first N images only (a "
                                     "folder lists them class by class: use all for accuracy)")
_WORKERS = flags.DEFINE_integer("workers", 0, "grain worker processes decoding images")
_TIMING = flags.DEFINE_string("timing", "5,5,2", "images/s timer: windows,iters,warmup "
                              "(batches of random images); 'off' skips it")
_DTYPE = flags.DEFINE_string("dtype", None, "compute dtype, e.g. bfloat16 (weights stay fp32)")
flags.mark_flags_as_required(["checkpoint"])


def _timing(text):
  if text == "off":
    return None
  try:
    windows, iters, warmup = (int(v) for v in text.split(","))
  except ValueError:
    raise ConfigError(f"--timing must be windows,iters,warmup (e.g. 5,5,2) or off, got "
                      f"{text!r}") from None
  return windows, iters, warmup


def _kwargs(text):
  if text is None:
    return None
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise ConfigError(f"--timm_kwargs must be a JSON object, got {text!r}: {e}") from None
  if not isinstance(value, dict):
    raise ConfigError(f"--timm_kwargs must be a JSON object, got {text!r}")
  return value


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_libraries(False)
  rows, info = evaluate.evaluate(
      _CHECKPOINT.value, timm_model=_TIMM_MODEL.value, timm_kwargs=_kwargs(_TIMM_KWARGS.value),
      variant=_VARIANT.value, data_folder=_DATA_FOLDER.value, tfds=_TFDS.value,
      data_dir=_DATA_DIR.value, methods=_METHODS.value, batch_size=_BATCH_SIZE.value,
      max_examples=_MAX_EXAMPLES.value, workers=_WORKERS.value, timing=_timing(_TIMING.value),
      dtype=_DTYPE.value)
  print(evaluate.table(rows, info))


if __name__ == "__main__":
  cli.run(main)
