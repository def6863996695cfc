"""Workdirs, init_from paths and data_dirs in a bucket (gs://), against a mocked Cloud Storage.

Nothing here reaches the network. One in-memory object store serves the three clients that
touch a bucket in a run:
  - etils.epath (every file the trainer, grain, orbax's metadata and tfds write): the `gs`/`gcs`
    fsspec protocols are pointed at `FakeGCS`, which behaves like Cloud Storage where it matters:
    no directories (a "folder" exists while an object is under it), no appends, and a "rename"
    is a copy of each object;
  - TensorStore (orbax's array data): its GCS driver is pointed at a local HTTP server speaking
    the part of the Cloud Storage JSON API it uses (TENSORSTORE_GCS_HTTP_URL);
  - google-cloud-storage (orbax asks for the bucket's layout before listing or deleting steps):
    pointed at the same server (STORAGE_EMULATOR_HOST);
  - array_record's C++ GCS client (reading a TFDS dataset in a bucket): the same server
    (CLOUD_STORAGE_EMULATOR_ENDPOINT).
"""
import http.server
import importlib
import io
import json
import os
import re
import sys
import threading
import urllib.parse

from fsspec.spec import AbstractFileSystem
import numpy as np
import pytest

from tests.test_train_loop import run_preempted, smoke_config
from vitoken import errors
from vitoken.data import pipeline
from vitoken.engine import checkpoint as ckpt_lib, metrics as metrics_lib
from vitoken.train import trainer

# ----------------------------------------------------------------------------- the store


class _Store:
  """Objects of every bucket: {"bucket/name": bytes}, with Cloud Storage's generations."""

  def __init__(self):
    self.lock = threading.RLock()
    self.objects = {}
    self.generations = {}
    self._next = 1
    self.read_only_buckets = set()

  def clear(self):
    with self.lock:
      self.objects.clear()
      self.generations.clear()
      self.read_only_buckets.clear()

  def put(self, key, data):
    bucket = key.split("/", 1)[0]
    if bucket in self.read_only_buckets:
      raise PermissionError(f"403 Forbidden: no storage.objects.create permission on {bucket}")
    with self.lock:
      self.objects[key] = bytes(data)
      self._next += 1
      self.generations[key] = self._next
      return self._next

  def delete(self, key):
    with self.lock:
      del self.objects[key]
      del self.generations[key]

  def keys(self, prefix=""):
    with self.lock:
      return sorted(k for k in self.objects if k.startswith(prefix))


STORE = _Store()


class _Upload(io.BytesIO):
  """A write: the object appears whole when the file is closed, as a finished upload."""

  def __init__(self, key):
    super().__init__()
    self._key = key

  def close(self):
    if not self.closed:
      STORE.put(self._key, self.getvalue())
    super().close()


