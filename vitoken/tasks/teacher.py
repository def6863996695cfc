"""Loading a frozen teacher: another run's workdir or checkpoint, or a big_vision `.npz`.

    teacher = dict(path="/runs/big_teacher")            # its own config names its model
    teacher = dict(path="vit_b16.npz", model=dict(variant="B/16"))   # converted checkpoint
    teacher = dict(path="/runs/x", model=dict(dtype="bfloat16"))    # overrides of its model
"""
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from vitoken import settings as settings_lib
from vitoken.tasks import base

DEFAULTS = {"path": None, "model": {}}


def load(spec, info):
  """(teacher ViT, params) for the data described by `info`; shapes are checked."""
  from vitoken.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  spec = settings_lib.resolve(spec, DEFAULTS, "teacher config")
  path, model_opts = spec["path"], dict(spec["model"] or {})
  if not path:
    raise ValueError("the teacher needs a `path`: a run's workdir or checkpoint, or a big_vision .npz")
  path = str(path)
  if path.endswith(".npz"):
    from vitoken.convert import from_big_vision  # pylint: disable=import-outside-toplevel
    variant = model_opts.pop("variant", None)
    for key in ("dtype", "param_dtype"):
      if key in model_opts:
        model_opts[key] = base.dtype_of(model_opts[key])
    model, params = from_big_vision(path, variant, image_size=info.image_shape[:2], **model_opts)
    return model, params
  run_config = ckpt_lib.load_run_config(path)
  model = base.vit_from_config({**settings_lib.as_dict(run_config.model, "teacher model"),
                                **model_opts}, info)
  params = ckpt_lib.load_params(path)
  images = jax.ShapeDtypeStruct((1, *info.image_shape), jnp.float32)
  expected = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(expected, sep="/").items()}
  have = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
  problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
  problems += [f"{k}: checkpoint {have[k]} vs model {want[k]}"
               for k in sorted(set(want) & set(have)) if want[k] != have[k]]
  if problems:
    raise ValueError(f"teacher checkpoint {path} does not fit the model its config describes "
                     "(check teacher.model and the data's image size and classes):\n  "
                     + "\n  ".join(problems[:10]))
  return model, jax.tree.map(lambda x: jnp.asarray(x, model.param_dtype), params)
