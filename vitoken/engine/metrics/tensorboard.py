"""TensorBoard event files through tensorboardX (no TensorFlow), locally or in a bucket."""
from __future__ import annotations

import io
import itertools
import os
import time
from typing import Dict

from etils import epath
import numpy as np

from vitoken import paths


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


class EventFileWriter:
  """A new events.out.tfevents.* file in `logdir`, written synchronously by tensorboardX.

  (tensorboardX's SummaryWriter queues events for a background thread and its flush() does
  not wait for that queue, so a run killed right after a write could lose it.)

  `first_step` is the first step this writer's session logs: the file opens with a
  SessionLog.START at that step, through which TensorBoard drops what earlier files hold at
  steps >= first_step (the steps a killed run wrote past the checkpoint this one resumed from).
  """

  _seq = itertools.count()

  def __init__(self, logdir, *, first_step: int):
    event_file_writer, self._event_pb2, self._summary_pb2 = _tensorboardx()
    logdir = epath.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    # events.out.tfevents.{time}.{host}.{pid}.{seq}: the zero-padded sequence keeps files of
    # one process sorted by creation, the order both TensorBoard loaders read a run's files in
    # (the purges below depend on it).
    self._writer = event_file_writer.EventsWriter(
        os.fspath(logdir / "events"), filename_suffix=f".{os.getpid()}.{next(self._seq):04d}")
    # The full loader (plugin_event_accumulator) purges at every START except a run's first,
    # which it takes for the run's beginning. Files written before this writer began each with
    # a START (or by other writers) have none, and a single START here would then be that
    # "first" one and purge nothing; the second one purges in that case, and repeats the first
    # one's purge otherwise. (The fast loader ignores SessionLog: it drops a tag's points at
    # steps >= each point it reads, which needs nothing from the writer.)
    for _ in range(2):
      self._writer.write_event(self._event_pb2.Event(
          wall_time=time.time(), step=int(first_step),
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