class FakeGCS(AbstractFileSystem):
  """fsspec `gs://` over STORE (what gcsfs would do against a real bucket)."""

  protocol = ("gs", "gcs")
  root_marker = ""

  @classmethod
  def _strip_protocol(cls, path):
    if isinstance(path, list):
      return [cls._strip_protocol(p) for p in path]
    path = os.fspath(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        path = path[len(prefix):]
    return path.strip("/")

  def _file(self, key):
    return {"name": key, "type": "file", "size": len(STORE.objects[key])}

  def info(self, path, **kwargs):
    key = self._strip_protocol(path)
    with STORE.lock:
      if key in STORE.objects:
        return self._file(key)
      if "/" not in key or STORE.keys(key + "/"):  # a bucket, or a prefix with objects
        return {"name": key, "type": "directory", "size": 0}
    raise FileNotFoundError(path)

  def ls(self, path, detail=True, **kwargs):
    key = self._strip_protocol(path)
    with STORE.lock:
      if key in STORE.objects:
        entries = [self._file(key)]
      else:
        children = {}
        for name in STORE.keys(key + "/"):
          child, sub, _ = name[len(key) + 1:].partition("/")
          full = f"{key}/{child}"
          children[full] = ({"name": full, "type": "directory", "size": 0} if sub
                            else self._file(full))
        if not children and "/" in key:
          raise FileNotFoundError(path)
        entries = [children[k] for k in sorted(children)]
    return entries if detail else [e["name"] for e in entries]

  def _open(self, path, mode="rb", **kwargs):
    key = self._strip_protocol(path)
    if "r" in mode:
      with STORE.lock:
        if key not in STORE.objects:
          raise FileNotFoundError(path)
        return io.BytesIO(STORE.objects[key])
    if "a" in mode:
      # gcsfs warns and overwrites: an append would silently drop what was there. Fail here.
      raise OSError(f"Cloud Storage objects cannot be appended to ({path})")
    if "x" in mode and key in STORE.objects:
      raise FileExistsError(path)
    return _Upload(key)

  def rm(self, path, recursive=False, maxdepth=None):
    for item in path if isinstance(path, list) else [path]:
      key = self._strip_protocol(item)
      with STORE.lock:
        under = STORE.keys(key + "/")
        if key in STORE.objects:
          STORE.delete(key)
        elif under and recursive:
          for name in under:
            STORE.delete(name)
        elif under:
          raise IsADirectoryError(item)
        else:
          raise FileNotFoundError(item)

  def rm_file(self, path):
    self.rm(path)

  def rmdir(self, path):
    pass  # there are no directories

  def mkdir(self, path, create_parents=True, **kwargs):
    pass  # gcsfs: a no-op below the bucket

  def makedirs(self, path, exist_ok=False):
    pass

  def cp_file(self, path1, path2, **kwargs):
    with STORE.lock:
      STORE.put(self._strip_protocol(path2), STORE.objects[self._strip_protocol(path1)])

  def created(self, path):
    return None

  def modified(self, path):
    return None


# ----------------------------------------------------------------------------- the JSON API


def _object_resource(key):
  bucket, name = key.split("/", 1)
  return {"kind": "storage#object", "bucket": bucket, "name": name,
          "generation": str(STORE.generations[key]), "metageneration": "1",
          "size": str(len(STORE.objects[key])), "contentType": "application/octet-stream",
          "timeCreated": "2025-01-01T00:00:00.000Z", "updated": "2025-01-01T00:00:00.000Z"}


class _Api(http.server.BaseHTTPRequestHandler):
  """The Cloud Storage JSON API calls of TensorStore's GCS driver and of get_bucket."""

  protocol_version = "HTTP/1.1"
  calls = []

  def log_message(self, *args):
    pass

  def _reply(self, code, body=b"", headers=None):
    if isinstance(body, dict):
      body = json.dumps(body).encode()
    self.send_response(code)
    for name, value in (headers or {}).items():
      self.send_header(name, value)
    if code not in (204, 304):
      self.send_header("Content-Type", "application/json" if body[:1] == b"{" else
                       "application/octet-stream")
      self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    if code not in (204, 304) and self.command != "HEAD":
      self.wfile.write(body)

  def _error(self, code, message):
    self._reply(code, {"error": {"code": code, "message": message}})

  def _route(self):
    url = urllib.parse.urlsplit(self.path)
    query = dict(urllib.parse.parse_qsl(url.query))
    match = re.fullmatch(r"(/upload)?/storage/v1/b/([^/]+)(/o(?:/(.+))?)?", url.path)
    if not match:
      return None
    upload, bucket, objects, name = match.groups()
    name = urllib.parse.unquote(name) if name else query.get("name")
    _Api.calls.append((self.command, bool(upload), bucket, name))
    return bool(upload), bucket, objects is not None, name, query

  def _precondition(self, key, query):
    """None if the request's generation conditions hold, else the status to reply."""
    current = STORE.generations.get(key, 0)
    if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != current:
      return 412
    if "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"]) == current:
      return 304
    return None

  def do_GET(self):
    route = self._route()
    if route is None:
      return self._error(404, "no such API")
    _, bucket, objects, name, query = route
    if not objects:
      return self._reply(200, {"kind": "storage#bucket", "name": bucket, "id": bucket})
    with STORE.lock:
      if name is None:  # list
        prefix = f"{bucket}/{query.get('prefix', '')}"
        keys = [k for k in STORE.keys(prefix)
                if (not query.get("startOffset") or k >= f"{bucket}/{query['startOffset']}")
                and (not query.get("endOffset") or k < f"{bucket}/{query['endOffset']}")]
        items = [_object_resource(k) for k in keys]
        return self._reply(200, {"kind": "storage#objects", **({"items": items} if items else {})})
      key = f"{bucket}/{name}"
      if key not in STORE.objects:
        return self._error(404, f"No such object: {key}")
      status = self._precondition(key, query)
      if status:
        return self._reply(status) if status == 304 else self._error(status, "Precondition Failed")
      if query.get("alt") != "media":
        return self._reply(200, _object_resource(key))
      data, generation = STORE.objects[key], STORE.generations[key]
    headers = {"x-goog-generation": str(generation), "x-goog-metageneration": "1"}
    byte_range = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
    if not byte_range:
      return self._reply(200, data, headers)
    first, last = byte_range.groups()
    start = int(first) if first else max(len(data) - int(last), 0)
    end = int(last) if first and last else len(data) - 1
    if start >= len(data) and len(data):
      return self._reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
    end = min(end, len(data) - 1)
    headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
    return self._reply(206, data[start:end + 1], headers)

  def do_POST(self):
    route = self._route()
    body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
    if route is None or not route[0] or route[4].get("uploadType") != "media":
      return self._error(400, "only uploadType=media uploads are mocked")
    _, bucket, _, name, query = route
    key = f"{bucket}/{name}"
    with STORE.lock:
      status = self._precondition(key, query)
      if status:
        return self._error(412, "Precondition Failed")
      try:
        STORE.put(key, body)
      except PermissionError as e:
        return self._error(403, str(e))
      return self._reply(200, _object_resource(key))

  def do_DELETE(self):
    route = self._route()
    if route is None or route[3] is None:
      return self._error(404, "no such API")
    _, bucket, _, name, query = route
    key = f"{bucket}/{name}"
    with STORE.lock:
      if key not in STORE.objects:
        return self._error(404, f"No such object: {key}")
      if self._precondition(key, query):
        return self._error(412, "Precondition Failed")
      STORE.delete(key)
    return self._reply(204)


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def handle_error(self, request, client_address):
    if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # clients hanging up
      super().handle_error(request, client_address)


