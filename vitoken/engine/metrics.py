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
from __future__ import annotations

import io
import logging as std_logging
import itertools
import json
import math
import os
import re
import sys
import threading
import time
from typing import Any, Dict, List, Optional

from absl import logging
from etils import epath
import numpy as np
import tqdm
from tqdm import auto as tqdm_auto
from tqdm import notebook as tqdm_notebook

from vitoken import paths

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"

_RESERVED_KEYS = ("step", "split", "wall_time")
_NONFINITE_TO_STR = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_STR_TO_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")

# A progress bar in a log file (not a TTY) is one line rewritten with '\r'; redrawing it often
# only bloats the log, so it is throttled to about one update every this many seconds.
_NON_TTY_MIN_INTERVAL_S = 30.0
# Weight of the newest interval in the images/s moving average; steps are dispatched
# asynchronously, so single intervals are noisy while their average is right.
_RATE_SMOOTHING = 0.1


# ----------------------------------------------------------------------------- value conversion


def _to_python(value: Any, name: str) -> Any:
  """A metric value as a Python bool/int/float/str; numpy and 0-d jax arrays included."""
  if isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, np.generic):
    return value.item()
  if hasattr(value, "__array__") and hasattr(value, "shape"):
    # np.asarray copies a jax.Array to the host without importing jax here.
    array = np.asarray(value)
    if array.shape != ():
      # A (1,)- or (devices,)-shaped value usually means a missing mean/psum; fail loudly.
      raise ValueError(f"metric {name!r} must be a scalar, got an array of shape {array.shape}")
    return array.item()
  raise TypeError(f"metric {name!r} has unsupported type {type(value).__name__}")


