"""Tests for vitoken.engine.metrics: JSONL log, TensorBoard event files, summary, progress bar."""
import glob
import json
import math
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from vitoken.engine import metrics as M

# ----------------------------------------------------------------------------- independent reader
# Deliberately shares no code with the writer (tensorboardX): a bitwise CRC-32C, and the Event
# messages are parsed by the protobuf runtime from descriptors built here.


def _crc32c_bitwise(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
  return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_tfrecords(path):
  with open(path, "rb") as f:
    data = f.read()
  pos, records = 0, []
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    assert length_crc == _masked(_crc32c_bitwise(header)), "bad length CRC"
    payload = data[pos + 12:pos + 12 + length]
    assert len(payload) == length, "truncated record"
    (data_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
    assert data_crc == _masked(_crc32c_bitwise(payload)), "bad data CRC"
    records.append(payload)
    pos += 16 + length
  return records


def _event_class():
  from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
  F = descriptor_pb2.FieldDescriptorProto
  fdp = descriptor_pb2.FileDescriptorProto(name="vitoken_test_event.proto",
                                           package="vitoken_test", syntax="proto3")

  def message(name, fields):
    msg = fdp.message_type.add(name=name)
    for fname, number, ftype, label, type_name in fields:
      field = msg.field.add(name=fname, number=number, type=ftype, label=label)
      if type_name:
        field.type_name = type_name

  # Field numbers from tensorflow/core/util/event.proto and core/framework/summary.proto.
  opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
  message("Value", [("tag", 1, F.TYPE_STRING, opt, None),
                    ("simple_value", 2, F.TYPE_FLOAT, opt, None)])
  message("Summary", [("value", 1, F.TYPE_MESSAGE, rep, ".vitoken_test.Value")])
  message("SessionLog", [("status", 1, F.TYPE_INT32, opt, None)])
  message("Event", [("wall_time", 1, F.TYPE_DOUBLE, opt, None),
                    ("step", 2, F.TYPE_INT64, opt, None),
                    ("file_version", 3, F.TYPE_STRING, opt, None),
                    ("summary", 5, F.TYPE_MESSAGE, opt, ".vitoken_test.Summary"),
                    ("session_log", 7, F.TYPE_MESSAGE, opt, ".vitoken_test.SessionLog")])
  pool = descriptor_pool.DescriptorPool()
  pool.Add(fdp)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("vitoken_test.Event"))


def _decode_events(path):
  event_cls = _event_class()
  events = []
  for payload in _read_tfrecords(path):
    event = event_cls()
    event.ParseFromString(payload)
    events.append(event)
  return events


def _scalars_from_events(events):
  return [(v.tag, e.step, v.simple_value) for e in events if e.HasField("summary")
          for v in e.summary.value]


def _event_files(workdir, split):
  return sorted(glob.glob(os.path.join(workdir, "tensorboard", split, "events.out.tfevents.*")))


# ----------------------------------------------------------------------------- tests


def test_jsonl_content_and_order(tmp_path):
  wd = str(tmp_path)
  with M.MetricLogger(wd, total_steps=10, progress=False) as log:
    log.write(1, {"loss": 2.5, "lr": 1e-3})
    log.write(2, {"loss": 2.0})
    log.write(2, {"accuracy": 0.5}, split="eval")
  path = os.path.join(wd, "metrics.jsonl")
  with open(path) as f:
    lines = f.read().splitlines()
  assert len(lines) == 3
  first = json.loads(lines[0])
  assert list(first) == ["step", "split", "loss", "lr", "wall_time"]
  records = M.read_jsonl(path)
  assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (2, "train"), (2, "eval")]
  assert records[0]["loss"] == 2.5 and records[0]["lr"] == 1e-3
  assert records[2]["accuracy"] == 0.5
  assert all(isinstance(r["wall_time"], float) for r in records)
  assert records[0]["wall_time"] <= records[1]["wall_time"] <= records[2]["wall_time"]


def test_flushes_after_each_write(tmp_path):
  log = M.MetricLogger(str(tmp_path), total_steps=10, progress=False)
  log.write(1, {"loss": 1.0})
  # Read while the logger is still open: a killed run must not lose what was written.
  assert [r["step"] for r in M.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))] == [1]
  assert [s for s in _scalars_from_events(_decode_events(_event_files(tmp_path, "train")[0]))] \
      == [("loss", 1, 1.0)]
  log.close()