_SERVER = []


def _api_url():
  """One server per test process: the clients may keep the endpoint they first read."""
  if not _SERVER:
    server = _Server(("127.0.0.1", 0), _Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _SERVER.append(server)
  return f"http://127.0.0.1:{_SERVER[0].server_address[1]}"


@pytest.fixture
def bucket(monkeypatch, tmp_path):
  """gs:// served from memory; the test runs in an empty local folder, to see strays."""
  from etils.epath import backend as epath_backend, gpath
  from orbax.checkpoint._src.path import gcs_utils
  url = _api_url()
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
  monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", url)
  for proxy in ("NO_PROXY", "no_proxy"):
    monkeypatch.setenv(proxy, "127.0.0.1,localhost")
  # With TensorFlow installed epath would take tf.io.gfile for gs://; this test mocks fsspec.
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False, raising=False)
  registry = importlib.import_module("fsspec.registry")._registry
  for protocol in FakeGCS.protocol:  # what fsspec.register_implementation(clobber=True) sets
    monkeypatch.setitem(registry, protocol, FakeGCS)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  gcs_utils.get_bucket.cache_clear()
  STORE.clear()
  _Api.calls.clear()
  monkeypatch.chdir(tmp_path)
  yield STORE
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  gcs_utils.get_bucket.cache_clear()
  assert not os.path.exists(tmp_path / "gs:"), "a gs:// path became a local folder"


def _names(store, prefix):
  return [k[len(prefix):] for k in store.keys(prefix)]


# ----------------------------------------------------------------------------- the tests


def test_the_mock_behaves_like_a_bucket(bucket):
  from etils import epath
  root = epath.Path("gs://bucket/x")
  root.mkdir(parents=True, exist_ok=True)
  assert not (root / "sub").exists()  # no directories: mkdir made nothing
  (root / "sub" / "f.txt").write_text("hi")
  assert (root / "sub").is_dir() and [p.name for p in root.iterdir()] == ["sub"]
  with pytest.raises(OSError, match="appended"):
    (root / "sub" / "f.txt").open("a")
  assert bucket.keys() == ["bucket/x/sub/f.txt"]


def test_unsupported_schemes_and_unwritable_buckets_are_named(bucket):
  with pytest.raises(ValueError, match=r"workdir hdfs://nn/run: unsupported scheme hdfs:// "
                                       r"\(use a local path or one of gs://, s3://"):
    trainer.check_workdir("hdfs://nn/run")
  bucket.read_only_buckets.add("locked")
  with pytest.raises(errors.StorageError, match=r"workdir gs://locked/run is not writable: "
                                                r"PermissionError: 403 Forbidden"):
    trainer.check_workdir("gs://locked/run")
  assert trainer.check_workdir("gs://bucket/run/") == "gs://bucket/run" and bucket.keys() == []
  assert not os.path.exists("hdfs:") and not os.path.exists("gs:")