def _encode_json_value(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return _NONFINITE_TO_STR[repr(value)]
  return value


def _to_json_tree(obj: Any, name: str = "summary") -> Any:
  """Recursively converts a summary (dicts/lists of scalars and arrays) to strict-JSON values."""
  if isinstance(obj, dict):
    return {str(k): _to_json_tree(v, f"{name}.{k}") for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_to_json_tree(v, f"{name}[{i}]") for i, v in enumerate(obj)]
  if obj is None:
    return None
  if hasattr(obj, "__array__") and hasattr(obj, "shape") and not isinstance(obj, np.generic):
    array = np.asarray(obj)
    if array.shape != ():
      return _to_json_tree(array.tolist(), name)
  return _encode_json_value(_to_python(obj, name))


def _decode_record(record: Dict[str, Any]) -> Dict[str, Any]:
  return {k: (_STR_TO_NONFINITE.get(v, v) if k != "split" and isinstance(v, str) else v)
          for k, v in record.items()}


def _atomic_write_text(path, text: str) -> None:
  """Writes so that readers (and crashes) never see a half-written file.

  Locally via tmp + fsync + rename; in a bucket one upload is already atomic (and a "rename"
  there is a copy and a delete).
  """
  path = epath.Path(path)
  data = text.encode("utf-8")
  if paths.is_remote(path):
    path.write_bytes(data)
    return
  tmp = path.parent / f"{path.name}.tmp.{os.getpid()}.{threading.get_ident()}"
  try:
    with tmp.open("wb") as f:
      f.write(data)
      f.flush()
      # Without the fsync a power loss right after the rename can leave an empty file.
      os.fsync(f.fileno())
    tmp.replace(path)
  finally:
    if tmp.exists():
      tmp.unlink()


# ----------------------------------------------------------------------------- JSONL


def read_jsonl(path) -> List[Dict[str, Any]]:
  """Reads a metrics.jsonl back to a list of dicts ("NaN"/"Infinity" strings become floats).

  A last line that does not parse is skipped: it is a record torn by a run killed mid-write.
  A bad line anywhere else is real corruption and raises ValueError.
  """
  records, _ = _read_jsonl_with_status(path)
  return records


def _read_jsonl_with_status(path: str):
  """(records, torn): torn is True when the file's tail was not a complete line."""
  text = epath.Path(path).read_bytes().decode("utf-8")
  lines = text.split("\n")
  # Text ending in "\n" leaves a final "" here; anything else there is an unterminated record.
  tail = lines.pop()
  records = []
  for lineno, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      records.append(_decode_record(json.loads(line)))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{lineno}: corrupt metrics record: {e}") from e
  torn = bool(tail.strip())
  if torn:
    try:
      # Killed between the record and its newline: the record itself is complete.
      records.append(_decode_record(json.loads(tail)))
    except json.JSONDecodeError:
      pass
  return records, torn


def _dump_record(record: Dict[str, Any]) -> str:
  # allow_nan=False guards the strict-JSON promise: non-finite floats must already be strings.
  return json.dumps(record, allow_nan=False, separators=(", ", ": "))


# ----------------------------------------------------------------------------- TensorBoard


class _BucketRecordFile:
  """An event file in a bucket for tensorboardX's RecordWriter: the bytes are kept in memory
  and each flush uploads them whole (objects cannot be appended to)."""

  def __init__(self, path: str):
    self._path = epath.Path(path)
    self._buffer = io.BytesIO()
    self._pending = True

  def write(self, data: bytes) -> None:
    self._buffer.write(data)
    self._pending = True

  def flush(self) -> None:
    if self._pending:
      self._path.write_bytes(self._buffer.getvalue())
      self._pending = False

  def close(self) -> None:
    self.flush()


class _BucketRecordFactory:
  """tensorboardX's hook for a URI prefix: its files go through epath like every other output."""

  def open(self, path: str) -> _BucketRecordFile:
    return _BucketRecordFile(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def _tensorboardx():
  """tensorboardX's event writer and protos, imported on first use (it imports torch when
  torch is installed, which takes seconds)."""
  from tensorboardX import event_file_writer, record_writer  # pylint: disable=import-outside-toplevel
  from tensorboardX.proto import event_pb2, summary_pb2  # pylint: disable=import-outside-toplevel
  for scheme in paths.URI_SCHEMES:
    if not isinstance(record_writer.REGISTERED_FACTORIES.get(scheme), _BucketRecordFactory):
      record_writer.register_writer_factory(scheme, _BucketRecordFactory())
  return event_file_writer, event_pb2, summary_pb2


class _EventFileWriter:
  """A new events.out.tfevents.* file in `logdir`, written synchronously by tensorboardX.

  (tensorboardX's SummaryWriter queues events for a background thread and its flush() does
  not wait for that queue, so a run killed right after a write could lose it.)
  """

  _seq = itertools.count()

  def __init__(self, logdir, *, purge_step: Optional[int] = None):
    event_file_writer, self._event_pb2, self._summary_pb2 = _tensorboardx()
    logdir = epath.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    # events.out.tfevents.{time}.{host}.{pid}.{seq}: the zero-padded sequence keeps files of
    # one process sorted by creation, the order TensorBoard reads them in (it matters for the
    # resume purge below).
    self._writer = event_file_writer.EventsWriter(
        os.fspath(logdir / "events"), filename_suffix=f".{os.getpid()}.{next(self._seq):04d}")
    if purge_step is not None:
      # TensorBoard drops already-loaded points at steps >= a SessionLog.START's step.
      self._writer.write_event(self._event_pb2.Event(
          wall_time=time.time(), step=purge_step,
          session_log=self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START)))

  def add_scalars(self, step: int, wall_time: float, scalars: Dict[str, float]) -> None:
    # simple_value is a float32; values beyond its range become +-inf, as in tf.summary.
    with np.errstate(over="ignore"):
      values = [self._summary_pb2.Summary.Value(tag=tag, simple_value=float(np.float32(value)))
                for tag, value in scalars.items()]
    self._writer.write_event(self._event_pb2.Event(
        wall_time=wall_time, step=step, summary=self._summary_pb2.Summary(value=values)))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


# ----------------------------------------------------------------------------- progress bar


def _format_postfix_value(value: Any) -> str:
  try:
    value = _to_python(value, "postfix")
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


def _progress_enabled(progress: bool, is_primary: bool) -> bool:
  if not (progress and is_primary):
    return False
  is_tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
  return is_tty or in_notebook() or not os.environ.get("CI")


def in_notebook() -> bool:
  """True inside a Jupyter/Colab kernel, where tqdm.auto picks the live widget bar."""
  return issubclass(tqdm_auto.tqdm, tqdm_notebook.tqdm)


def _make_bar(total: int, initial: int):
  if in_notebook():  # a live widget: it redraws in place, so short intervals are fine
    return tqdm_auto.tqdm(total=total, initial=initial, unit="step", mininterval=0.5,
                          smoothing=0.1)
  is_tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
  # Outside a terminal every redraw is a new log line: redraw rarely there.
  interval = 0.1 if is_tty else _NON_TTY_MIN_INTERVAL_S
  return tqdm.tqdm(total=total, initial=initial, unit="step", file=sys.stderr,
                   dynamic_ncols=is_tty, ascii=not is_tty, mininterval=interval,
                   maxinterval=max(10.0, interval), smoothing=0.1)


# ----------------------------------------------------------------------------- public API


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
    self._tb_writers: Dict[str, _EventFileWriter] = {}
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
    if _progress_enabled(progress, self.is_primary):
      self._bar = _make_bar(total=self.total_steps, initial=self.start_step)

  def _truncate_for_resume(self) -> str:
    """Drops records with step > start_step, and a torn tail that a later append would extend;
    returns the log's text as kept.

    Applied for start_step == 0 too: a run restarted from scratch redoes every step > 0.
    """
    path = epath.Path(self.metrics_path)
    if not path.exists():
      return ""
    records, torn = _read_jsonl_with_status(path)
    kept = [r for r in records if r.get("step", 0) <= self.start_step]
    text = "".join(_dump_record(_encode_record(r)) + "\n" for r in kept)
    if len(kept) != len(records) or torn:
      _atomic_write_text(path, text)
    return text

  def _tb_writer(self, split: str) -> _EventFileWriter:
    writer = self._tb_writers.get(split)
    if writer is None:
      # A resumed run purges the stale tail of the interrupted one (> start_step) in
      # TensorBoard, like in metrics.jsonl.
      writer = _EventFileWriter(self._dir / TENSORBOARD_DIR / split,
                                purge_step=self.start_step + 1 if self.start_step > 0 else None)
      self._tb_writers[split] = writer
    return writer

  def write(self, step: int, metrics: Dict[str, Any], *, split: str = "train") -> None:
    """Appends one record to metrics.jsonl and the split's TensorBoard run, then flushes."""
    if not self.is_primary:
      return
    if self._closed:
      raise RuntimeError("MetricLogger.write after close")
    if not _SPLIT_RE.match(split) or ".." in split.split("/"):
      raise ValueError(f"split must be a simple name like 'train' or 'eval/val', got {split!r}")
    step = int(step)
    values = {}
    for name, value in metrics.items():
      if not isinstance(name, str):
        raise TypeError(f"metric names must be strings, got {name!r}")
      if name in _RESERVED_KEYS:
        raise ValueError(f"metric name {name!r} is reserved in metrics.jsonl records")
      values[name] = _to_python(value, name)
    wall_time = time.time()
    record = {"step": step, "split": split, **values, "wall_time": wall_time}
    line = _dump_record(_encode_record(record)) + "\n"
    if self._jsonl is not None:
      self._jsonl.write(line)
      # flush() hands the line to the OS, which keeps it through a SIGKILL; fsync per step
      # would only add protection against power loss at a real cost on network filesystems.
      self._jsonl.flush()
    else:
      self._jsonl_text += line
      _atomic_write_text(self.metrics_path, self._jsonl_text)
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
          a = _RATE_SMOOTHING
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
          ", ".join(f"{k}={_format_postfix_value(v)}" for k, v in shown.items()), refresh=False)
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


