"""The progress bar: tqdm in a terminal, the live widget in a notebook, rare redraws in a log."""
from __future__ import annotations

import math
import os
import sys
from typing import Any

import tqdm
from tqdm import auto as tqdm_auto, notebook as tqdm_notebook

from vitoken.engine.metrics.records import to_python

# A progress bar in a log file (not a TTY) is one line rewritten with '\r'; redrawing it often
# only bloats the log, so it is throttled to about one update every this many seconds.
_NON_TTY_MIN_INTERVAL_S = 30.0
# Weight of the newest interval in the images/s moving average; steps are dispatched
# asynchronously, so single intervals are noisy while their average is right.
RATE_SMOOTHING = 0.1


def format_postfix_value(value: Any) -> str:
  try:
    value = to_python(value, "postfix")
  except (TypeError, ValueError):
    return str(value)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return str(value)
  if isinstance(value, int):
    return str(value)
  if not math.isfinite(value):
    return str(value)
  if 1e4 <= abs(value) < 1e9:
    return f"{value:.0f}"  # throughputs: "12346" reads better than "1.235e+04"
  return f"{value:.4g}"


def progress_enabled(progress: bool, is_primary: bool) -> bool:
  if not (progress and is_primary):
    return False
  is_tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
  return is_tty or in_notebook() or not os.environ.get("CI")


def in_notebook() -> bool:
  """True inside a Jupyter/Colab kernel, where tqdm.auto picks the live widget bar."""
  return issubclass(tqdm_auto.tqdm, tqdm_notebook.tqdm)


def make_bar(total: int, initial: int):
  if in_notebook():  # a live widget: it redraws in place, so short intervals are fine
    return tqdm_auto.tqdm(total=total, initial=initial, unit="step", mininterval=0.5,
                          smoothing=0.1)
  is_tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
  # Outside a terminal every redraw is a new log line: redraw rarely there.
  interval = 0.1 if is_tty else _NON_TTY_MIN_INTERVAL_S
  return tqdm.tqdm(total=total, initial=initial, unit="step", file=sys.stderr,
                   dynamic_ncols=is_tty, ascii=not is_tty, mininterval=interval,
                   maxinterval=max(10.0, interval), smoothing=0.1)
