"""Resuming never restarts silently: only corrupt checkpoints are set aside; a checkpoint that
does not fit the run, or a failure that is not the checkpoint's, stops with a clear error."""
import errno
import json
import os

import numpy as np
import pytest

from tests.test_train_loop import smoke_config
from vitoken.engine import checkpoint as ckpt_lib
from vitoken.train import trainer


def _steps(workdir):
  return sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 8-step run (checkpoints 4 and 8) to copy for each case."""
  workdir = tmp_path_factory.mktemp("finished")
  trainer.run(smoke_config(total_steps=8), str(workdir))
  return workdir


@pytest.fixture
def workdir(finished, tmp_path):
  import shutil
  dst = tmp_path / "run"
  shutil.copytree(finished, dst)
  return dst


def test_changed_model_config_stops_naming_the_difference(workdir):
  with pytest.raises(ckpt_lib.CheckpointMismatch,
                     match=r"step 8 .* does not fit this run: the config's model differs from the "
                           r"checkpoint's: depth 3 vs 2 \(config vs checkpoint\).*missing "
                           r"params/block_02.*init_from"):
    trainer.run(smoke_config(**{"model.depth": 3}), str(workdir))
  assert _steps(workdir) == [4, 8] and not os.path.exists(workdir / "checkpoints" / "unreadable")


def test_a_setting_that_keeps_the_state_resumes(workdir):
  summary = trainer.run(smoke_config(**{"model.drop_path_rate": 0.1}), str(workdir))
  assert summary["start_step"] == 8 and summary["steps_run"] == 4


def test_different_process_count_stops(workdir):
  meta = workdir / "checkpoints" / "8" / "meta" / "metadata"
  record = json.loads(meta.read_text())
  assert record["process_count"] == 1
  record["process_count"] = 2
  meta.write_text(json.dumps(record))
  with pytest.raises(ckpt_lib.CheckpointMismatch,
                     match="step 8 .* was written by 2 processes, this run has 1"):
    trainer.run(smoke_config(), str(workdir))
  assert _steps(workdir) == [4, 8]


def test_checkpoints_record_their_format_and_a_newer_one_is_refused(workdir):
  meta = workdir / "checkpoints" / "8" / "meta" / "metadata"
  record = json.loads(meta.read_text())
  assert record["format_version"] == ckpt_lib.FORMAT_VERSION
  record["format_version"] = ckpt_lib.FORMAT_VERSION + 1
  meta.write_text(json.dumps(record))
  newer = rf"format {ckpt_lib.FORMAT_VERSION + 1}, written by a newer vitoken"
  with pytest.raises(ckpt_lib.CheckpointMismatch, match=rf"step 8 .* {newer}"):
    trainer.run(smoke_config(), str(workdir))
  with pytest.raises(ValueError, match=newer):
    ckpt_lib.load_run_config(str(workdir))
  del record["format_version"]  # written before the number was recorded: format 1
  meta.write_text(json.dumps(record))
  assert ckpt_lib.load_run_config(str(workdir)).total_steps == 8
  assert _steps(workdir) == [4, 8]


@pytest.mark.parametrize("error", [
    OSError(errno.EACCES, "Permission denied"),
    OSError(errno.ETIMEDOUT, "Connection timed out"),
    MemoryError("host out of memory"),
    RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.0GiB"),
], ids=["permission", "timeout", "memory", "device_oom"])
def test_failures_that_are_not_corruption_stop_and_leave_the_checkpoint(workdir, monkeypatch, error):
  def fail(*args, **kwargs):
    raise error
  monkeypatch.setattr(ckpt_lib.Checkpointer, "_restore_step", fail)
  with pytest.raises(ckpt_lib.CheckpointRestoreError,
                     match=r"could not restore the checkpoint at step 8 .* left in place"):
    trainer.run(smoke_config(), str(workdir))
  assert _steps(workdir) == [4, 8] and not os.path.exists(workdir / "checkpoints" / "unreadable")


def test_corruption_seen_by_another_process_is_set_aside_everywhere(workdir, monkeypatch, caplog):
  """Processes agree: one that reads step 8 fine still sets it aside when another cannot."""
  verdicts = []

  def agree(code):
    worst = max(code, ckpt_lib._CORRUPT if not verdicts else ckpt_lib._OK)
    verdicts.append((code, worst))
    return worst
  monkeypatch.setattr(ckpt_lib, "_agree", agree)
  summary = trainer.run(smoke_config(), str(workdir))
  assert summary["start_step"] == 4 and verdicts == [(ckpt_lib._OK, ckpt_lib._CORRUPT),
                                                      (ckpt_lib._OK, ckpt_lib._OK)]
  assert "checkpoint at step 8 is unreadable" in caplog.text


def test_a_failure_on_another_process_stops_this_one_too(workdir, monkeypatch):
  monkeypatch.setattr(ckpt_lib, "_agree", lambda code: ckpt_lib._FATAL)
  with pytest.raises(ckpt_lib.CheckpointRestoreError,
                     match="another process could not restore the checkpoint at step 8"):
    trainer.run(smoke_config(), str(workdir))
  assert _steps(workdir) == [4, 8]


def test_agreement_takes_the_worst_verdict_over_processes(monkeypatch):
  monkeypatch.setattr(ckpt_lib.jax, "process_count", lambda: 3)
  monkeypatch.setattr(ckpt_lib.multihost_utils, "process_allgather",
                      lambda x: np.asarray([ckpt_lib._OK, x, ckpt_lib._CORRUPT]))
  assert ckpt_lib._agree(ckpt_lib._OK) == ckpt_lib._CORRUPT
  assert ckpt_lib._agree(ckpt_lib._FATAL) == ckpt_lib._FATAL
