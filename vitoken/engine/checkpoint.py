"""Orbax checkpoints of the train state and the data iterator, and initialising from others'.

Layout of `{workdir}/checkpoints/{step}/`: `state` (params, optimizer, EMA; restored onto
whatever mesh the current run uses), `data` (each process's grain iterator state) and `meta`
(JSON: the config, the step and the process count). Every path here may be local or a bucket
(gs://...): files go through etils.epath, arrays through orbax's TensorStore.

Resuming never restarts silently. Only recognised corruption (a checkpoint whose files
cannot be read or decoded) is moved aside to `checkpoints/unreadable/` (never deleted), with
a message, and the previous one is used. A checkpoint that is fine but does not fit the run
(another model, another process count) and failures that are not the checkpoint's fault
(out of memory, a storage error) stop the run with an error naming the checkpoint, the cause
and the fix. All processes agree on the verdict before anything moves, so none waits on
another that failed.
"""
import errno
import io
import json
import logging
import os
import re
from typing import Optional

from etils import epath
import flax.traverse_util as traverse_util
import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from vitoken import convert, paths
from vitoken.models import layout

log = logging.getLogger(__name__)

# The layout above, numbered so that a reader can tell which it holds; CHANGELOG.md lists what
# each number means. Checkpoints written before the number was recorded are format 1.
FORMAT_VERSION = 1

class Checkpointer:
  """Saves every `every_steps` (and on demand), keeps `keep`, writes asynchronously."""

  def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True):
    self.directory = os.fspath(paths.resolve(directory))
    self._options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(int(every_steps), 1), max_to_keep=keep,
        enable_async_checkpointing=async_save, create=True)
    self._manager = self._open()

  def _open(self):
    return ocp.CheckpointManager(
        self.directory, options=self._options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def save(self, step: int, state, data_iterator, meta: dict, *, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**args), force=force)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def restore_latest(self, abstract_state, data_iterator, config=None):
    """(step, state) from the newest readable checkpoint, or (None, None) when there is none.

    `config` (the run's) lets a mismatch name the model settings that differ.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      code, result = _OK, None
      try:
        result = self._restore_step(step, abstract_state, data_iterator, config)
      except CheckpointMismatch as e:
        code, result = _FATAL, e
      except Exception as e:  # pylint: disable=broad-except
        code, result = (_CORRUPT if _is_corruption(e) else _FATAL), e
      verdict = _agree(code)
      if verdict == _FATAL:
        if code == _FATAL:
          if isinstance(result, CheckpointMismatch):
            raise result
          raise CheckpointRestoreError(
              f"could not restore the checkpoint at step {step} in {self.directory}: "
              f"{type(result).__name__}: {result}. It was left in place (this does not look like "
              "a corrupt checkpoint); fix the cause (memory, storage access) and run again") from result
        raise CheckpointRestoreError(f"another process could not restore the checkpoint at step "
                                     f"{step} in {self.directory}; see its log")
      if verdict == _CORRUPT:
        self._set_aside(step, result if code == _CORRUPT else RuntimeError("unreadable on another process"))
        continue
      return step, result
    return None, None

  def _restore_step(self, step, abstract_state, data_iterator, config):
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    check_format(meta, f"checkpoint at step {step} in {self.directory}", CheckpointMismatch)
    written_by = meta.get("process_count")
    if data_iterator is not None and written_by not in (None, jax.process_count()):
      raise CheckpointMismatch(
          f"checkpoint at step {step} in {self.directory} was written by {written_by} processes, "
          f"this run has {jax.process_count()}: each process resumes its own data position. "
          f"Resume with {written_by} processes, or start a new workdir with "
          f"--config.init_from.path={self.directory} (params only)")
    stored = self._manager.item_metadata(step)["state"]
    problems = _tree_differences(stored, abstract_state)
    if problems:
      changed = _model_differences(meta.get("config", {}), config)
      cause = (f"the config's model differs from the checkpoint's: {changed}" if changed
               else "its train state does not match this run's")
      raise CheckpointMismatch(
          f"checkpoint at step {step} in {self.directory} does not fit this run: {cause} "
          f"({'; '.join(problems[:5])}{'; ...' if len(problems) > 5 else ''}). Restore the "
          f"checkpoint's settings to resume, or use a new workdir with "
          f"--config.init_from.path={self.directory} to start from its params")
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._manager.restore(step, args=ocp.args.Composite(**args))["state"]

  def _set_aside(self, step: int, error: Exception):
    src = epath.Path(self.directory) / str(step)
    dst = epath.Path(self.directory) / "unreadable" / str(step)
    msg = (f"checkpoint at step {step} is unreadable ({type(error).__name__}: {error}); "
           f"moved to {dst}, falling back to the previous checkpoint")
    log.warning(msg)
    print(f"WARNING: {msg}", flush=True)
    multihost_utils.sync_global_devices(f"set_aside_{step}_before")
    if jax.process_index() == 0 and src.exists():
      if dst.exists():
        dst.rmtree()
      paths.move_tree(src, dst)
    multihost_utils.sync_global_devices(f"set_aside_{step}_after")
    self._manager.close()
    self._manager = self._open()

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


class CheckpointMismatch(ValueError):
  """A readable checkpoint that does not fit this run (model, process count)."""


class CheckpointRestoreError(RuntimeError):
  """Restoring failed for a reason that is not the checkpoint's corruption."""


