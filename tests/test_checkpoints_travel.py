"""Checkpoints that travel: read on any device count, checked by checksums, saves that fail
loudly, and readable with plain orbax."""
import errno
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import quickstart
from tests.test_train_loop import override
from vitoken import errors
from vitoken.engine import checkpoint as ckpt_lib, checksums, sharding
from vitoken.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**overrides):
  c = quickstart.get_config("runlocal")
  c.progress_bar = False
  c.checkpoint.async_save = False
  c.log_every_steps = 2
  c.total_steps = 4
  c.eval_every_steps = 4
  c.checkpoint.every_steps = 4
  return override(c, **overrides)


def run_python(code: str, devices: int, timeout: int = 300) -> str:
  """Runs `code` in a fresh interpreter that sees `devices` CPU devices; returns its stdout."""
  prelude = (f"import jax\njax.config.update('jax_num_cpu_devices', {devices})\n"
             "jax.config.update('jax_compilation_cache_dir', "
             f"{os.path.expanduser('~/.cache/vitoken/jax-test-cache')!r})\n")
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  done = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


# ---- checksums -----------------------------------------------------------------------------
def numpy_digest(x: np.ndarray) -> str:
  """The checksum written out again in numpy, flat and on the host: an independent reference
  for the sharded, index-by-iota version."""
  x = np.ascontiguousarray(x)
  if x.dtype == np.bool_:
    words = x.astype(np.uint32).ravel()
  else:
    words = x.ravel().view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])
    words = words.astype(np.uint32)
  index = np.arange(words.size, dtype=np.uint64)
  m = 0xFFFFFFFF
  a = ((words.astype(np.uint64) ^ ((index * 0x9E3779B9) & m)) * 0x85EBCA6B) & m
  a ^= a >> 15
  b = ((a ^ (a >> 13)) * 0xC2B2AE35) & m
  b ^= b >> 16
  return f"{int(a.sum()) & m:08x}{int(b.sum()) & m:08x}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32", "uint8", "bool"])
def test_checksums_match_a_numpy_reference_on_any_sharding(dtype):
  rng = np.random.RandomState(0)
  value = jnp.asarray(rng.randn(16, 12, 6) * 100).astype(dtype)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  placed = {
      "one_device": value,
      "sharded": jax.device_put(value, jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec("fsdp", "data"))),
      "host": np.asarray(value),
  }
  want = numpy_digest(np.asarray(value))
  assert checksums.of_tree(placed) == {k: want for k in placed}


def test_checksums_change_with_any_flipped_bit_or_moved_value():
  value = np.random.RandomState(1).randn(64, 8).astype(np.float32)
  saved = checksums.of_tree({"w": value})
  flipped = value.copy()
  flipped.reshape(-1).view(np.uint8)[777] ^= 0x10
  swapped = value.copy()
  swapped[[3, 4]] = swapped[[4, 3]]
  assert checksums.mismatches({"w": flipped}, saved) and checksums.mismatches({"w": swapped}, saved)
  assert checksums.mismatches({"w": value}, saved) == {}


def flip_bytes(step_dir, count=64):
  """Inverts `count` bytes in the middle of the step's largest array data file (they decode,
  to wrong values)."""
  target = largest_data_file(step_dir)
  data = bytearray(open(target, "rb").read())
  middle = len(data) // 2
  data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
  with open(target, "wb") as f:
    f.write(bytes(data))
  return target


def test_flipped_bytes_in_params_fail_their_checksum(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), every_steps=1, keep=1,
                               async_save=False)
  params = {"w": jax.random.normal(jax.random.key(0), (256, 64))}  # incompressible
  ckpt.save(1, {"step": jnp.int32(1), "params": params}, None, {"step": 1}, force=True)
  ckpt.close()
  assert np.array_equal(ckpt_lib.load_params(str(tmp_path))["w"], params["w"])
  flip_bytes(tmp_path / "checkpoints" / "1")
  with pytest.raises(ckpt_lib.CheckpointCorrupt,
                     match=r"checksum mismatch in \S+checkpoints/1/state: params/w restored with "
                           r"values other than those saved"):
    ckpt_lib.load_params(str(tmp_path))


