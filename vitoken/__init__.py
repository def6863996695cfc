"""vitoken: Vision Transformers that spend compute only on the tokens that matter."""

__version__ = "0.1.0"


def load(path, *, mesh=None, **model_overrides):
  """`module, params, config = vitoken.load(path)`: a trained run's model, rebuilt from the
  config saved with its checkpoint (see `vitoken.loading.load`)."""
  from vitoken import loading  # pylint: disable=import-outside-toplevel
  return loading.load(path, mesh=mesh, **model_overrides)