_OK, _CORRUPT, _FATAL = 0, 1, 2


def _agree(code: int) -> int:
  """The worst verdict over all processes (each must call this once per checkpoint tried)."""
  if jax.process_count() == 1:
    return code
  return int(np.max(multihost_utils.process_allgather(np.int32(code))))


# Errors of the machine or storage rather than of the files' contents.
_TRANSIENT_ERRNOS = {errno.ENOMEM, errno.EACCES, errno.EPERM, errno.ETIMEDOUT, errno.ECONNRESET,
                     errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENOSPC,
                     errno.EAGAIN, errno.EBUSY}


def _is_corruption(error: BaseException) -> bool:
  """True for a checkpoint whose files are unreadable or undecodable, not for failures of the
  machine (out of memory) or the storage (permissions, network)."""
  for e in _chain(error):
    if isinstance(e, MemoryError):
      return False
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
      return False
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "PERMISSION_DENIED" in text \
        or "DEADLINE_EXCEEDED" in text or "UNAVAILABLE" in text:
      return False
  return True


def _chain(error: BaseException):
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _tree_differences(stored, abstract):
  """Paths whose presence or shape differ between stored metadata and the abstract state."""
  flat = lambda tree: {layout.path_str(p): tuple(getattr(x, "shape", ()) or ())
                       for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  have, want = flat(stored), flat(abstract)
  problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
  problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
  problems += [f"{k}: checkpoint {have[k]} vs run {want[k]}" for k in sorted(set(have) & set(want))
               if have[k] != want[k]]
  # The params first: they say most about what changed.
  return sorted(problems, key=lambda p: re.search(r"(^| )params/", p) is None)


def _model_differences(saved_config, config) -> str:
  if config is None:
    return ""
  saved = dict(saved_config.get("model", {}) or {})
  current = json.loads(config.to_json_best_effort()).get("model", {})
  keys = sorted(set(saved) | set(current), key=str)
  diffs = [f"{k} {current.get(k, '(unset)')!r} vs {saved.get(k, '(unset)')!r}"
           for k in keys if saved.get(k) != current.get(k)]
  return ", ".join(diffs) + " (config vs checkpoint)" if diffs else ""


def find_checkpoint(path) -> str:
  """Accepts a run's workdir, its checkpoints dir, a step dir or its `state` item (local or in
  a bucket)."""
  path = paths.resolve(path)
  if not path.exists():
    raise FileNotFoundError(f"init_from: {path} does not exist")
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  # In a bucket orbax writes a step in place and marks it complete last (commit_success.txt).
  steps = ([int(d.name) for d in path.iterdir()
            if d.name.isdigit() and ocp.step.is_checkpoint_finalized(d)]
           if path.is_dir() else [])
  if steps:
    path = path / str(max(steps))
  if (path / "state").is_dir():
    path = path / "state"
  return os.fspath(path)


def load_run_config(path):
  """The config a run saved with its checkpoint (its workdir, checkpoints dir or a step)."""
  state_dir = epath.Path(find_checkpoint(path))
  meta = state_dir.parent / "meta" / "metadata"
  if not meta.exists():
    raise FileNotFoundError(f"{path}: no run config beside the checkpoint (looked for {meta})")
  record = json.loads(meta.read_text())
  check_format(record, os.fspath(state_dir.parent))
  return ml_collections.ConfigDict(record["config"])


def check_format(meta: dict, what: str, error=ValueError) -> None:
  """Refuses a checkpoint of a format newer than this vitoken reads."""
  version = meta.get("format_version", 1)
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise error(f"{what} is in checkpoint format {version!r}, written by a newer vitoken; this "
                f"one reads formats up to {FORMAT_VERSION} (see CHANGELOG.md): upgrade vitoken")


def load_params(path, *, image_size=None, channels: int = 3):
  """Params of another run (its workdir or checkpoint) or a big_vision `.npz`, as numpy."""
  if os.fspath(path).endswith(".npz"):
    _, params = convert.from_big_vision(_read_npz(path), image_size=image_size)
    return jax.tree.map(np.asarray, params)
  ckpt = find_checkpoint(path)
  try:
    restored = ocp.StandardCheckpointer().restore(ckpt)
  except Exception as e:
    raise ValueError(f"init_from: cannot read a checkpoint at {ckpt}: {e}") from e
  if "params" not in restored:
    raise ValueError(f"init_from: {ckpt} holds no 'params' (keys: {sorted(restored)})")
  return jax.tree.map(np.asarray, restored["params"])


def subtree(params, path: str, source=""):
  """`params` below a '/'-path ("" or None: all of them), naming what exists on a miss."""
  for part in [p for p in (path or "").split("/") if p]:
    if not hasattr(params, "keys") or part not in params:
      have = sorted(params) if hasattr(params, "keys") else type(params).__name__
      raise ValueError(f"init_from.subtree {path!r}: no {part!r} in the params of {source} "
                       f"(it has {have})")
    params = params[part]
  return params


def _read_npz(path):
  """A local `.npz` path as is (the converter reads it); one in a bucket read into a dict."""
  source = paths.resolve(path)
  if not paths.is_remote(source):
    return os.fspath(source)
  if not source.exists():
    raise FileNotFoundError(f"big_vision checkpoint not found: {source}")
  try:
    with np.load(io.BytesIO(source.read_bytes()), allow_pickle=False) as npz:
      return {k: npz[k] for k in npz.files}
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"cannot read {source} as an .npz checkpoint: {e}") from e


