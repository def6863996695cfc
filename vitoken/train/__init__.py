"""Config-driven training: `python -m vitoken.train` or `vitoken.train.run(config, workdir)`."""
from vitoken.train.trainer import run  # noqa: F401
