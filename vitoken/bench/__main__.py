"""python -m vitoken.bench --config=configs/bench.py[:arg] [--config.batch_sizes=(256,512) ...]"""
from absl import app, flags
import ml_collections

from vitoken import bench, cli
from vitoken.engine.metrics import quiet_libraries
from vitoken.models import vit


def _bench_reference():
  """Keys --config.<key> may set where configs/bench.py leaves them out: the ViT fields every
  variant shares (`model`), e.g. --config.model.token_reduction='{"method": "tome", "r": 8}'."""
  return ml_collections.ConfigDict({"model": dict.fromkeys(vit.option_names())})


_CONFIG = cli.DEFINE_config_file("config", "a bench config with get_config(arg)",
                                  reference=_bench_reference)
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_libraries(False)
  rows, meta = bench.run(_CONFIG.value)
  print(bench.markdown(rows))
  print({k: v for k, v in meta.items() if k != "flops"})


if __name__ == "__main__":
  cli.run(main)