def largest_data_file(step_dir):
  files = [os.path.join(r, n) for r, _, ns in os.walk(os.path.join(step_dir, "state"))
           for n in ns if os.sep + "d" + os.sep in os.path.join(r, n)]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage,cause", [
    ("truncate", r"a data file is truncated \(array \S+ in \S+/8/state/?\)"),
    # Flipped bytes of raw data decode to wrong values, of a compressed chunk fail to decode;
    # which array lies mid-file depends on the order of orbax's writes.
    ("flip", r"(?:checksum mismatch in \S+/8/state: \S+ restored with values other than those "
             r"saved \(a damaged data file\)|a file cannot be decoded \(array \S+ in \S+/8/state/?\))"),
])
def test_damaged_checkpoints_are_set_aside_in_one_line(tmp_path, caplog, damage, cause):
  workdir = tmp_path / "run"
  trainer.run(small_config(total_steps=8), str(workdir))
  if damage == "truncate":
    target = largest_data_file(workdir / "checkpoints" / "8")
    os.truncate(target, os.path.getsize(target) // 2)
  else:
    flip_bytes(workdir / "checkpoints" / "8")
  caplog.clear()
  summary = trainer.run(small_config(total_steps=8), str(workdir))
  assert summary["start_step"] == 4 and summary["steps_run"] == 4
  warnings = [r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage()]
  # One line, short but for the paths (no TensorStore spec dump).
  assert len(warnings) == 1 and "\n" not in warnings[0], warnings
  assert len(warnings[0].replace(str(workdir), "W")) < 300, warnings
  assert re.search(rf"step 8 is unreadable \({cause}\); moved to \S+/unreadable/8,", warnings[0]), \
      warnings[0]
  assert os.path.isdir(workdir / "checkpoints" / "unreadable" / "8")


# ---- saves that fail -----------------------------------------------------------------------
def test_failed_background_save_stops_the_run_with_its_cause(tmp_path, monkeypatch, caplog):
  """A save that fails in orbax's thread raises in the training thread at the next step, says
  why and how to fix it, and is never reported saved."""
  original = ocp.CheckpointManager.wait_until_finished

  def disk_full(self):
    original(self)
    if self.latest_step() == 4:
      raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", disk_full)
  with pytest.raises(ckpt_lib.CheckpointSaveError,
                     match=r"could not save the checkpoint at step 4 to .*checkpoints/4: the disk "
                           r"is full. Free space"):
    trainer.run(small_config(total_steps=8, **{"checkpoint.async_save": True}),
                str(tmp_path / "run"))
  assert not any("saved" in r.getMessage() for r in caplog.records)


def test_unwritable_checkpoints_folder_is_refused_before_training(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(trainer.Trainer, "_train_step", lambda *a: calls.append(a))
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  real_write = ckpt_lib.epath.Path.write_text

  def read_only(self, *args, **kwargs):
    if self.parent.name == "checkpoints":
      raise OSError(errno.EROFS, "Read-only file system", str(self))
    return real_write(self, *args, **kwargs)

  monkeypatch.setattr(ckpt_lib.epath.Path, "write_text", read_only)
  with pytest.raises(errors.StorageError, match=r"the checkpoints folder .*checkpoints is not "
                                                r"writable: it is on a read-only file system"):
    trainer.run(small_config(), str(tmp_path / "run"))
  assert calls == []


REAL_FILESYSTEMS = """
import errno, os, sys, time
import jax, jax.numpy as jnp
from vitoken.engine import checkpoint as ckpt_lib
from vitoken import errors
root = sys.argv[1]
try:
  ckpt_lib.Checkpointer(root + "/ro/checkpoints", every_steps=1, keep=2)
except errors.StorageError as e:
  print("READONLY", e)
ckpt = ckpt_lib.Checkpointer(root + "/full/checkpoints", every_steps=1, keep=2)
state = {"params": {"w": jax.random.normal(jax.random.key(0), (1024, 1024))}}
start = time.time()
try:
  ckpt.save(1, state, None, {"step": 1}, force=True)
  while True:
    ckpt.poll()
    time.sleep(0.05)
except ckpt_lib.CheckpointSaveError as e:
  print("FULL", round(time.time() - start, 1), e)
"""


def test_read_only_folder_and_full_disk_on_real_filesystems(tmp_path):
  """A read-only bind mount and a 1 MiB tmpfs, in a user namespace (no privileges needed)."""
  if shutil.which("unshare") is None or subprocess.run(
      ["unshare", "-rm", "true"], capture_output=True).returncode != 0:
    pytest.skip("no user namespaces here: the two tests above simulate the same failures")
  for d in ("ro_src/checkpoints", "ro", "full"):
    (tmp_path / d).mkdir(parents=True)
  script = tmp_path / "fs.py"
  script.write_text(REAL_FILESYSTEMS)
  shell = (f"mount --bind -o ro {tmp_path}/ro_src {tmp_path}/ro && "
           f"mount -t tmpfs -o size=1m tmpfs {tmp_path}/full && "
           f"{sys.executable} {script} {tmp_path}")
  env = dict(os.environ, PYTHONPATH=ROOT)
  done = subprocess.run(["unshare", "-rm", "sh", "-c", shell], capture_output=True, text=True,
                        env=env, timeout=120, cwd=ROOT)
  out = done.stdout
  assert re.search(r"READONLY the checkpoints folder \S+/ro/checkpoints is not writable: it is on "
                   r"a read-only file system", out), (out, done.stderr[-2000:])
  full = re.search(r"FULL ([\d.]+) could not save the checkpoint at step 1 to \S+: the disk is "
                   r"full", out)
  assert full and float(full.group(1)) < 20, (out, done.stderr[-2000:])


# ---- reading on any number of devices ------------------------------------------------------
@pytest.fixture(scope="module")
def runs_by_devices(tmp_path_factory):
  """The same 4-step run, written by 8 devices (params sharded fsdp=8) and by 1 device."""
  root = tmp_path_factory.mktemp("travel")
  trainer.run(small_config(**{"mesh": ml_collections.ConfigDict(
      {"data": 1, "fsdp": 8, "tensor": 1})}), str(root / "by8"))
  run_python(f"""
      from configs import quickstart
      from vitoken.train import trainer
      c = quickstart.get_config("runlocal")
      c.progress_bar, c.checkpoint.async_save, c.total_steps = False, False, 4
      c.eval_every_steps = c.checkpoint.every_steps = 4
      trainer.run(c, {str(root / 'by1')!r})
      """, devices=1)
  return root


LOAD_EVERYWHERE = """
import numpy as np, vitoken
from vitoken.engine import sharding
path, out = {path!r}, {out!r}
model, params, _ = vitoken.load(path)
mesh = sharding.make_mesh({{"data": 1, "fsdp": -1}})
_, sharded, _ = vitoken.load(path, mesh=mesh)
flat = lambda t: {{"/".join(str(k.key) for k in p): np.asarray(x)
                  for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}}
kernel = sharded["block_00"]["mlp"]["fc1"]["kernel"]
print("SHARDS", len(kernel.sharding.device_set), kernel.addressable_shards[0].data.shape)
np.savez(out + "_one.npz", **flat(params))
np.savez(out + "_mesh.npz", **flat(sharded))
"""


@pytest.mark.parametrize("written_by,read_by", [(8, 1), (8, 4), (1, 8)])
def test_vitoken_load_reads_any_device_count(runs_by_devices, tmp_path, written_by, read_by):
  path = runs_by_devices / f"by{written_by}"
  out = str(tmp_path / "loaded")
  printed = run_python(LOAD_EVERYWHERE.format(path=str(path), out=out), devices=read_by)
  fc1 = ckpt_lib.params_shapes(str(path))["block_00"]["mlp"]["fc1"]["kernel"].shape
  assert f"SHARDS {read_by} ({fc1[0] // read_by}, {fc1[1]})" in printed
  want = jax.tree_util.tree_flatten_with_path(ckpt_lib.load_params(str(path)))[0]
  want = {"/".join(str(k.key) for k in p): x for p, x in want}
  for kind in ("one", "mesh"):
    with np.load(f"{out}_{kind}.npz") as got:
      assert sorted(got.files) == sorted(want)
      worst = max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
      assert worst == 0.0, (kind, worst)


def test_init_from_reads_a_run_of_another_device_count(runs_by_devices, tmp_path):
  source = runs_by_devices / "by8"
  printed = run_python(f"""
      import numpy as np
      from configs import quickstart
      from vitoken.engine import checkpoint as ckpt_lib
      from vitoken.train import trainer
      c = quickstart.get_config("runlocal")
      c.progress_bar, c.init_from.path = False, {str(source)!r}
      t = trainer.Trainer(c, {str(tmp_path / 'finetune')!r})
      _, state = t.initial_state(None)
      want = ckpt_lib.load_params(c.init_from.path)
      diff = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), state["params"], want)
      print("MAXDIFF", max(jax.tree.leaves(diff)), len(jax.devices()))
      """, devices=4)
  assert "MAXDIFF 0.0 4" in printed


INIT_FROM_MEMORY = """
from configs import quickstart
from vitoken.train import trainer
c = quickstart.get_config("runlocal")
c.progress_bar = False
c.model, c.data.image_size = dict(variant="S/8"), 32
c.mesh.data = -1
c.init_from.path = {source!r}
t = trainer.Trainer(c, {workdir!r})
def status(key):
  return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts here
_, state = t.initial_state(None)
jax.block_until_ready(state)
print("PEAK", sum(x.nbytes for x in jax.tree.leaves(state["params"])), status("VmHWM:") - before)
"""


def test_init_from_on_a_data_parallel_mesh_reads_the_params_once(tmp_path):
  """A data-parallel fine-tune's start from another run (written data-parallel by 8 devices,
  as on a pod) takes no more host memory than a fresh start plus one copy of the params: not
  the source's optimizer state, nor a replica of it per device (which took 17 copies)."""
  source = tmp_path / "pretrained"
  run_python(f"""
      from configs import quickstart
      from vitoken.engine import sharding
      from vitoken.train import trainer
      c = quickstart.get_config("runlocal")
      c.model, c.data.image_size = dict(variant="S/8"), 32
      c.mesh.data = -1
      t = trainer.Trainer(c, {str(source)!r})
      state, _ = sharding.init_sharded(t._init_state, t.mesh, t.rules)
      t.checkpointer.save(1, state, None, t._meta(1), force=True)
      t.checkpointer.close()
      """, devices=8)
  peaks = {}
  for name, path in (("fresh", ""), ("init_from", str(source))):
    printed = run_python(INIT_FROM_MEMORY.format(source=path, workdir=str(tmp_path / name)),
                         devices=4)
    params_bytes, peaks[name] = map(int, re.search(r"PEAK (\d+) (\d+)", printed).groups())
  assert params_bytes > 80e6  # S/8: ~21.7M params, large against the process's other memory
  assert peaks["init_from"] < peaks["fresh"] + 1.5 * params_bytes, (params_bytes, peaks)


# ---- plain orbax ---------------------------------------------------------------------------
def test_the_readme_restores_a_checkpoint_with_plain_orbax(tmp_path):
  readme = open(os.path.join(ROOT, "README.md")).read()
  section = readme[readme.index("### Reading a checkpoint without vitoken"):]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  trainer.run(small_config(), str(tmp_path / "run"))
  code = code.replace("/path/to/workdir", str(tmp_path / "run"))
  namespace = {}
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  restored, want = namespace["params"], ckpt_lib.load_params(str(tmp_path / "run"))
  assert jax.tree.structure(restored) == jax.tree.structure(want)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(want)))
  assert namespace["step"] == 4


