"""python -m vitoken.train --config=configs/<file>.py[:arg] --workdir=DIR [--config.key=value ...]"""
from absl import app, flags

from vitoken import cli
from vitoken.engine import distributed, metrics
from vitoken.train import config as config_lib, trainer

_CONFIG = cli.DEFINE_config_file("config", "a config file with get_config(arg)",
                                  reference=config_lib.override_reference)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and summary.json go")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  distributed.maybe_initialize(config.distributed)  # before any device is touched
  metrics.quiet_libraries(flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= 1)
  summary = trainer.run(config, _WORKDIR.value)
  evals = {k: v for k, v in summary.items() if k.startswith("eval")}
  headline = summary["headline"]
  print("summary:", {f"{k}/{headline}": round(v[headline], 4) for k, v in evals.items()},
        f"train loss {summary['train'].get('loss', float('nan')):.4f},",
        f"{summary['wall_time_s']:.0f}s, {summary['images_per_s'] or 0:.0f} img/s")


if __name__ == "__main__":
  cli.run(main)
