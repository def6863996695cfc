"""The JSON forms of metrics: metrics.jsonl records and summary.json, with non-finite
floats as the strings "NaN", "Infinity", "-Infinity" (strict JSON readers reject bare NaN)."""
from __future__ import annotations

import json
import math
import os
import re
import threading
from typing import Any, Dict, List, Optional

from etils import epath
import numpy as np

from vitoken import paths

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"

RESERVED_KEYS = ("step", "split", "wall_time")
_NONFINITE_TO_STR = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_STR_TO_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
SPLIT_RE = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")


def to_python(value: Any, name: str) -> Any:
  """A metric value as a Python bool/int/float/str; numpy and 0-d jax arrays included."""
  if isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, np.generic):
    return value.item()
  if hasattr(value, "__array__") and hasattr(value, "shape"):
    # np.asarray copies a jax.Array to the host without importing jax here.
    array = np.asarray(value)
    if array.shape != ():
      # A (1,)- or (devices,)-shaped value usually means a missing mean/psum; fail loudly.
      raise ValueError(f"metric {name!r} must be a scalar, got an array of shape {array.shape}")
    return array.item()
  raise TypeError(f"metric {name!r} has unsupported type {type(value).__name__}")


def _encode_json_value(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return _NONFINITE_TO_STR[repr(value)]
  return value


def _to_json_tree(obj: Any, name: str = "summary") -> Any:
  """Recursively converts a summary (dicts/lists of scalars and arrays) to strict-JSON values."""
  if isinstance(obj, dict):
    return {str(k): _to_json_tree(v, f"{name}.{k}") for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_to_json_tree(v, f"{name}[{i}]") for i, v in enumerate(obj)]
  if obj is None:
    return None
  if hasattr(obj, "__array__") and hasattr(obj, "shape") and not isinstance(obj, np.generic):
    array = np.asarray(obj)
    if array.shape != ():
      return _to_json_tree(array.tolist(), name)
  return _encode_json_value(to_python(obj, name))


def _decode_record(record: Dict[str, Any]) -> Dict[str, Any]:
  return {k: (_STR_TO_NONFINITE.get(v, v) if k != "split" and isinstance(v, str) else v)
          for k, v in record.items()}


def atomic_write_text(path, text: str) -> None:
  """Writes so that readers (and crashes) never see a half-written file.

  Locally via tmp + fsync + rename; in a bucket one upload is already atomic (and a "rename"
  there is a copy and a delete).
  """
  path = epath.Path(path)
  data = text.encode("utf-8")
  if paths.is_remote(path):
    path.write_bytes(data)
    return
  tmp = path.parent / f"{path.name}.tmp.{os.getpid()}.{threading.get_ident()}"
  try:
    with tmp.open("wb") as f:
      f.write(data)
      f.flush()
      # Without the fsync a power loss right after the rename can leave an empty file.
      os.fsync(f.fileno())
    tmp.replace(path)
  finally:
    if tmp.exists():
      tmp.unlink()


def read_jsonl(path) -> List[Dict[str, Any]]:
  """Reads a metrics.jsonl back to a list of dicts ("NaN"/"Infinity" strings become floats).

  A last line that does not parse is skipped: it is a record torn by a run killed mid-write.
  A bad line anywhere else is real corruption and raises ValueError.
  """
  records, _ = read_jsonl_with_status(path)
  return records


def read_jsonl_with_status(path: str):
  """(records, torn): torn is True when the file's tail was not a complete line."""
  text = epath.Path(path).read_bytes().decode("utf-8")
  lines = text.split("\n")
  # Text ending in "\n" leaves a final "" here; anything else there is an unterminated record.
  tail = lines.pop()
  records = []
  for lineno, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      records.append(_decode_record(json.loads(line)))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{lineno}: corrupt metrics record: {e}") from e
  torn = bool(tail.strip())
  if torn:
    try:
      # Killed between the record and its newline: the record itself is complete.
      records.append(_decode_record(json.loads(tail)))
    except json.JSONDecodeError:
      pass
  return records, torn


def dump_record(record: Dict[str, Any]) -> str:
  # allow_nan=False guards the strict-JSON promise: non-finite floats must already be strings.
  return json.dumps(record, allow_nan=False, separators=(", ", ": "))


def encode_record(record: Dict[str, Any]) -> Dict[str, Any]:
  return {k: _encode_json_value(v) for k, v in record.items()}


def read_summary(workdir) -> Optional[Dict[str, Any]]:
  """{workdir}/summary.json, or None when the run has not finished yet."""
  path = epath.Path(workdir) / SUMMARY_FILE
  return json.loads(path.read_text()) if path.exists() else None


def write_summary(workdir, summary: Dict[str, Any]) -> str:
  """Writes {workdir}/summary.json atomically (numpy/jax scalars become numbers); its path."""
  directory = epath.Path(workdir)
  directory.mkdir(parents=True, exist_ok=True)
  path = os.fspath(directory / SUMMARY_FILE)
  text = json.dumps(_to_json_tree(summary), allow_nan=False, indent=2, sort_keys=False) + "\n"
  atomic_write_text(path, text)
  return path