def merge_params(target, loaded, *, exclude: Optional[str] = None, adapt=None):
  """Takes `loaded` values into `target`'s structure.

  Leaves whose path matches `exclude` keep the target's values (a new head, say). A leaf whose
  shape differs goes through `adapt(path, value, target_shape)`, the model's own knowledge
  (`VisionTransformer.adapt_loaded` resizes a learned position embedding), which returns the
  fitted value or raises ValueError. Any mismatch left is an error.
  """
  t_scanned, l_scanned = "blocks" in target, "blocks" in loaded
  if l_scanned and not t_scanned:
    loaded = layout.to_unscanned(loaded)
  elif t_scanned and not l_scanned:
    loaded = layout.to_scanned(loaded)
  flat_t = traverse_util.flatten_dict(target, sep="/")
  flat_l = traverse_util.flatten_dict(loaded, sep="/")
  pattern = re.compile(exclude) if exclude else None
  out, problems, kept = {}, [], []
  for key, value in flat_t.items():
    if pattern is not None and pattern.search(key):
      out[key] = value
      kept.append(key)
      continue
    if key not in flat_l:
      problems.append(f"missing {key} {tuple(value.shape)}")
      continue
    new = np.asarray(flat_l[key])
    if adapt is not None and new.shape != tuple(value.shape):
      try:
        new = np.asarray(adapt(key, new, tuple(value.shape)))
      except ValueError as e:
        problems.append(str(e))
        continue
    if new.shape != tuple(value.shape):
      problems.append(f"{key}: checkpoint {new.shape} vs model {tuple(value.shape)}")
      continue
    out[key] = new.astype(value.dtype)
  if problems:
    raise ValueError("init_from does not match the model (exclude parts with "
                     "config.init_from.exclude):\n  " + "\n  ".join(problems))
  unused = sorted(set(flat_l) - set(flat_t))
  if unused:
    log.info("init_from: ignoring %d checkpoint params not in the model: %s", len(unused), unused[:5])
  return traverse_util.unflatten_dict(out, sep="/"), kept
