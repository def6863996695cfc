"""`MetricLogger`: one call per logged step writes metrics.jsonl, TensorBoard and the bar."""
from __future__ import annotations

import logging as std_logging
import os
import sys
import time
from typing import Any, Dict, Optional

from absl import logging
from etils import epath

from vitoken import paths
from vitoken.engine.metrics.progress import (
  RATE_SMOOTHING,
  format_postfix_value,
  make_bar,
  progress_enabled,
)
from vitoken.engine.metrics.records import (
  METRICS_FILE,
  RESERVED_KEYS,
  SPLIT_RE,
  TENSORBOARD_DIR,
  atomic_write_text,
  dump_record,
  encode_record,
  read_jsonl_with_status,
  to_python,
)
from vitoken.engine.metrics.tensorboard import EventFileWriter


class MetricLogger:
  """Writes metrics to {workdir}/metrics.jsonl and TensorBoard, and drives a progress bar.

  Only the primary process writes; on the others every method is a no-op, so the trainer can
  call it unconditionally. `start_step > 0` marks a resumed run: logged records past that step
  are dropped, since the resumed run redoes those steps.
  """

  def __init__(self, workdir, *, total_steps: int, start_step: int = 0,
               is_primary: bool = True, progress: bool = True,
               global_batch_size: Optional[int] = None):
    self.workdir = workdir
    self.total_steps = int(total_steps)
    self.start_step = int(start_step)
    self.is_primary = bool(is_primary)
    self.global_batch_size = global_batch_size
    self._dir = epath.Path(workdir)
    self.metrics_path = os.fspath(self._dir / METRICS_FILE)
    # In a bucket the log is rewritten whole at each write: this holds its text.
    self._jsonl_text: Optional[str] = None
    self._tb_writers: Dict[str, EventFileWriter] = {}
    self._jsonl = None
    self._bar = None
    self._closed = False
    self._last_progress = None  # (step, time.perf_counter()) of the previous progress call
    self._ema_steps = None
    self._ema_seconds = None
    if not self.is_primary:
      return
    self._dir.mkdir(parents=True, exist_ok=True)
    kept = self._truncate_for_resume()
    if paths.is_remote(self._dir):
      self._jsonl_text = kept
    else:
      self._jsonl = epath.Path(self.metrics_path).open("a")
    if progress_enabled(progress, self.is_primary):
      self._bar = make_bar(total=self.total_steps, initial=self.start_step)

  def _truncate_for_resume(self) -> str:
    """Drops records with step > start_step, and a torn tail that a later append would extend;
    returns the log's text as kept.

    Applied for start_step == 0 too: a run restarted from scratch redoes every step > 0.
    """
    path = epath.Path(self.metrics_path)
    if not path.exists():
      return ""
    records, torn = read_jsonl_with_status(path)
    kept = [r for r in records if r.get("step", 0) <= self.start_step]
    text = "".join(dump_record(encode_record(r)) + "\n" for r in kept)
    if len(kept) != len(records) or torn:
      atomic_write_text(path, text)
    return text

  def _tb_writer(self, split: str) -> EventFileWriter:
    writer = self._tb_writers.get(split)
    if writer is None:
      # The session logs steps > start_step: TensorBoard drops what earlier sessions wrote
      # there, as _truncate_for_resume does in metrics.jsonl (a fresh run too: it may be a
      # restart from scratch in an old workdir).
      writer = EventFileWriter(self._dir / TENSORBOARD_DIR / split,
                               first_step=self.start_step + 1)
      self._tb_writers[split] = writer
    return writer

  def write(self, step: int, metrics: Dict[str, Any], *, split: str = "train") -> None:
    """Appends one record to metrics.jsonl and the split's TensorBoard run, then flushes."""
    if not self.is_primary:
      return
    if self._closed:
      raise RuntimeError("MetricLogger.write after close")
    if not SPLIT_RE.match(split) or ".." in split.split("/"):
      raise ValueError(f"split must be a simple name like 'train' or 'eval/val', got {split!r}")
    step = int(step)
    values = {}
    for name, value in metrics.items():
      if not isinstance(name, str):
        raise TypeError(f"metric names must be strings, got {name!r}")
      if name in RESERVED_KEYS:
        raise ValueError(f"metric name {name!r} is reserved in metrics.jsonl records")
      values[name] = to_python(value, name)
    wall_time = time.time()
    record = {"step": step, "split": split, **values, "wall_time": wall_time}
    line = dump_record(encode_record(record)) + "\n"
    if self._jsonl is not None:
      self._jsonl.write(line)
      # flush() hands the line to the OS, which keeps it through a SIGKILL; fsync per step
      # would only add protection against power loss at a real cost on network filesystems.
      self._jsonl.flush()
    else:
      self._jsonl_text += line
      atomic_write_text(self.metrics_path, self._jsonl_text)
    scalars = {k: float(v) for k, v in values.items() if isinstance(v, (bool, int, float))}
    if scalars:
      writer = self._tb_writer(split)
      writer.add_scalars(step, wall_time, scalars)
      writer.flush()

  @property
  def images_per_sec(self) -> Optional[float]:
    """Smoothed throughput from the progress calls (needs global_batch_size), else None."""
    if self.global_batch_size is None or not self._ema_seconds:
      return None
    return self.global_batch_size * self._ema_steps / self._ema_seconds

  def _update_rate(self, step: int) -> None:
    now = time.perf_counter()
    if self._last_progress is not None:
      steps, seconds = step - self._last_progress[0], now - self._last_progress[1]
      if steps > 0 and seconds > 0:
        if self._ema_seconds is None:
          self._ema_steps, self._ema_seconds = float(steps), seconds
        else:
          a = RATE_SMOOTHING
          self._ema_steps = (1 - a) * self._ema_steps + a * steps
          self._ema_seconds = (1 - a) * self._ema_seconds + a * seconds
    # The first call only sets the baseline: the interval before it contains compilation.
    self._last_progress = (step, now)

  def progress(self, step: int, **postfix) -> None:
    """Advances the bar to `step`; postfix values (loss=..., ...) are shown compactly."""
    step = int(step)
    if self.global_batch_size is not None:
      self._update_rate(step)
    if self._bar is None:
      return
    shown = {}
    rate = self.images_per_sec
    if rate is not None:
      shown["img_s"] = rate
    shown.update(postfix)
    if shown:
      # refresh=False: a redraw here would bypass mininterval and flood non-TTY logs.
      self._bar.set_postfix_str(
          ", ".join(f"{k}={format_postfix_value(v)}" for k, v in shown.items()), refresh=False)
    delta = step - self._bar.n
    if delta > 0:
      self._bar.update(delta)

  def close(self) -> None:
    """Closes the bar and files; safe to call twice."""
    if self._closed:
      return
    self._closed = True
    if self._bar is not None:
      self._bar.close()
    if self._jsonl is not None:
      self._jsonl.close()
    for writer in self._tb_writers.values():
      writer.close()

  def __enter__(self) -> "MetricLogger":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class _WithoutOrbax(std_logging.Filter):
  """Drops orbax's records: vitoken reports every checkpoint failure itself, in one line
  (orbax logs a failed save's traceback once per thread, ~200 lines)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return f"{os.sep}orbax{os.sep}" not in record.pathname


_ORBAX_FILTER = _WithoutOrbax()


class _WithoutOrbaxTasks(std_logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" for orbax's write tasks: when one
  write fails (a full disk), orbax stops waiting for the others, and asyncio logs each of
  their failures with a traceback when it collects them, sometimes after the one-line error."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return f"{os.sep}orbax{os.sep}" not in record.getMessage()


_ORBAX_TASKS_FILTER = _WithoutOrbaxTasks()


def _unraisablehook_without_closed_loops(hook):
  """After a save fails, orbax closes its event loop and TensorStore reports every write still
  pending as an unraisable "Event loop is closed" (hundreds of traceback lines); the failure
  itself is reported once, by the checkpointer."""

  def unraisablehook(unraisable):
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
      hook(unraisable)

  unraisablehook.quiet_closed_loops = True
  return unraisablehook


def quiet_libraries(verbose: bool) -> None:
  """vitoken's own INFO lines and every library's warnings, but none of orbax's; library INFO
  chatter (orbax, tfds, ...) and orbax's own logs only with --verbosity=1."""
  absl_logger = std_logging.getLogger("absl")  # the one orbax and tfds write to
  if verbose:
    logging.set_verbosity(logging.INFO)
    absl_logger.removeFilter(_ORBAX_FILTER)
    std_logging.getLogger("asyncio").removeFilter(_ORBAX_TASKS_FILTER)
    return
  logging.set_verbosity(logging.WARNING)
  absl_logger.addFilter(_ORBAX_FILTER)
  std_logging.getLogger("asyncio").addFilter(_ORBAX_TASKS_FILTER)
  if not getattr(sys.unraisablehook, "quiet_closed_loops", False):
    sys.unraisablehook = _unraisablehook_without_closed_loops(sys.unraisablehook)
  std_logging.getLogger().setLevel(std_logging.WARNING)
  std_logging.getLogger("vitoken").setLevel(std_logging.INFO)
