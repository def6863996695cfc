"""Metric logging for training runs: a JSONL log, TensorBoard event files, a progress bar.

Files under `workdir` (written by the primary process only):

  metrics.jsonl               one JSON object a line: {"step", "split", <metrics>, "wall_time"}
  tensorboard/{split}/events.out.tfevents.*   scalar summaries, one TensorBoard run per split
  summary.json                final results, written by `write_summary`

`workdir` is any path etils.epath takes: a local folder or a bucket (gs://, s3://, ...).
Objects in a bucket cannot be appended to, so there metrics.jsonl and each event file are
kept in memory and rewritten whole at each write (one upload; readers see the old or the new
object, never a torn one); locally they are appended to.

Non-finite floats are written as the JSON strings "NaN", "Infinity" and "-Infinity" rather
than Python's bare NaN/Infinity tokens (which jq, JavaScript and strict JSON parsers reject) or
null (which would hide whether a run diverged to inf or produced NaN). `read_jsonl` turns them
back into floats. In summary.json they stay strings for the same reason.

Event files are written by tensorboardX (no TensorFlow needed); TensorBoard itself is only
needed to view them.
"""
from vitoken.engine.metrics.logger import MetricLogger, quiet_libraries
from vitoken.engine.metrics.progress import (
                                            format_postfix_value,
                                            format_postfix_value as _format_postfix_value,
                                            in_notebook,
                                            tqdm_auto,
)
from vitoken.engine.metrics.records import (
                                            METRICS_FILE,
                                            SUMMARY_FILE,
                                            TENSORBOARD_DIR,
                                            read_jsonl,
                                            read_summary,
                                            write_summary,
)
from vitoken.engine.metrics.throughput import Throughput