@pytest.mark.parametrize("disk", ["40m", "1m"])
def test_a_full_disk_reads_as_one_error_on_the_command_line(tmp_path, disk):
  """The whole output of `python -m vitoken.train` whose disk fills up at its first save: the
  run's description, evals, and one error line (no orbax or TensorStore dumps). On a disk that
  is full at once, every write fails and asyncio reports the ones orbax stopped waiting for."""
  if shutil.which("unshare") is None or subprocess.run(
      ["unshare", "-rm", "true"], capture_output=True).returncode != 0:
    pytest.skip("no user namespaces here: the tests above simulate the same failure")
  (tmp_path / "full").mkdir()
  train = (f"{sys.executable} -m vitoken.train --config=configs/quickstart.py:runlocal "
           f"--workdir={tmp_path}/full/run --config.progress_bar=False "
           "--config.model.width=512 --config.model.mlp_dim=2048 --config.model.num_heads=8")
  done = subprocess.run(
      ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size={disk} tmpfs {tmp_path}/full && {train}"],
      capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300, cwd=ROOT)
  lines = (done.stdout + done.stderr).strip().splitlines()
  assert done.returncode == 1 and len(lines) <= 6, lines
  assert re.fullmatch(r"error: could not save the checkpoint at step 4 to \S+/checkpoints/4: the "
                      r"disk is full\. Free space where \S+ lives \(or lower "
                      r"--config.checkpoint.keep\), then run again: training resumes from the "
                      r"last saved checkpoint", lines[-1]), lines


