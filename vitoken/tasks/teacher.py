"""Loading a frozen teacher: another run's workdir or checkpoint, or a big_vision `.npz`.

    teacher = dict(path="/runs/big_teacher")            # its own config names its model
    teacher = dict(path="vit_b16.npz", model=dict(variant="B/16"))   # converted checkpoint
    teacher = dict(path="/runs/x", model=dict(dtype="bfloat16"))    # overrides of its model
"""
from vitoken import settings as settings_lib
from vitoken.convert import from_big_vision
from vitoken.errors import ConfigError
from vitoken.tasks import base, runs

DEFAULTS = {"path": None, "model": {}}


def load(spec, info):
  """(teacher ViT, params) for the data described by `info`; shapes are checked."""
  spec = settings_lib.resolve(spec, DEFAULTS, "teacher config")
  path, model_opts = spec["path"], dict(spec["model"] or {})
  if not path:
    raise ConfigError("the teacher needs a `path` (config.task.teacher.path): a run's workdir or "
                      "checkpoint, or a big_vision .npz")
  path = str(path)
  if path.endswith(".npz"):
    variant = model_opts.pop("variant", None)
    for key in ("dtype", "param_dtype"):
      if key in model_opts:
        model_opts[key] = base.dtype_of(model_opts[key])
    model, params = from_big_vision(path, variant, image_size=info.image_shape[-3:-1], **model_opts)
    return model, params
  model, params, _ = runs.load_model(path, info, model_overrides=model_opts,
                                     what="teacher checkpoint")
  return model, params
