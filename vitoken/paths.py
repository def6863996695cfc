"""One path layer for local folders and buckets (gs://, s3://, ...), over etils.epath.

Workdirs, data dirs, init_from paths and every output go through here, so a `gs://` path
is never mistaken for a local folder named "gs:". Buckets differ from folders in what they
cannot do: no real directories, no appends, and a "rename" copies every object.
"""
import os
import re
import shutil

from etils import epath

# The URI schemes etils.epath serves; "x://" with another scheme would become a local folder "x:".
URI_SCHEMES = ("gs", "s3", "az", "hf")
_URI_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def resolve(path) -> epath.Path:
  """`path` as an epath.Path: a bucket URI as given, a local path made absolute with `~`
  expanded (orbax wants absolute local paths)."""
  text = os.fspath(path)
  match = _URI_RE.match(text)
  if match:
    if match.group(1) not in URI_SCHEMES:
      raise ValueError(f"{text}: unsupported scheme {match.group(1)}:// (use a local path or one "
                       f"of {', '.join(s + '://' for s in URI_SCHEMES)})")
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_remote(path) -> bool:
  """True for a bucket URI: objects there are replaced whole, never appended to."""
  return _URI_RE.match(os.fspath(path)) is not None


def copy_file(source: epath.Path, target: epath.Path) -> None:
  with source.open("rb") as reader, target.open("wb") as writer:
    shutil.copyfileobj(reader, writer, 1 << 24)


def files_under(folder: epath.Path):
  for item in folder.iterdir():
    if item.is_dir():
      yield from files_under(item)
    else:
      yield item


def move_tree(src: epath.Path, dst: epath.Path) -> None:
  """Moves the folder `src` to `dst` (which must not exist): one rename locally; in a bucket a
  copy of every object, then the deletion of the originals."""
  if not is_remote(src):
    dst.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dst)
    return
  for item in files_under(src):
    copy_file(item, dst / item.relative_to(src))
  src.rmtree()
