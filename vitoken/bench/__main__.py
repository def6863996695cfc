"""python -m vitoken.bench --config=configs/bench.py[:arg] [--config.batch_sizes=(256,512) ...]"""
from absl import app, flags
from ml_collections import config_flags

from vitoken import bench
from vitoken.engine.metrics import quiet_libraries

_CONFIG = config_flags.DEFINE_config_file("config", None, "a bench config with get_config(arg)",
                                          lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_libraries(False)
  rows, meta = bench.run(_CONFIG.value)
  print(bench.markdown(rows))
  print({k: v for k, v in meta.items() if k != "flops"})


if __name__ == "__main__":
  app.run(main)
