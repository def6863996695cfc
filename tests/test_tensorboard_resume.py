"""A killed and resumed run, as TensorBoard shows it: each step once, with the resumed values.

Both of TensorBoard's loaders read one logdir holding every case. The full loader
(`--load_fast=false`) is the plugin_event_multiplexer that TensorBoard's LocalDataIngester
builds; it purges on SessionLog.START events. The fast loader (`--load_fast=true`) is the Rust
data server of the tensorboard-data-server package, started once through the ingester
TensorBoard uses; it ignores SessionLog and drops a tag's points at steps >= each new point.
"""
import os
import struct
import time

import pytest
from tensorboard import context
from tensorboard.backend.event_processing import (
  data_provider,
  event_file_loader,
  plugin_event_multiplexer,
)
from tensorboard.compat.proto import event_pb2
from tensorboard.data import server_ingester
from tensorboard.util import grpc_util

from vitoken.engine import metrics as M
from vitoken.engine.metrics import tensorboard as tb_writer

EVAL_EVERY = 4

# (start_step, steps logged, killed) per session, in order. Killed sessions are never closed.
CASES = {
    # Killed right after the checkpoint it resumes from: nothing stale, nothing to drop.
    "killed_at_checkpoint": [(0, range(1, 5), True), (4, range(5, 9), False)],
    # Killed at 9 and resumed from 4: steps 5..9 (and the eval at 8) are stale.
    "killed_past_checkpoint": [(0, range(1, 10), True), (4, range(5, 13), False)],
    # Killed twice (the first time mid-record: TORN), the second time before passing the first.
    "killed_twice": [(0, range(1, 10), True), (3, range(4, 8), True), (5, range(6, 11), False)],
    # Restarted from scratch in the same workdir: it redoes every step.
    "restarted_from_scratch": [(0, range(1, 9), True), (0, range(1, 6), False)],
}
TORN = ("killed_twice", 1)  # (case, session) whose train file ends in a torn record
# A workdir whose killed run wrote its event file before files began with SessionLog.START.
LEGACY = "legacy_file_resumed"
LEGACY_STEPS, LEGACY_RESUME = range(1, 9), (4, range(5, 11))


def _values(session: int, step: int):
  # Exact in float32: the loaders must return these bit for bit.
  base = 1000.0 * session + step
  train = {"loss": base, "lr": base + 0.25, "images_per_s": base + 0.5}
  return train, {"top1": base + 0.75}