def _encode_record(record: Dict[str, Any]) -> Dict[str, Any]:
  return {k: _encode_json_value(v) for k, v in record.items()}


def read_summary(workdir) -> Optional[Dict[str, Any]]:
  """{workdir}/summary.json, or None when the run has not finished yet."""
  path = epath.Path(workdir) / SUMMARY_FILE
  return json.loads(path.read_text()) if path.exists() else None


def write_summary(workdir, summary: Dict[str, Any]) -> str:
  """Writes {workdir}/summary.json atomically (numpy/jax scalars become numbers); its path."""
  directory = epath.Path(workdir)
  directory.mkdir(parents=True, exist_ok=True)
  path = os.fspath(directory / SUMMARY_FILE)
  text = json.dumps(_to_json_tree(summary), allow_nan=False, indent=2, sort_keys=False) + "\n"
  _atomic_write_text(path, text)
  return path


def quiet_libraries(verbose: bool) -> None:
  """vitoken's own INFO lines and every library's warnings; library INFO chatter (orbax,
  tfds, ...) only with --verbosity=1."""
  if verbose:
    logging.set_verbosity(logging.INFO)
    return
  logging.set_verbosity(logging.WARNING)  # the absl logger, which orbax and tfds write to
  std_logging.getLogger().setLevel(std_logging.WARNING)
  std_logging.getLogger("vitoken").setLevel(std_logging.INFO)
