"""python -m vitoken.tokenizers --config=configs/visual_tokenizer.py[:arg] --workdir=DIR"""
from absl import app, flags

from vitoken import cli, tokenizers
from vitoken.engine.metrics import quiet_libraries
from vitoken.train import config as config_lib

_CONFIG = cli.DEFINE_config_file("config", "a tokenizer config with get_config(arg)",
                                  reference=config_lib.override_reference)
_WORKDIR = flags.DEFINE_string("workdir", None, "where the tokenizer's checkpoint and summary go")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_libraries(flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= 1)
  summary = tokenizers.fit(_CONFIG.value, _WORKDIR.value)
  e = summary["eval"]
  print(f"tokenizer {summary['task']}: codebook usage {e['codebook_usage']:.1%}, perplexity "
        f"{e['perplexity']:.1f}, eval error {e['loss']:.4f}, {summary['wall_time_s']:.0f}s")


if __name__ == "__main__":
  cli.run(main)