def _tear_last_record(run_dir: str) -> None:
  """Appends half of a record (a copy of the last one's start): a write the kill cut short."""
  (name,) = [n for n in os.listdir(run_dir) if "tfevents" in n]
  path = os.path.join(run_dir, name)
  with open(path, "rb") as f:
    data = f.read()
  pos = last = 0
  while pos < len(data):
    last = pos
    pos += 16 + struct.unpack("<Q", data[pos:pos + 8])[0]
  with open(path, "ab") as f:
    f.write(data[last:last + (pos - last) // 2])


def _write_legacy_run(workdir: str, expected) -> None:
  """The killed run of LEGACY, written as before the fix: no SessionLog.START."""
  event_file_writer, tbx_event_pb2, tbx_summary_pb2 = tb_writer._tensorboardx()
  run_dir = os.path.join(workdir, "tensorboard", "train")
  os.makedirs(run_dir)
  writer = event_file_writer.EventsWriter(os.path.join(run_dir, "events"))
  for step in LEGACY_STEPS:
    train, _ = _values(1, step)
    summary = tbx_summary_pb2.Summary(
        value=[tbx_summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in train.items()])
    writer.write_event(tbx_event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
    for tag, value in train.items():
      expected[f"{LEGACY}/tensorboard/train"].setdefault(tag, {})[step] = value
  writer.close()
  # Older than anything the logger names, as the killed run's file would be.
  (name,) = os.listdir(run_dir)
  os.rename(os.path.join(run_dir, name),
            os.path.join(run_dir, "events.out.tfevents.0000000001.legacy"))


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
  """Every case's workdir under one root, and what TensorBoard must show for it:
  {run: {tag: [(step, value), ...]}} (a run is "{case}/tensorboard/{split}")."""
  root = str(tmp_path_factory.mktemp("logdir"))
  expected = {}
  killed = []  # kept referenced so that nothing closes their files

  def session(case, number, start_step, steps, kill):
    runs = {split: expected.setdefault(f"{case}/tensorboard/{split}", {})
            for split in ("train", "eval")}
    for series in (s for run in runs.values() for s in run.values()):
      for step in [s for s in series if s > start_step]:
        del series[step]
    log = M.MetricLogger(os.path.join(root, case), total_steps=100, start_step=start_step,
                         progress=False)
    for step in steps:
      train, evaluation = _values(number, step)
      log.write(step, train)
      written = [("train", train)]
      if step % EVAL_EVERY == 0:
        log.write(step, evaluation, split="eval")
        written.append(("eval", evaluation))
      for split, values in written:
        for tag, value in values.items():
          runs[split].setdefault(tag, {})[step] = value
    if kill:
      killed.append(log)
    else:
      log.close()

  for case, sessions in CASES.items():
    for number, (start_step, steps, kill) in enumerate(sessions, start=1):
      session(case, number, start_step, steps, kill)
      if (case, number) == TORN:
        _tear_last_record(os.path.join(root, case, "tensorboard", "train"))
  expected[f"{LEGACY}/tensorboard/train"] = {}
  _write_legacy_run(os.path.join(root, LEGACY), expected)
  session(LEGACY, 2, LEGACY_RESUME[0], LEGACY_RESUME[1], False)
  yield root, {run: {tag: sorted(points.items()) for tag, points in tags.items()}
               for run, tags in expected.items() if tags}


def _full_loader(root):
  # As tensorboard's data_ingester.LocalDataIngester sets it up (purge_orphaned_data is the
  # default of --purge_orphaned_data).
  multiplexer = plugin_event_multiplexer.EventMultiplexer(purge_orphaned_data=True)
  multiplexer.AddRunsFromDirectory(root)
  multiplexer.Reload()
  return data_provider.MultiplexerDataProvider(multiplexer, root)


def _fast_loader(root, runs):
  try:
    binary = server_ingester.get_server_binary()
  except server_ingester.NoDataServerError as e:
    pytest.skip(f"no TensorBoard data server: {e}")
  # reload_interval=0 is `--reload=once`: one load cycle over files that are all written.
  ingester = server_ingester.SubprocessServerDataIngester(
      binary, root, reload_interval=0, channel_creds_type=grpc_util.ChannelCredsType.LOCAL)
  ingester.start()
  provider = ingester.data_provider
  # The server loads in the background and commits a run once all its files are read (or
  # every 5 s of reading, far more than these take).
  deadline = time.monotonic() + 15
  while set(_scalars(provider)) != runs:
    assert time.monotonic() < deadline, f"data server loaded only {sorted(_scalars(provider))}"
    time.sleep(0.05)
  return ingester, provider


def _scalars(provider):
  data = provider.read_scalars(context.RequestContext(), experiment_id="",
                               plugin_name="scalars", downsample=1000)
  return {run: {tag: [(p.step, p.value) for p in points] for tag, points in tags.items()}
          for run, tags in data.items() if tags}


@pytest.fixture(scope="module")
def loaders(logdir):
  root, expected = logdir
  ingester, fast = _fast_loader(root, set(expected))
  yield {"full": _full_loader(root), "fast": fast}
  # The server exits when its stdin closes (--die-after-stdin), at the latest with pytest.
  stdin = getattr(ingester, "_stdin_handle", None)
  if stdin is not None:
    stdin.close()


@pytest.mark.parametrize("loader", ["full", "fast"])
def test_each_step_once_with_the_resumed_values(logdir, loaders, loader):
  _, expected = logdir
  shown = _scalars(loaders[loader])
  assert set(shown) == set(expected)
  for run, tags in expected.items():
    assert shown[run] == tags, run


def test_every_fresh_file_starts_with_session_start(logdir):
  root, _ = logdir
  for case, sessions in CASES.items():
    for split in ("train", "eval"):
      run_dir = os.path.join(root, case, "tensorboard", split)
      starts = []
      for name in sorted(os.listdir(run_dir)):
        events = list(event_file_loader.EventFileLoader(os.path.join(run_dir, name)).Load())
        assert events[0].file_version == "brain.Event:2"
        session_logs = [e for e in events if e.HasField("session_log")]
        assert events[1:3] == session_logs
        assert all(e.session_log.status == event_pb2.SessionLog.START for e in session_logs)
        starts.append([e.step for e in session_logs])
      # One file per session, opened at the first step it logs (twice: tensorboard.py says why).
      assert starts == [[start_step + 1] * 2 for start_step, _, _ in sessions], (case, split)
