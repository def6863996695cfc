"""Training as users launch it: the CLI, killed with SIGKILL and resumed (the killed run's
process-0 marker cleaned up), and two processes forming one multi-host run over localhost (CPU
collectives)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from vitoken.engine import distributed
from vitoken.engine.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--config=configs/quickstart.py:runlocal", "--config.progress_bar=False",
         "--config.log_every_steps=1"]


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=ROOT, **extra)
  env.setdefault("JAX_PLATFORMS", "cpu")
  return env


def _train(workdir, *flags, env=None, **popen):
  cmd = [sys.executable, "-m", "vitoken.train", f"--workdir={workdir}", *SMOKE, *flags]
  return subprocess.Popen(cmd, cwd=ROOT, env=env or _env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **popen)


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if r["split"] == "train"}


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def test_cli_rejects_unknown_override(tmp_path):
  proc = _train(tmp_path, "--config.totl_steps=3")
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0 and "totl_steps" in out


def test_console_shows_vitoken_lines_and_library_chatter_only_when_verbose(tmp_path):
  quiet = _train(tmp_path / "quiet", "--config.total_steps=4")
  verbose = _train(tmp_path / "verbose", "--config.total_steps=4", "--verbosity=1")
  (out, _), (vout, _) = quiet.communicate(timeout=300), verbose.communicate(timeout=300)
  assert quiet.returncode == 0 and verbose.returncode == 0, out + vout
  for text in (out, vout):
    assert "task classification | ViT width 64 depth 2" in text and "eval at step 4: accuracy" in text
    assert "checkpoint at step 4 saved to" in text
  library = re.compile(r"\] .*(CheckpointManager|Load dataset info|Scheduling D2H)|"
                       r"(checkpoint_manager|dataset_info|async_checkpointer)\.py:\d+\]")
  assert not library.search(out), [l for l in out.splitlines() if library.search(l)][:3]
  assert len(out.splitlines()) < 15, out
  assert library.search(vout)


def test_sigkill_mid_training_then_resume_reproduces_losses(tmp_path):
  flags = ["--config.total_steps=30", "--config.checkpoint.every_steps=5",
           "--config.eval_every_steps=0", "--config.checkpoint.async_save=False"]
  full, killed = tmp_path / "full", tmp_path / "killed"
  t0 = time.time()
  reference = _train(full, *flags)
  victim = _train(killed, *flags)
  deadline = time.time() + 300
  while not any(s >= 10 for s in _steps(killed)):
    assert victim.poll() is None, victim.stdout.read()
    assert time.time() < deadline, "no checkpoint at step 10 within 300 s"
    time.sleep(0.2)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  killed_at = max(_losses(killed))
  assert killed_at < 30, "the run finished before it could be killed"
  saved = _steps(killed)
  out, _ = _train(killed, *flags).communicate(timeout=300)
  # A real resume: the rerun started at one of the victim's checkpoints (>= 10) and ran only
  # the remaining steps; a rerun from scratch would also end with 30 steps logged.
  rerun = json.load(open(killed / "summary.json"))
  start = rerun["start_step"]
  assert start >= 10 and start in saved and rerun["steps_run"] == 30 - start, (saved, rerun, out)
  assert re.search(rf"resumed from .*step {start}\b", out), out
  # The rerun removed the killed run's process-0 marker, and released its own.
  assert os.listdir(killed / ".primary") == []
  out_ref, _ = reference.communicate(timeout=300)
  assert reference.returncode == 0, out_ref
  want, got = _losses(full), _losses(killed)
  assert sorted(got) == list(range(1, 31))
  np.testing.assert_allclose([got[s] for s in range(1, 31)], [want[s] for s in range(1, 31)],
                             rtol=0, atol=1e-6)
  print(f"kill-and-resume test: killed after step {killed_at}, total {time.time() - t0:.1f}s")


_CLAIM = ("import sys, time; from vitoken.engine import distributed; "
          "distributed.PrimaryClaim(sys.argv[1], heartbeat_s=0.05); print('claimed', flush=True); "
          "time.sleep(600)")


def test_a_restarted_run_removes_only_the_process_zero_markers_of_ended_runs(tmp_path):
  killed, live = [subprocess.Popen([sys.executable, "-c", _CLAIM, str(tmp_path)], cwd=ROOT,
                                   env=_env(), stdout=subprocess.PIPE, text=True)
                  for _ in range(2)]
  markers = tmp_path / ".primary"
  try:
    for proc in (killed, live):
      assert proc.stdout.readline().strip() == "claimed"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    now = time.time()
    (markers / "silent").write_text(f"elsewhere:7:a\n{now - 3600}\n10.0\n")  # another host
    (markers / "recent").write_text(f"elsewhere:8:b\n{now - 60}\n10.0\n")  # late, not dead
    (markers / "half").write_text("elsewhere:9:c\n")  # being written: nothing proven
    restarted = distributed.PrimaryClaim(tmp_path, heartbeat_s=3600, sleep=lambda s: None)
    try:
      removed = restarted.clear_dead()
      assert sorted(o.split(":")[1] for o in removed) == sorted([str(killed.pid), "7"])

      def owners():
        return sorted(m.read_text().split("\n")[0].split(":")[1] for m in markers.iterdir())
      assert owners() == sorted([str(live.pid), str(os.getpid()), "8", "9"])
      # The live run's marker was kept; once it is killed too, the restart's own check (which
      # finds no other live process 0) removes it.
      live.send_signal(signal.SIGKILL)
      live.wait()
      restarted.check()
      assert owners() == sorted([str(os.getpid()), "8", "9"])
    finally:
      restarted.release()
  finally:
    for proc in (killed, live):
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_in_sync_and_write_one_checkpoint(tmp_path):
  port = _free_port()
  workdir = tmp_path / "multihost"
  procs = [
      _train(workdir, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
             "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
             "--config.total_steps=6", "--config.eval_every_steps=6",
             env=_env(JAX_NUM_CPU_DEVICES="2"))
      for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  # Both processes computed the same eval accuracy and train loss (wall times may differ).
  results = [re.search(r"^summary: (\{.*\}) train loss (\S+),", out, re.M) for out in outs]
  assert all(results), outs
  assert results[0].groups() == results[1].groups()
  summary = json.load(open(workdir / "summary.json"))
  assert summary["processes"] == 2 and summary["devices"] == 4
  assert _steps(workdir) == [4, 6]
  data_files = sorted(f for f in os.listdir(workdir / "checkpoints" / "6" / "data") if f.endswith(".json"))
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
  # One JSONL writer (the primary process): each step appears once.
  steps = [r["step"] for r in read_jsonl(str(workdir / "metrics.jsonl")) if r["split"] == "train"]
  assert steps == list(range(1, 7))
