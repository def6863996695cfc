"""Orbax checkpoints of the train state and the data iterator, and initialising from others'.

Layout of `{workdir}/checkpoints/{step}/`: `state` (params, optimizer, EMA; restored onto
whatever mesh the current run uses), `data` (each process's grain iterator state) and `meta`
(JSON: the config and the step). A checkpoint that cannot be read is moved aside to
`checkpoints/unreadable/` (never deleted) and the previous one is used.
"""
import json
import logging
import os
import re
import shutil
from typing import Any, Optional

import flax.traverse_util as traverse_util
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vitoken.models import layout, posemb as posemb_lib

log = logging.getLogger(__name__)


class Checkpointer:
  """Saves every `every_steps` (and on demand), keeps `keep`, writes asynchronously."""

  def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
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

  def restore_latest(self, abstract_state, data_iterator):
    """(step, state) from the newest readable checkpoint, or (None, None) when there is none."""
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
          args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        return step, restored["state"]
      except Exception as e:  # corrupt or partial files surface as many exception types
        self._set_aside(step, e)
    return None, None

  def _set_aside(self, step: int, error: Exception):
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self.directory, "unreadable", str(step))
    msg = (f"checkpoint at step {step} is unreadable ({type(error).__name__}: {error}); "
           f"moved to {dst}, falling back to the previous checkpoint")
    log.warning(msg)
    print(f"WARNING: {msg}", flush=True)
    multihost_utils.sync_global_devices(f"set_aside_{step}_before")
    if jax.process_index() == 0 and os.path.exists(src):
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      if os.path.exists(dst):
        shutil.rmtree(dst)
      os.replace(src, dst)
    multihost_utils.sync_global_devices(f"set_aside_{step}_after")
    self._manager.close()
    self._manager = self._open()

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def find_checkpoint(path: str) -> str:
  """Accepts a run's workdir, its checkpoints dir, a step dir or its `state` item."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"init_from: {path} does not exist")
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  steps = [int(d) for d in os.listdir(path) if d.isdigit()] if os.path.isdir(path) else []
  if steps:
    path = os.path.join(path, str(max(steps)))
  if os.path.isdir(os.path.join(path, "state")):
    path = os.path.join(path, "state")
  return path


def load_run_config(path: str):
  """The config a run saved with its checkpoint (its workdir, checkpoints dir or a step)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  state_dir = find_checkpoint(path)
  meta = os.path.join(os.path.dirname(state_dir), "meta", "metadata")
  if not os.path.exists(meta):
    raise FileNotFoundError(f"{path}: no run config beside the checkpoint (looked for {meta})")
  with open(meta) as f:
    return ml_collections.ConfigDict(json.load(f)["config"])


def load_params(path: str, *, image_size=None, channels: int = 3):
  """Params of another run (its workdir or checkpoint) or a big_vision `.npz`, as numpy."""
  if path.endswith(".npz"):
    from vitoken.convert import from_big_vision  # pylint: disable=import-outside-toplevel
    _, params = from_big_vision(path, image_size=image_size)
    return jax.tree.map(np.asarray, params)
  ckpt = find_checkpoint(path)
  try:
    restored = ocp.StandardCheckpointer().restore(ckpt)
  except Exception as e:
    raise ValueError(f"init_from: cannot read a checkpoint at {ckpt}: {e}") from e
  if "params" not in restored:
    raise ValueError(f"init_from: {ckpt} holds no 'params' (keys: {sorted(restored)})")
  return jax.tree.map(np.asarray, restored["params"])


def merge_params(target, loaded, *, exclude: Optional[str] = None, grid=None, num_prefix_pos=0,
                 posemb_method: str = "bilinear"):
  """Takes `loaded` values into `target`'s structure.

  Leaves whose path matches `exclude` keep the target's values (a new head, say). A learned
  position embedding is resized to the target's patch grid. Any other mismatch is an error.
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
    if key == "pos_embedding" and new.shape != value.shape and grid is not None:
      old_n = new.shape[1] - num_prefix_pos
      side = int(round(np.sqrt(old_n)))
      if side * side != old_n:
        problems.append(f"pos_embedding {new.shape}: not a square grid, cannot resize")
        continue
      new = np.asarray(posemb_lib.resize_posemb(new, (side, side), grid, num_prefix=num_prefix_pos,
                                                method=posemb_method))
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
