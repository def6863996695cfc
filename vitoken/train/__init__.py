"""Config-driven training: `python -m vitoken.train` or `vitoken.train.run(config, workdir)`."""


def run(config, workdir):
  """Trains per `config` in `workdir`, resuming from its checkpoints; returns the summary."""
  from vitoken.train import trainer  # pylint: disable=import-outside-toplevel
  return trainer.run(config, workdir)
