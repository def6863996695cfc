"""Multi-host start-up (TPU, SLURM, MPI, flags), a second "process 0" on one workdir,
topology-aware and multi-slice meshes, and identical input rows for replicas across a
model-parallel axis (two real processes)."""
import os
import time

import jax
import ml_collections
import numpy as np
import pytest

from tests.test_train_loop import smoke_config
from tests.test_train_processes import _env, _losses, _train
from vitoken.engine import distributed, sharding
from vitoken.train import trainer


@pytest.mark.parametrize("env,want", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "coordinator"),
    ({"TPU_WORKER_HOSTNAMES": "t1k-0,t1k-1,t1k-2,t1k-3"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # a single-host TPU VM
    ({"MEGASCALE_COORDINATOR_ADDRESS": "host:8080"}, "tpu"),
    ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "4"}, "slurm"),
    ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "1"}, None),  # one task: nothing to join
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "mpi"),
])
def test_cluster_environments_are_detected(env, want):
  assert distributed.detect_cluster(env) == want


@pytest.mark.parametrize("settings,env,want_call", [
    ({"initialize": "auto"}, {}, None),
    ({"initialize": "auto"}, {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"}, {}),
    ({"initialize": "auto"}, {"TPU_WORKER_HOSTNAMES": "a,b"}, {}),
    ({"initialize": "auto", "coordinator_address": "h:1", "num_processes": 2, "process_id": 1}, {},
     {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}),
    ({"initialize": True}, {}, {}),
    ({"initialize": False}, {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"}, None),
])
def test_initialize_is_called_when_asked_or_detected(monkeypatch, settings, env, want_call):
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  cfg = ml_collections.ConfigDict({"initialize": "auto", "coordinator_address": "",
                                   "num_processes": 0, "process_id": -1, **settings})
  distributed.maybe_initialize(cfg, environ=env)
  assert calls == ([] if want_call is None else [want_call])


def test_bad_initialize_mode_is_named():
  with pytest.raises(ValueError, match="distributed.initialize must be 'auto', True or False"):
    distributed.maybe_initialize({"initialize": "sometimes"}, environ={})


def test_a_second_process_zero_on_one_workdir_is_stopped(tmp_path):
  first = distributed.PrimaryClaim(tmp_path, heartbeat_s=0.05)
  second = distributed.PrimaryClaim(tmp_path, heartbeat_s=0.05)
  try:
    with pytest.raises(distributed.DuplicatePrimaryError,
                       match=f"another process that is also process 0 .*{first.owner}.*this is "
                             f"{second.owner}.*coordinator_address"):
      second.check()
    first.release()
    second.check()  # the first run ended: its marker is gone
    # A killed run: its marker stays but its heartbeat stops, so it does not block.
    killed = distributed.PrimaryClaim(tmp_path, heartbeat_s=0.05)
    killed._stop.set()
    killed._thread.join()
    second.check()
    # A marker of a process of this host that no longer exists is ignored at once.
    ghost = tmp_path / ".primary" / "ghost"
    ghost.write_text(f"{second._host}:999999999:dead\n{time.time()}\n3600\n")
    waited = []
    second._sleep = waited.append
    second.check()
    assert waited == [pytest.approx(0.075)]  # only the killed run's marker was watched
  finally:
    second.release()


def test_markers_past_their_heartbeat_are_stale(tmp_path):
  now = [1000.0]
  old = distributed.PrimaryClaim(tmp_path, clock=lambda: now[0], heartbeat_s=3600)
  new = distributed.PrimaryClaim(tmp_path, clock=lambda: now[0], heartbeat_s=3600,
                                 sleep=lambda s: None)
  try:
    assert set(new.others()) == {old.owner}
    now[0] += 60
    new.beat()
    assert new.others() == {}
  finally:
    old.release()
    new.release()


def test_trainer_refuses_a_workdir_another_process_zero_writes(tmp_path):
  other = distributed.PrimaryClaim(tmp_path, heartbeat_s=0.2)
  try:
    with pytest.raises(distributed.DuplicatePrimaryError, match="also process 0"):
      trainer.run(smoke_config(), str(tmp_path))
  finally:
    other.release()
  assert trainer.run(smoke_config(total_steps=2), str(tmp_path))["final_step"] == 2
  assert list((tmp_path / ".primary").iterdir()) == []  # released


class FakeDevice:
  def __init__(self, i, slice_index):
    self.id, self.slice_index, self.process_index = i, slice_index, 0
    self.platform = self.device_kind = "cpu"


def test_multi_slice_mesh_puts_only_the_data_axis_across_slices():
  devices = [FakeDevice(i, i // 4) for i in range(8)]
  grid = sharding.device_grid({"data": 2, "tensor": 2, "slices": 2}, devices)
  assert grid.shape == (4, 1, 2)
  slice_of = np.vectorize(lambda d: d.slice_index)(grid)
  assert (slice_of[:2] == 0).all() and (slice_of[2:] == 1).all()  # tensor/fsdp stay in a slice
  assert sharding.device_grid({"data": -1, "slices": -1}, devices).shape == (8, 1, 1)
  with pytest.raises(ValueError, match="slices=4 but the devices form 2 slice"):
    sharding.device_grid({"data": -1, "slices": 4}, devices)
  with pytest.raises(ValueError, match="per slice needs 8 devices, each slice has 4"):
    sharding.device_grid({"data": 4, "tensor": 2, "slices": 2}, devices)


def test_single_process_feeds_the_whole_batch_on_any_mesh():
  for shape in ({"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}, {"tensor": 8}):
    mesh = sharding.make_mesh(shape)
    assert sharding.data_shard(sharding.batch_sharding(mesh), 32) == (0, 1)


def test_replicas_across_processes_feed_identical_rows(tmp_path):
  """Two processes, one device each, one tensor-parallel axis across them: both hold every
  batch row, so both must feed the same rows; the run then equals a one-process run."""
  port = 20000 + os.getpid() % 20000
  mesh = ["--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=2",
          "--config.total_steps=4", "--config.eval_every_steps=4", "--config.checkpoint.every_steps=4"]
  procs = [_train(tmp_path / "two", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                  "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
                  *mesh, env=_env(JAX_NUM_CPU_DEVICES="1")) for i in range(2)]
  one = _train(tmp_path / "one", *mesh, env=_env(JAX_NUM_CPU_DEVICES="2"))
  outs = [p.communicate(timeout=300)[0] for p in procs + [one]]
  assert all(p.returncode == 0 for p in procs + [one]), outs
  two, single = _losses(tmp_path / "two"), _losses(tmp_path / "one")
  assert sorted(two) == [1, 2, 3, 4]
  np.testing.assert_allclose([two[s] for s in sorted(two)], [single[s] for s in sorted(single)],
                             atol=1e-5)