def test_numpy_and_jax_scalars_convert(tmp_path):
  wd = str(tmp_path)
  with M.MetricLogger(wd, total_steps=10, progress=False) as log:
    log.write(np.int64(3), {
        "np_f32": np.float32(0.25), "np_f64": np.float64(1.5), "np_i32": np.int32(7),
        "jax_f32": jnp.asarray(0.75, jnp.float32), "jax_bf16": jnp.asarray(2.0, jnp.bfloat16),
        "np_0d": np.array(4.0), "py_int": 5,
    })
  (record,) = M.read_jsonl(os.path.join(wd, "metrics.jsonl"))
  assert record["step"] == 3 and type(record["step"]) is int
  assert record["np_f32"] == 0.25 and record["np_f64"] == 1.5 and record["np_i32"] == 7
  assert record["jax_f32"] == 0.75 and record["jax_bf16"] == 2.0 and record["np_0d"] == 4.0
  assert record["py_int"] == 5


def test_rejects_non_scalar_and_reserved(tmp_path):
  with M.MetricLogger(str(tmp_path), total_steps=10, progress=False) as log:
    with pytest.raises(ValueError, match="shape"):
      log.write(1, {"loss": jnp.ones((2,))})
    with pytest.raises(ValueError, match="reserved"):
      log.write(1, {"step": 1.0})
    with pytest.raises(ValueError, match="split"):
      log.write(1, {"loss": 1.0}, split="../oops")


def test_nan_and_inf(tmp_path):
  wd = str(tmp_path)
  with M.MetricLogger(wd, total_steps=10, progress=False) as log:
    log.write(1, {"nan": float("nan"), "inf": np.float32(np.inf), "ninf": jnp.asarray(-jnp.inf),
                  "ok": 1.0})
  path = os.path.join(wd, "metrics.jsonl")
  with open(path) as f:
    line = f.read().strip()
  # Strict JSON: no bare NaN/Infinity tokens.
  strict = json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in JSONL"))
  assert strict["nan"] == "NaN" and strict["inf"] == "Infinity" and strict["ninf"] == "-Infinity"
  (record,) = M.read_jsonl(path)
  assert math.isnan(record["nan"]) and record["inf"] == math.inf and record["ninf"] == -math.inf
  scalars = {tag: v for tag, _, v in
             _scalars_from_events(_decode_events(_event_files(wd, "train")[0]))}
  assert math.isnan(scalars["nan"]) and scalars["inf"] == math.inf
  assert scalars["ninf"] == -math.inf and scalars["ok"] == 1.0


def test_resume_truncates_later_steps(tmp_path):
  wd = str(tmp_path)
  with M.MetricLogger(wd, total_steps=10, progress=False) as log:
    for step in range(1, 7):
      log.write(step, {"loss": float(step)})
    log.write(4, {"accuracy": 0.4}, split="eval")
    log.write(6, {"accuracy": 0.6}, split="eval")
  with M.MetricLogger(wd, total_steps=10, start_step=4, progress=False) as log:
    log.write(5, {"loss": 50.0})
  records = M.read_jsonl(os.path.join(wd, "metrics.jsonl"))
  assert [(r["step"], r["split"]) for r in records] == [
      (1, "train"), (2, "train"), (3, "train"), (4, "train"), (4, "eval"), (5, "train")]
  assert records[-1]["loss"] == 50.0
  # A new event file per run; the old one is left alone.
  files = _event_files(wd, "train")
  assert len(files) == 2
  new_events = _decode_events(files[1])
  assert new_events[0].file_version == "brain.Event:2"
  # Each file opens with SessionLog.START (status 1) at the session's first step, twice
  # (tensorboard.py says why): the resumed run's drops the stale steps > start_step.
  for path, first_step in zip(files, (1, 5)):
    events = _decode_events(path)
    assert [(e.step, e.session_log.status) for e in events[1:3]] == [(first_step, 1)] * 2
    assert sum(e.HasField("session_log") for e in events) == 2
  assert not glob.glob(os.path.join(wd, "*.tmp*"))