def test_local_paths_are_absolute_with_home_expanded(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert trainer.check_workdir("run") == str(tmp_path / "run")
  assert trainer.check_workdir("~/run") == str(tmp_path / "home" / "run")
  assert os.path.isdir(tmp_path / "home" / "run")


def test_metrics_and_summary_in_a_bucket(bucket):
  wd = "gs://bucket/run"
  with metrics_lib.MetricLogger(wd, total_steps=10, progress=False) as log:
    for step in range(1, 5):
      log.write(step, {"loss": float(step)})
      # Written through at each step: a killed run keeps what it logged.
      assert [r["step"] for r in metrics_lib.read_jsonl(f"{wd}/metrics.jsonl")] == \
          list(range(1, step + 1))
    log.write(4, {"accuracy": 0.5}, split="eval")
  with metrics_lib.MetricLogger(wd, total_steps=10, start_step=2, progress=False) as log:
    log.write(3, {"loss": 30.0})
  records = metrics_lib.read_jsonl(f"{wd}/metrics.jsonl")
  assert [(r["step"], r["split"], r.get("loss")) for r in records] == [
      (1, "train", 1.0), (2, "train", 2.0), (3, "train", 30.0)]
  assert metrics_lib.write_summary(wd, {"top1": np.float32(0.5)}) == f"{wd}/summary.json"
  assert json.loads(bucket.objects["bucket/run/summary.json"]) == {"top1": 0.5}
  names = _names(bucket, "bucket/run/")
  assert [n for n in names if not n.startswith("tensorboard/")] == ["metrics.jsonl",
                                                                    "summary.json"]
  assert len([n for n in names if n.startswith("tensorboard/train/events.out.tfevents.")]) == 2
  assert len([n for n in names if n.startswith("tensorboard/eval/events.out.tfevents.")]) == 1


def _tensorboard_scalars(store, prefix, tmp_path, tag="loss"):
  """The scalars TensorBoard shows for the event files under a bucket prefix."""
  event_accumulator = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator")
  local = tmp_path / "tb"
  local.mkdir(exist_ok=True)
  for key in store.keys(prefix):
    (local / key.rsplit("/", 1)[1]).write_bytes(store.objects[key])
  acc = event_accumulator.EventAccumulator(str(local))
  acc.Reload()
  return [(s.step, s.value) for s in acc.Scalars(tag)]


def test_training_resume_and_init_from_in_a_bucket(bucket, tmp_path, monkeypatch):
  wd = "gs://bucket/run"
  # A run preempted at step 9, after its checkpoint at step 8, in the bucket.
  run_preempted(monkeypatch, smoke_config(), wd, at_call=9)
  names = _names(bucket, "bucket/run/")
  assert "metrics.jsonl" in names and "summary.json" not in names
  assert any(n.startswith("tensorboard/train/events.out.tfevents.") for n in names)
  for step in (4, 8):
    assert f"checkpoints/{step}/commit_success.txt" in names
    assert any(n.startswith(f"checkpoints/{step}/state/") for n in names)
    assert any(n.startswith(f"checkpoints/{step}/data/") for n in names)
  # Array data came through TensorStore's GCS driver, i.e. the JSON API.
  assert any(upload and name.startswith("run/checkpoints/8/state/")
             for _, upload, _, name in _Api.calls)

  # It resumes from the bucket's step 8 and continues the logs as if never interrupted.
  second = trainer.run(smoke_config(), wd)
  assert second["start_step"] == 8 and second["steps_run"] == 4
  local = tmp_path / "local"
  trainer.run(smoke_config(), str(local))
  remote_losses = [r["loss"] for r in metrics_lib.read_jsonl(f"{wd}/metrics.jsonl")
                   if r["split"] == "train"]
  local_losses = [r["loss"] for r in metrics_lib.read_jsonl(str(local / "metrics.jsonl"))
                  if r["split"] == "train"]
  np.testing.assert_allclose(remote_losses, local_losses, atol=1e-5)
  assert json.loads(bucket.objects["bucket/run/summary.json"])["final_step"] == 12
  scalars = _tensorboard_scalars(bucket, "bucket/run/tensorboard/train/", tmp_path)
  assert [s for s, _ in scalars] == list(range(1, 13))
  np.testing.assert_allclose([v for _, v in scalars], local_losses, rtol=1e-6)
  assert ckpt_lib.find_checkpoint(wd) == "gs://bucket/run/checkpoints/12/state"

  # Another run starts from the bucket run's params.
  c = smoke_config(**{"init_from.path": wd, "total_steps": 4})
  t = trainer.Trainer(c, "gs://bucket/finetune")
  _, state = t.initial_state(None)
  t.checkpointer.close()
  source = ckpt_lib.load_params(str(local))  # the same training, run locally
  got = state["params"]["block_01"]["mlp"]["fc1"]["kernel"]
  np.testing.assert_allclose(np.asarray(got), source["block_01"]["mlp"]["fc1"]["kernel"],
                             atol=1e-5)
  assert ckpt_lib.load_run_config(wd).total_steps == 12


def test_unreadable_checkpoint_in_a_bucket_is_set_aside(bucket, caplog):
  wd = "gs://bucket/run"
  trainer.run(smoke_config(total_steps=8), wd)
  for key in bucket.keys("bucket/run/checkpoints/8/state/"):
    bucket.put(key, b"garbage")
  summary = trainer.run(smoke_config(total_steps=8), wd)
  assert summary["start_step"] == 4 and summary["steps_run"] == 4
  assert "checkpoint at step 8 is unreadable" in caplog.text
  names = _names(bucket, "bucket/run/checkpoints/")
  aside = [n for n in names if n.startswith("unreadable/8/")]
  assert "unreadable/8/commit_success.txt" in aside
  assert all(bucket.objects[f"bucket/run/checkpoints/{n}"] == b"garbage"
             for n in aside if n.startswith("unreadable/8/state/"))
  assert "8/commit_success.txt" in names  # saved again by the resumed run


def test_npz_init_from_a_bucket(bucket, monkeypatch):
  import vitoken.convert
  seen = {}

  def fake_convert(source, image_size=None):
    seen["source"] = source
    return None, {"w": source["w"]}
  monkeypatch.setattr(vitoken.convert, "from_big_vision", fake_convert)
  buffer = io.BytesIO()
  np.savez(buffer, w=np.arange(3.0))
  bucket.put("bucket/vit.npz", buffer.getvalue())
  params = ckpt_lib.load_params("gs://bucket/vit.npz")
  np.testing.assert_array_equal(params["w"], np.arange(3.0))
  with pytest.raises(FileNotFoundError, match="gs://bucket/missing.npz"):
    ckpt_lib.load_params("gs://bucket/missing.npz")


def test_cluttered_digits_builds_into_a_bucket(bucket):
  from vitoken.data import cluttered_digits as cd
  builder = cd.build("gs://bucket/tfds", config="tiny")
  assert builder.is_prepared() and builder.info.splits["train"].num_examples == 1_000
  names = _names(bucket, "bucket/tfds/cluttered_digits/")
  version = [n for n in names if n.startswith("tiny/1.0.0/")]
  assert "tiny/1.0.0/dataset_info.json" in version and "tiny/1.0.0/features.json" in version
  assert sorted(n for n in version if ".array_record" in n) == [
      "tiny/1.0.0/cluttered_digits-test.array_record-00000-of-00001",
      "tiny/1.0.0/cluttered_digits-train.array_record-00000-of-00001"]
  assert not [n for n in names if "incomplete" in n or "vitoken-build" in n]
  # A second build finds it there.
  before = dict(bucket.generations)
  assert cd.build("gs://bucket/tfds", config="tiny").is_prepared()
  assert bucket.generations == before
  # And the pipeline reads it from the bucket (array_record's own GCS client).
  config = {"name": "cluttered_digits/tiny", "data_dir": "gs://bucket/tfds", "build": False}
  assert pipeline.dataset_info(config).eval_examples == 300
  images, labels = cd.generate_split("test", 300)
  batch = next(pipeline.eval_iterator(config, global_batch_size=4))
  np.testing.assert_array_equal(batch["labels"].argmax(-1), labels[:4])
  np.testing.assert_allclose(batch["image"], images[:4] / 127.5 - 1, atol=1e-6)