def test_unretrieved_failures_of_orbax_tasks_are_quiet_and_others_are_not(caplog):
  """What asyncio logs when it collects failed tasks no one awaited: orbax's write tasks (the
  save's failure is reported once, by the checkpointer) are dropped, anyone else's are kept."""
  import asyncio
  import gc
  import logging as std_logging

  from absl import logging as absl_logging

  from vitoken.engine import metrics
  namespace = {}
  exec(compile("async def write_fragment():\n  raise ValueError('No space left on device')\n",
               os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "serialization.py"),
               "exec"), namespace)  # pylint: disable=exec-used

  async def users_task():
    raise ValueError("the user's own failure")

  root, verbosity = std_logging.getLogger().level, absl_logging.get_verbosity()
  metrics.quiet_libraries(False)
  try:
    loop = asyncio.new_event_loop()
    tasks = [loop.create_task(c()) for c in (namespace["write_fragment"], users_task)]
    loop.run_until_complete(asyncio.wait(tasks))
    loop.close()
    caplog.clear()
    del tasks
    gc.collect()
  finally:
    metrics.quiet_libraries(True)
    std_logging.getLogger().setLevel(root)
    absl_logging.set_verbosity(verbosity)
  logged = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
  assert len(logged) == 1 and "users_task" in logged[0], logged