def test_torn_last_line(tmp_path):
  path = os.path.join(tmp_path, "metrics.jsonl")
  with open(path, "w") as f:
    f.write('{"step": 1, "split": "train", "loss": 1.0, "wall_time": 1.0}\n')
    f.write('{"step": 2, "split": "train", "loss": 0.5, "wall_time": 2.0}\n')
    f.write('{"step": 3, "split": "train", "lo')
  assert [r["step"] for r in M.read_jsonl(path)] == [1, 2]
  # A corrupt line that is not the last one is real corruption.
  with open(os.path.join(tmp_path, "bad.jsonl"), "w") as f:
    f.write('{"step": 1\n{"step": 2}\n')
  with pytest.raises(ValueError, match="corrupt"):
    M.read_jsonl(os.path.join(tmp_path, "bad.jsonl"))
  # A new logger must not append onto the torn fragment (which would corrupt the new record).
  with M.MetricLogger(str(tmp_path), total_steps=10, start_step=2, progress=False) as log:
    log.write(3, {"loss": 0.25})
  records = M.read_jsonl(path)
  assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 0.5), (3, 0.25)]


def test_non_primary_writes_nothing(tmp_path, capsys):
  wd = os.path.join(tmp_path, "run")
  log = M.MetricLogger(wd, total_steps=10, is_primary=False, progress=True, global_batch_size=8)
  log.write(1, {"loss": 1.0})
  log.progress(1, loss=1.0)
  log.close()
  assert not os.path.exists(wd)
  assert capsys.readouterr().err == ""
  # Not even on resume: only the primary may rewrite the shared log.
  os.makedirs(wd)
  path = os.path.join(wd, "metrics.jsonl")
  with open(path, "w") as f:
    f.write('{"step": 9, "split": "train", "wall_time": 1.0}\n')
  M.MetricLogger(wd, total_steps=10, start_step=2, is_primary=False).close()
  assert [r["step"] for r in M.read_jsonl(path)] == [9]
  assert os.listdir(wd) == ["metrics.jsonl"]


def test_tensorboard_scalars_decode(tmp_path):
  wd = str(tmp_path)
  written = []
  with M.MetricLogger(wd, total_steps=100, progress=False) as log:
    for step in (0, 1, 10, 300):
      metrics = {"loss": 1.0 / (step + 1), "lr": np.float32(step * 1e-4)}
      log.write(step, metrics)
      written += [(k, step, float(np.float32(v))) for k, v in metrics.items()]
    log.write(10, {"top1": jnp.asarray(0.125)}, split="eval")
  (train_file,) = _event_files(wd, "train")
  events = _decode_events(train_file)
  assert events[0].file_version == "brain.Event:2"
  assert _scalars_from_events(events) == written
  (eval_file,) = _event_files(wd, "eval")
  assert _scalars_from_events(_decode_events(eval_file)) == [("top1", 10, 0.125)]
  jsonl = M.read_jsonl(os.path.join(wd, "metrics.jsonl"))
  train_times = [r["wall_time"] for r in jsonl if r["split"] == "train"]
  assert [e.wall_time for e in events if e.HasField("summary")] == train_times


def test_tensorboard_event_accumulator(tmp_path):
  event_accumulator = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator")
  wd = str(tmp_path)
  with M.MetricLogger(wd, total_steps=10, progress=False) as log:
    for step in range(1, 7):
      log.write(step, {"loss": float(step)})
  with M.MetricLogger(wd, total_steps=10, start_step=4, progress=False) as log:
    for step in (5, 6):
      log.write(step, {"loss": 10.0 * step})
  acc = event_accumulator.EventAccumulator(os.path.join(wd, "tensorboard", "train"))
  acc.Reload()
  assert acc.Tags()["scalars"] == ["loss"]
  # Steps 5 and 6 of the interrupted run are purged by the SessionLog.START of the resumed one.
  # (This is the legacy accumulator; test_tensorboard_resume.py reads through the two loaders
  # TensorBoard itself uses.)
  assert [(s.step, s.value) for s in acc.Scalars("loss")] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0)]


