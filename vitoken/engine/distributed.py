"""Multi-host start-up: one `jax.distributed.initialize` for TPU pods, SLURM, MPI and explicit
flags, before anything touches a device.

`config.distributed.initialize`:
- "auto" (default): initialise when the environment is a multi-process cluster: explicit
  coordinator flags or JAX_COORDINATOR_ADDRESS, a TPU pod slice (several TPU workers or a
  multi-slice job), a SLURM job of several tasks, or an Open MPI job of several ranks. Then
  `jax.distributed.initialize()` reads the rest from the environment itself.
- True: always (jax must find the cluster, or the flags must name it); False: never.
"""
import logging
import os
import socket
import threading
import time
from typing import Optional
import uuid

from etils import epath
import jax

log = logging.getLogger(__name__)

_FALSE = (False, "false", "False", 0, "0")
_TRUE = (True, "true", "True", 1, "1")


def _count(value: Optional[str]) -> int:
  try:
    return int(value or 0)
  except ValueError:
    return 0


def detect_cluster(environ=None) -> Optional[str]:
  """The multi-process environment this process runs in, or None for a single process."""
  env = os.environ if environ is None else environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "coordinator"
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  if env.get("SLURM_JOB_ID") and _count(env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS")) > 1:
    return "slurm"
  if _count(env.get("OMPI_COMM_WORLD_SIZE")) > 1:
    return "mpi"
  return None


def maybe_initialize(dist_config, environ=None) -> Optional[str]:
  """Initialises jax.distributed when asked or when a cluster is detected; returns why (None:
  a single process)."""
  mode = dist_config.get("initialize", "auto")
  if mode in _FALSE:
    return None
  if mode not in _TRUE and mode != "auto":
    raise ValueError(f"distributed.initialize must be 'auto', True or False, got {mode!r}")
  address = dist_config.get("coordinator_address") or ""
  reason = "flags" if address else detect_cluster(environ)
  if mode == "auto" and reason is None:
    return None
  if jax.distributed.is_initialized():
    return reason or "already initialised"
  # Cross-process collectives on CPU need gloo; the option is ignored by GPU/TPU clients.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if address:
    kwargs["coordinator_address"] = address
  if dist_config.get("num_processes", 0) > 0:
    kwargs["num_processes"] = int(dist_config.num_processes)
  if dist_config.get("process_id", -1) >= 0:
    kwargs["process_id"] = int(dist_config.process_id)
  jax.distributed.initialize(**kwargs)
  log.info("multi-host run (%s): process %d of %d", reason or "forced", jax.process_index(),
           jax.process_count())
  return reason or "forced"


class DuplicatePrimaryError(RuntimeError):
  """Several processes that each believe they are process 0 share one workdir."""


class PrimaryClaim:
  """Process 0's claim on a workdir: a marker file with a heartbeat, so that a second "process
  0" (N processes started without multi-host initialisation) is stopped with an error.

  A marker counts as another live run only if its heartbeat advances while we watch (a killed
  run's never does) and, for a run on this host, its process still exists; so restarting a
  preempted or killed run in its workdir is never refused. The restarted run then removes the
  markers such runs left (`clear_dead`).
  """

  def __init__(self, workdir, *, heartbeat_s: float = 10.0, stale_s: float = 45.0, clock=None,
               sleep=None):
    self._clock = clock or time.time
    self._sleep = sleep or time.sleep
    self._host = socket.gethostname()
    self.owner = f"{self._host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    self.directory = epath.Path(workdir) / ".primary"
    self.path = self.directory / self.owner.replace(":", "_")
    self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
    self._stop = threading.Event()
    self.directory.mkdir(parents=True, exist_ok=True)
    self.beat()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def beat(self):
    self.path.write_text(f"{self.owner}\n{self._clock()}\n{self.heartbeat_s}\n")

  def _run(self):
    while not self._stop.wait(self.heartbeat_s):
      try:
        self.beat()
      except OSError as e:  # a storage hiccup must not kill training
        log.warning("could not refresh %s: %s", self.path, e)

  def _gone_from_this_host(self, owner: str) -> bool:
    host, pid = owner.split(":")[:2]
    if host != self._host:
      return False
    try:
      os.kill(int(pid), 0)
    except ProcessLookupError:
      return True
    except (PermissionError, ValueError):
      return False
    return False

  def others(self):
    """{owner: (last beat, heartbeat interval)} of fresh markers other than this one."""
    found = {}
    for marker in self.directory.iterdir():
      if marker.name == self.path.name:
        continue
      try:
        owner, beat, every = marker.read_text().split("\n")[:3]
        if self._clock() - float(beat) < self.stale_s and not self._gone_from_this_host(owner):
          found[owner] = (float(beat), float(every))
      except (OSError, ValueError):
        continue  # half-written or vanished: not evidence of a live run
    return found

  def dead_after_s(self, every: float) -> float:
    """How long a marker beating every `every` seconds must be silent to count as dead: well
    past `stale_s`, so that only a run that stopped (or hangs) is judged, never one whose beats
    are merely late."""
    return max(2 * self.stale_s, 10 * every)

  def clear_dead(self):
    """Removes the markers of runs proven to have ended: a process of this host that no longer
    exists, or a heartbeat silent for `dead_after_s`; returns their owners. A marker that is
    unreadable, or changes while it is judged, stays: nothing is proven about it."""
    removed = []
    for marker in self.directory.iterdir():
      if marker.name == self.path.name:
        continue
      try:
        text = marker.read_text()
        owner, beat, every = text.split("\n")[:3]
        silent = self._clock() - float(beat)
        if not (self._gone_from_this_host(owner) or silent >= self.dead_after_s(float(every))):
          continue
        # Read again just before removing it: a run that beat meanwhile is alive after all. (A
        # live run whose marker is removed anyway, one hung past dead_after_s, writes it again
        # at its next beat.)
        if marker.read_text() == text:
          marker.unlink()
          removed.append(owner)
      except (OSError, ValueError):
        continue
    if removed:
      log.info("removed the process-0 markers of ended runs from %s: %s", self.directory,
               ", ".join(removed))
    return removed

  def check(self):
    """Raises DuplicatePrimaryError if another live process 0 writes to this workdir; else
    removes the markers of ended runs."""
    suspects = self.others()
    if suspects:
      self._sleep(min(1.5 * max(every for _, every in suspects.values()), self.stale_s))
      now = self.others()
      live = sorted(o for o in now if o in suspects and now[o][0] != suspects[o][0])
      if live:
        raise DuplicatePrimaryError(
            f"another process that is also process 0 writes to this workdir ({', '.join(live)}; "
            f"this is {self.owner}): N processes started without multi-host initialisation each "
            "believe they are process 0. Start them as one multi-host run (TPU and SLURM are "
            "detected; else set --config.distributed.coordinator_address, num_processes and "
            "process_id), or give each run its own workdir")
    self.clear_dead()

  def release(self):
    self._stop.set()
    self._thread.join(timeout=5)
    try:
      self.path.unlink()
    except OSError:
      pass
