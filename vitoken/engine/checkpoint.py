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

from vitoken import convert, errors, paths, settings
from vitoken.engine import checksums
from vitoken.models import layout

log = logging.getLogger(__name__)

# The layout above, numbered so that a reader can tell which it holds; CHANGELOG.md lists what
# each number means. Checkpoints written before the number was recorded are format 1.
FORMAT_VERSION = 1

class Checkpointer:
  """Saves every `every_steps` (and on demand), keeps `keep`, writes asynchronously.

  The folder is checked writable when it is opened; a save that fails (read-only, disk full,
  no permission) raises `CheckpointSaveError` in the training thread at the next `poll()`,
  which the trainer calls every step, and a checkpoint is reported saved only once orbax has
  committed it.
  """

  def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True):
    self.directory = os.fspath(paths.resolve(directory))
    check_writable(self.directory, "the checkpoints folder")
    self._options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(int(every_steps), 1), max_to_keep=keep,
        enable_async_checkpointing=async_save, create=True,
        # Creating the step folder in the background turns a read-only folder into a
        # 300 s wait for a signal that never comes; created here, it fails at once.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
    self._manager = self._open()
    self._pending: Optional[int] = None  # the step being written in the background
    self._good: Optional[int] = None  # the newest checkpoint known to be sound
    self._failed = False  # a save failed and was reported

  def _open(self):
    return ocp.CheckpointManager(
        self.directory, options=self._options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def save(self, step: int, state, data_iterator, meta: dict, *, force: bool = False) -> bool:
    """Starts writing `state` (checksummed) at `step`; a previous save is finished first."""
    self.poll(wait=True)
    meta = dict(meta, checksums=checksums.of_tree(state))
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    try:
      started = self._manager.save(step, args=ocp.args.Composite(**args), force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise _save_error(step, self.directory, e) from e
    if started:
      self._pending = step
      self.poll(wait=not self._options.enable_async_checkpointing)
    return started

  def poll(self, *, wait: bool = False) -> None:
    """Finishes a background save that is done (all of them with `wait`): logs it as saved,
    or raises the reason it failed."""
    if self._pending is None:
      return
    if not wait and self._manager.is_saving_in_progress():
      return
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._failed = True
      raise _save_error(step, self.directory, e) from e
    self._good = step
    log.info("checkpoint at step %d saved to %s", step, self.directory)

  @property
  def last_good_step(self) -> Optional[int]:
    """The newest checkpoint that this run saved or restored and checked, if any."""
    return self._good

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
              f"{_first_line(result)}. It was left in place (this does not look like "
              "a corrupt checkpoint); fix the cause (memory, storage access) and run again") from result
        raise CheckpointRestoreError(f"another process could not restore the checkpoint at step "
                                     f"{step} in {self.directory}; see its log")
      if verdict == _CORRUPT:
        self._set_aside(step, result if code == _CORRUPT else RuntimeError("unreadable on another process"))
        continue
      self._good = step
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
    state = self._manager.restore(step, args=ocp.args.Composite(**args))["state"]
    verify(state, meta, os.path.join(self.directory, str(step), "state"))
    return state

  def _set_aside(self, step: int, error: Exception):
    src = epath.Path(self.directory) / str(step)
    dst = epath.Path(self.directory) / "unreadable" / str(step)
    log.debug("checkpoint at step %d is unreadable: %r", step, error)
    log.warning("checkpoint at step %d is unreadable (%s); moved to %s, falling back to the "
                "previous checkpoint", step, describe_unreadable(error), dst)
    multihost_utils.sync_global_devices(f"set_aside_{step}_before")
    if jax.process_index() == 0 and src.exists():
      if dst.exists():
        dst.rmtree()
      paths.move_tree(src, dst)
    multihost_utils.sync_global_devices(f"set_aside_{step}_after")
    self._manager.close()
    self._manager = self._open()

  def wait(self):
    self.poll(wait=True)

  def close(self):
    try:
      self.poll(wait=True)
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        # orbax raises a failed save again when closing: it was reported once already.
        if not self._failed:
          raise


class CheckpointMismatch(errors.CheckpointError):
  """A readable checkpoint that does not fit this run (model, process count)."""


class CheckpointCorrupt(errors.CheckpointError):
  """A checkpoint whose restored arrays differ from the checksums written with them."""


class CheckpointRestoreError(errors.UserError, RuntimeError):
  """Restoring failed for a reason that is not the checkpoint's corruption."""


class CheckpointSaveError(errors.StorageError):
  """A checkpoint could not be written (read-only folder, full disk, no permission)."""


def verify(tree, meta: dict, where: str, prefix: str = "") -> None:
  """Raises CheckpointCorrupt when `tree` (restored from `where`) differs from the checksums in
  its `meta`; checkpoints written before checksums existed pass unchecked."""
  expected = meta.get("checksums")
  if not expected:
    return
  bad = checksums.mismatches(tree, expected, prefix)
  if bad:
    names = sorted(bad)
    raise CheckpointCorrupt(
        f"checksum mismatch in {where}: {', '.join(names[:3])}"
        f"{f' and {len(names) - 3} more arrays' if len(names) > 3 else ''} restored with values "
        "other than those saved (a damaged data file)")


def check_writable(directory, what: str) -> None:
  """Raises a StorageError naming the cause and the fix unless files can be created in
  `directory` (made if missing)."""
  path = epath.Path(directory)
  probe = path / f".write_test_{jax.process_index()}"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except  (buckets fail with auth errors too)
    raise errors.StorageError(f"{what} {path} is not writable: {_storage_cause(e)}. "
                              f"{_storage_fix(e, path, saved_before=False)}") from e


def _storage_cause(error: BaseException) -> str:
  for e in _chain(error):
    text = str(e)
    code = getattr(e, "errno", None)
    if code == errno.ENOSPC or "No space left" in text or "RESOURCE_EXHAUSTED" in text:
      return "the disk is full"
    if code == errno.EROFS or "Read-only file system" in text:
      return "it is on a read-only file system"
    if code in (errno.EACCES, errno.EPERM) or "Permission denied" in text \
        or "PERMISSION_DENIED" in text:
      return "permission denied"
    if code == errno.EDQUOT or "quota" in text.lower():
      return "the disk quota is exceeded"
  return _first_line(error)


def _storage_fix(error: BaseException, path, *, saved_before: bool = True) -> str:
  cause = _storage_cause(error)
  then = ": training resumes from the last saved checkpoint" if saved_before else ""
  if "full" in cause or "quota" in cause:
    return (f"Free space where {path} lives (or lower --config.checkpoint.keep), then run "
            f"again{then}")
  return f"Make {path} writable for this user, or pass a --workdir on writable storage{then}"


def _save_error(step: int, directory: str, error: BaseException) -> CheckpointSaveError:
  where = os.path.join(directory, str(step))
  return CheckpointSaveError(f"could not save the checkpoint at step {step} to {where}: "
                             f"{_storage_cause(error)}. {_storage_fix(error, directory)}")


def _first_line(error: BaseException, limit: int = 200) -> str:
  text = (str(error).strip().splitlines() or [""])[0]
  text = f"{type(error).__name__}: {text}" if text else type(error).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


def describe_unreadable(error: BaseException) -> str:
  """A one-line cause for a checkpoint that cannot be read: what is wrong with which array of
  which file, without TensorStore's spec dump."""
  for e in _chain(error):
    if isinstance(e, CheckpointCorrupt):
      return str(e)
  text = "\n".join(str(e) for e in _chain(error))
  array = re.search(r'Error reading "([^"/]+)', text)
  files = re.findall(r'(?:local file|Failed reading|reading) "([^"]+)"', text)
  where = " (" + " in ".join(
      ([f"array {array.group(1)}"] if array else []) + ([files[-1]] if files else [])) + ")"
  where = "" if where == " ()" else where
  lowered = text.lower()
  if any(w in lowered for w in ("truncat", "unexpected end", "out_of_range", "out of range",
                                 "byte range", "too short", "end of file")):
    return f"a data file is truncated{where}"
  if "checksum" in lowered or "crc" in lowered:
    return f"a data file fails its checksum{where}"
  if any(w in lowered for w in ("decod", "corrupt", "data_loss", "invalid", "json")):
    return f"a file cannot be decoded{where}"
  return _first_line(error) + where


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


_WHAT_PATH_TAKES = ("a run's workdir, its `checkpoints` folder, one step of it "
                    "(checkpoints/500) or that step's `state` folder")


def find_checkpoint(path) -> str:
  """The `state` item of the newest finished checkpoint at `path`: a run's workdir, its
  checkpoints dir, a step dir or its `state` item (local or in a bucket)."""
  given = path
  path = paths.resolve(path)
  if not path.exists():
    raise errors.MissingPathError(f"{given} does not exist (expected {_WHAT_PATH_TAKES})")
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
  if not (path / "_METADATA").exists():
    raise errors.CheckpointError(f"no checkpoint in {given}: it holds no finished checkpoint "
                                 f"(expected {_WHAT_PATH_TAKES})")
  return os.fspath(path)


def _read_meta(state_dir) -> Optional[dict]:
  """The `meta` item saved beside a checkpoint's `state`, or None if it has none."""
  meta = epath.Path(state_dir).parent / "meta" / "metadata"
  return json.loads(meta.read_text()) if meta.exists() else None


def load_run_config(path):
  """The config a run saved with its checkpoint (its workdir, checkpoints dir or a step)."""
  state_dir = find_checkpoint(path)
  record = _read_meta(state_dir)
  if record is None:
    raise errors.CheckpointError(f"{path}: no run config beside the checkpoint {state_dir} "
                                 "(a `meta` folder is written with every vitoken checkpoint)")
  check_format(record, os.fspath(epath.Path(state_dir).parent), errors.CheckpointError)
  return ml_collections.ConfigDict(record["config"])


def check_format(meta: dict, what: str, error=errors.CheckpointError) -> None:
  """Refuses a checkpoint of a format newer than this vitoken reads."""
  version = meta.get("format_version", 1)
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise error(f"{what} is in checkpoint format {version!r}, written by a newer vitoken; this "
                f"one reads formats up to {FORMAT_VERSION} (see CHANGELOG.md): upgrade vitoken")


def params_shapes(path):
  """The shapes and dtypes of a checkpoint's params (jax.ShapeDtypeStructs), read from its
  metadata without reading any array."""
  ckpt = find_checkpoint(path)
  try:
    stored = ocp.StandardCheckpointer().metadata(ckpt).item_metadata
  except Exception as e:  # pylint: disable=broad-except
    raise errors.CheckpointError(f"cannot read the checkpoint at {ckpt}: "
                                 f"{describe_unreadable(e)}") from e
  if stored is None or "params" not in stored:
    raise errors.CheckpointError(f"{ckpt} holds no 'params' "
                                 f"(keys: {sorted(stored or {})})")
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
                      settings.plain(stored["params"]))