def test_write_summary(tmp_path):
  wd = os.path.join(tmp_path, "new_dir")
  path = M.write_summary(wd, {
      "top1": jnp.asarray(0.8125), "steps": np.int64(100), "loss": np.float32(0.5),
      "nested": {"per_class": np.array([0.5, 1.0]), "diverged": float("nan")},
      "name": "vit_ti16",
  })
  assert path == os.path.join(wd, "summary.json")
  with open(path) as f:
    summary = json.load(f, parse_constant=lambda c: pytest.fail(f"bare {c} in summary"))
  assert summary == {"top1": 0.8125, "steps": 100, "loss": 0.5,
                     "nested": {"per_class": [0.5, 1.0], "diverged": "NaN"}, "name": "vit_ti16"}
  assert type(summary["steps"]) is int
  # Overwrites atomically and leaves no temporary file behind.
  M.write_summary(wd, {"top1": 0.9})
  with open(path) as f:
    assert json.load(f) == {"top1": 0.9}
  assert os.listdir(wd) == ["summary.json"]


def test_write_summary_failure_keeps_old_file(tmp_path):
  path = M.write_summary(str(tmp_path), {"top1": 0.5})
  with pytest.raises(TypeError):
    M.write_summary(str(tmp_path), {"bad": object()})
  with open(path) as f:
    assert json.load(f) == {"top1": 0.5}
  assert os.listdir(tmp_path) == ["summary.json"]


def test_progress_bar_enabled(tmp_path, capsys, monkeypatch):
  monkeypatch.delenv("CI", raising=False)
  log = M.MetricLogger(str(tmp_path), total_steps=20, start_step=5, progress=True,
                       global_batch_size=64)
  for step in range(6, 21):
    log.progress(step, loss=np.float32(0.123456), lr=jnp.asarray(3e-4))
  assert log.images_per_sec is not None and log.images_per_sec > 0
  log.close()
  err = capsys.readouterr().err
  assert "20/20" in err
  assert "loss=0.1235" in err and "lr=0.0003" in err and "img_s=" in err


def test_progress_bar_disabled(tmp_path, capsys, monkeypatch):
  log = M.MetricLogger(str(tmp_path), total_steps=20, progress=False, global_batch_size=8)
  for step in range(1, 5):
    log.progress(step, loss=1.0)
  log.close()
  # CI with a non-TTY stderr (capsys) disables the bar as well.
  monkeypatch.setenv("CI", "true")
  log = M.MetricLogger(str(tmp_path), total_steps=20, progress=True)
  log.progress(3, loss=1.0)
  log.close()
  assert capsys.readouterr().err == ""


def test_postfix_formatting():
  f = M._format_postfix_value
  assert f(0.123456) == "0.1235" and f(12345.6) == "12346" and f(7) == "7"
  assert f(np.float32(2.5)) == "2.5" and f(float("nan")) == "nan" and f("x") == "x"


def test_notebooks_get_the_live_tqdm_auto_bar(tmp_path, monkeypatch):
  """In a Jupyter/Colab kernel tqdm.auto is the widget bar: the logger uses it, redrawing often."""
  import tqdm.notebook

  from vitoken.engine import metrics as metrics_lib
  made = []

  class WidgetBar(tqdm.notebook.tqdm):
    def __init__(self, *args, **kwargs):
      made.append(kwargs)
      super().__init__(*args, disable=True, **kwargs)

  monkeypatch.setattr(metrics_lib.tqdm_auto, "tqdm", WidgetBar)
  assert metrics_lib.in_notebook()
  logger = metrics_lib.MetricLogger(str(tmp_path), total_steps=10, progress=True)
  logger.progress(3, loss=1.0)
  logger.close()
  assert len(made) == 1 and made[0]["mininterval"] <= 1.0 and "file" not in made[0]
  monkeypatch.undo()
  assert not metrics_lib.in_notebook()  # plain python (pytest) uses the terminal/log bar


def test_throughput_leaves_paused_time_out_of_windows_and_the_run():
  from vitoken.engine.metrics import Throughput
  now = [0.0]
  meter = Throughput(batch_size=10, clock=lambda: now[0])
  with meter.paused():  # compiling the first step
    now[0] += 5.0
  meter.count()
  now[0] += 1.0
  meter.count()
  now[0] += 1.0
  assert meter.read() == pytest.approx(2 * 10 / 2.0)  # 2 steps in 2 s, the 5 s left out
  meter.count()
  now[0] += 0.5
  with meter.paused():  # evaluation
    now[0] += 30.0
  assert meter.read() == pytest.approx(10 / 0.5)
  assert meter.overall == pytest.approx(3 * 10 / 2.5)
  assert meter.read() is None  # no step in the window