def load_params(path, *, image_size=None, shardings=None):
  """Params of another run (its workdir or checkpoint) or a big_vision `.npz`.

  Only the params are read, whatever else the checkpoint holds, and onto this machine's
  devices however many wrote it: as numpy arrays on the host (`shardings=None`), or placed
  as they are read by `shardings` (one jax Sharding for every array, or a tree of them like
  the params), so that each device reads only its shards. A checkpoint's arrays are checked
  against the checksums saved with them.
  """
  if os.fspath(path).endswith(".npz"):
    _, params = convert.from_big_vision(_read_npz(path), image_size=image_size)
    params = jax.tree.map(np.asarray, params)
    return params if shardings is None else jax.device_put(params, shardings)
  ckpt = find_checkpoint(path)
  shapes = params_shapes(ckpt)
  if shardings is None:
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), shapes)
  else:
    if isinstance(shardings, jax.sharding.Sharding):
      shardings = jax.tree.map(lambda _: shardings, shapes)
    restore_args = jax.tree.map(lambda _, s: ocp.ArrayRestoreArgs(sharding=s), shapes, shardings)
  try:
    restored = ocp.PyTreeCheckpointer().restore(ckpt, args=ocp.args.PyTreeRestore(
        item={"params": shapes}, restore_args={"params": restore_args}, partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except
    raise errors.CheckpointError(f"cannot read the checkpoint at {ckpt}: "
                                 f"{describe_unreadable(e)}") from e
  verify(restored["params"], _read_meta(ckpt) or {}, ckpt, prefix="params/")
  return restored["params"]


def subtree(params, path: str, source=""):
  """`params` below a '/'-path ("" or None: all of them), naming what exists on a miss."""
  for part in [p for p in (path or "").split("/") if p]:
    if not hasattr(params, "keys") or part not in params:
      have = sorted(params) if hasattr(params, "keys") else type(params).__name__
      raise errors.ConfigError(f"init_from.subtree {path!r}: no {part!r} in the params of {source} "
                       f"(it has {have})")
    params = params[part]
  return params


def _read_npz(path):
  """A local `.npz` path as is (the converter reads it); one in a bucket read into a dict."""
  source = paths.resolve(path)
  if not paths.is_remote(source):
    return os.fspath(source)
  if not source.exists():
    raise errors.MissingPathError(f"big_vision checkpoint not found: {source}")
  try:
    with np.load(io.BytesIO(source.read_bytes()), allow_pickle=False) as npz:
      return {k: npz[k] for k in npz.files}
  except Exception as e:  # pylint: disable=broad-except
    raise errors.CheckpointError(f"cannot read {source} as an .npz checkpoint: {e}") from e


def merge_params(target, loaded, *, exclude: Optional[str] = None, adapt=None):
  """Takes `loaded` values into `target`'s structure.

  Leaves whose path matches `exclude` keep the target's values (a new head, say), as they are
  (device arrays stay on their devices); the others become the loaded host arrays. A leaf whose
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
    out[key] = new.astype(value.dtype, copy=False)
  if problems:
    raise errors.CheckpointError("init_from does not match the model (exclude parts with "
                     "config.init_from.exclude):\n  " + "\n  ".join(problems))
  unused = sorted(set(flat_l) - set(flat_t))
  if unused:
    log.info("init_from: ignoring %d checkpoint params not in the model: %s", len(unused), unused[:5])
  return traverse_util.unflatten_dict(out, sep="/"), kept
