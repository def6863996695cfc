"""The grain pipeline: shapes, sharding, exact eval, determinism, checkpoints, errors.

Data: the tiny cluttered-digits build, fake TFDS datasets (`tfds.testing.mock_data`), and
image folders written here whose pixels encode an example id, so a test can tell exactly
which examples a batch holds.
"""
import ast
import inspect

import grain
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from vitoken.data import cluttered_digits, config as config_lib, pipeline, sources, transforms

SPEC_KEYS = {"name", "folder", "data_dir", "train_split", "eval_split", "image_size",
             "random_resized_crop", "crop_scale", "crop_ratio", "flip", "mean", "std",
             "mixup_alpha", "cutmix_alpha", "mix_prob", "worker_count", "build", "shuffle",
             "train_examples", "crop_pct", "interpolation", "random_erasing",
             "random_erasing_mode", "random_erasing_count", "randaugment", "eval_splits",
             "repeated_augmentation", "label_keys", "frames", "first_frame"}
CLASSES = ("ant", "bee", "cat")  # label of example id i: i % 3


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  cluttered_digits.build(str(data_dir), config="tiny")
  return str(data_dir)


def _digits(digits_dir, **overrides):
  return {"name": "cluttered_digits/tiny", "data_dir": digits_dir, **overrides}


def _write_folder(root, sizes, mode="L"):
  """root/<split>/<class>/<id>.png; pixel value 5 + 10 * id, class CLASSES[id % 3]."""
  for split, count in sizes.items():
    for class_name in CLASSES:
      (root / split / class_name).mkdir(parents=True, exist_ok=True)
    for example_id in range(count):
      value = 5 + 10 * example_id
      pixels = np.full((8, 8, 3) if mode == "RGB" else (8, 8), value, np.uint8)
      path = root / split / CLASSES[example_id % 3] / f"{example_id:03d}.png"
      Image.fromarray(pixels, mode).save(path)
  return str(root)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return _write_folder(tmp_path_factory.mktemp("folder"), {"train": 24, "test": 23})


def _folder(root, **overrides):
  return {"folder": root, "image_size": 8, **overrides}


def _ids(images):
  """Example ids encoded in the pixels of normalized batches (mean = std = 0.5)."""
  values = np.round((images[:, 0, 0, 0] * 0.5 + 0.5) * 255)
  return ((values - 5) / 10).astype(int)


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


# ----------------------------------------------------------------------------- interface


def test_default_config_has_the_documented_keys():
  config = pipeline.default_data_config()
  assert SPEC_KEYS <= set(config.keys())
  assert set(config.keys()) - SPEC_KEYS == {"eval_examples"}
  assert config.name == "cluttered_digits" and config.image_size == 64
  assert config.mean == (0.5,) and config.std == (0.5,) and config.mix_prob == 1.0


def test_cluttered_digits_info_and_batches(digits_dir):
  config = pipeline.default_data_config()
  config.update(_digits(digits_dir))
  info = pipeline.dataset_info(config)
  assert info == pipeline.DataInfo(num_classes=10, image_shape=(64, 64, 1),
                                   train_examples=1000, eval_examples=300)
  assert info.label_splits() == (("label", 10),)
  batch = next(pipeline.train_iterator(config, global_batch_size=16, seed=0))
  assert batch["image"].shape == (16, 64, 64, 1) and batch["image"].dtype == np.float32
  assert batch["labels"].shape == (16, 10) and batch["labels"].dtype == np.float32
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1
  np.testing.assert_array_equal(batch["labels"].sum(-1), 1)
  assert set(np.unique(batch["labels"])) <= {0.0, 1.0}


def test_resizes_to_image_size(digits_dir):
  config = _digits(digits_dir, image_size=32, random_resized_crop=True, flip=True)
  assert pipeline.dataset_info(config).image_shape == (32, 32, 1)
  batch = next(pipeline.train_iterator(config, global_batch_size=4, seed=0))
  assert batch["image"].shape == (4, 32, 32, 1)
  batch = next(pipeline.eval_iterator(config, global_batch_size=4))
  assert batch["image"].shape == (4, 32, 32, 1)


@pytest.mark.parametrize("name,eval_split,num_classes,size", [
    ("cifar10", "test", 10, 16),
    ("imagenet2012", "validation", 1000, 24),
])
def test_fake_tfds_datasets(name, eval_split, num_classes, size, tmp_path):
  config = {"name": name, "eval_split": eval_split, "image_size": size, "data_dir": str(tmp_path),
            "random_resized_crop": True, "flip": True, "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225)}
  with tfds.testing.mock_data(num_examples=21):
    info = pipeline.dataset_info(config)
    assert info == pipeline.DataInfo(num_classes, (size, size, 3), 21, 21)
    train = pipeline.train_iterator(config, global_batch_size=8, seed=1)
    for batch in _take(train, 3):  # 3 batches of 8 > 21: crosses the epoch boundary
      assert batch["image"].shape == (8, size, size, 3) and batch["image"].dtype == np.float32
      assert batch["labels"].shape == (8, num_classes)
      np.testing.assert_array_equal(batch["labels"].sum(-1), 1)
    batches = list(pipeline.eval_iterator(config, global_batch_size=8))
  assert len(batches) == 3
  for batch in batches:
    assert batch["image"].shape == (8, size, size, 3)
    assert batch["labels"].shape == (8, num_classes) and batch["labels"].dtype == np.float32
    assert batch["mask"].dtype == bool
    np.testing.assert_array_equal(batch["labels"].sum(-1), batch["mask"])  # one-hot or padding
  assert sum(int(b["mask"].sum()) for b in batches) == 21


def test_image_folder_labels_and_shapes(folder):
  info = pipeline.dataset_info(_folder(folder))
  assert info == pipeline.DataInfo(num_classes=3, image_shape=(8, 8, 1), train_examples=24,
                                   eval_examples=23)
  for batch in pipeline.eval_iterator(_folder(folder), global_batch_size=5):
    ids = _ids(batch["image"])[batch["mask"]]
    np.testing.assert_array_equal(batch["labels"][batch["mask"]].argmax(-1), ids % 3)
  batch = next(pipeline.train_iterator(_folder(folder), global_batch_size=6, seed=0))
  np.testing.assert_array_equal(batch["labels"].argmax(-1), _ids(batch["image"]) % 3)


def test_eval_labels_take_the_training_form_with_zero_padding_rows(folder):
  train = next(pipeline.train_iterator(_folder(folder), global_batch_size=8, seed=0))
  batches = list(pipeline.eval_iterator(_folder(folder), global_batch_size=8))
  assert [int(b["mask"].sum()) for b in batches] == [8, 8, 7]  # 23 examples: one padding row
  for batch in batches:
    assert batch["labels"].dtype == train["labels"].dtype == np.float32
    assert batch["labels"].shape == train["labels"].shape == (8, 3)
    ids = _ids(batch["image"])
    want = np.eye(3, dtype=np.float32)[ids % 3] * batch["mask"][:, None]
    np.testing.assert_array_equal(batch["labels"], want)
  assert not batches[-1]["labels"][-1].any() and not batches[-1]["mask"][-1]


def test_image_folder_rgb_and_resize(tmp_path):
  root = _write_folder(tmp_path, {"train": 4, "test": 3}, mode="RGB")
  config = _folder(root, image_size=12)
  assert pipeline.dataset_info(config).image_shape == (12, 12, 3)
  batch = next(pipeline.eval_iterator(config, global_batch_size=4))
  assert batch["image"].shape == (4, 12, 12, 3)
  np.testing.assert_array_equal(batch["mask"], [True, True, True, False])
  np.testing.assert_array_equal(batch["labels"], [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]])


def test_train_examples_caps_the_split(folder):
  config = _folder(folder, train_examples=10)
  assert pipeline.dataset_info(config).train_examples == 10
  ids = np.concatenate([_ids(b["image"]) for b in
                        _take(pipeline.train_iterator(config, global_batch_size=5, seed=0), 4)])
  # Two epochs of the same 10 examples (the first 10 in class-then-file order).
  assert len(set(ids)) == 10 and np.all(np.unique(ids, return_counts=True)[1] == 2)


def test_pipeline_reexports_the_pieces_and_the_modules_are_layered():
  assert pipeline.default_data_config is config_lib.default_data_config
  for name in ("DataInfo", "dataset_info", "IMAGE_EXTENSIONS", "ImageFolderSource",
               "folder_classes", "folder_files"):
    assert getattr(pipeline, name) is getattr(sources, name), name
  assert pipeline.BatchFields is transforms.BatchFields
  # config <- sources, transforms <- pipeline: module-level imports only, no cycles.
  allowed = {"config": set(), "sources": {"config"}, "transforms": {"config"},
             "pipeline": {"config", "sources", "transforms"}}
  for name, module in [("config", config_lib), ("sources", sources), ("transforms", transforms),
                       ("pipeline", pipeline)]:
    tree = ast.parse(inspect.getsource(module))
    imported = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module == "vitoken.data":
        imported |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vitoken.data."):
        imported.add(node.module.split(".")[2])
    assert imported & set(allowed) == allowed[name], name


# ----------------------------------------------------------------------------- sharding


def test_process_shards_are_disjoint_cover_the_split_and_reshuffle(folder):
  epochs = {}
  for process in (0, 1):
    train = pipeline.train_iterator(_folder(folder), global_batch_size=4, seed=3,
                                    process_index=process, process_count=2)
    batches = _take(train, 12)  # two epochs of a 12-example shard in batches of 2
    assert all(b["image"].shape == (2, 8, 8, 1) for b in batches)
    ids = np.concatenate([_ids(b["image"]) for b in batches])
    epochs[process] = (ids[:12], ids[12:])
  first = [set(epochs[p][0]) for p in (0, 1)]
  assert not first[0] & first[1]
  assert first[0] | first[1] == set(range(24))
  for process in (0, 1):
    one, two = epochs[process]
    assert set(two) == set(one) and len(set(one)) == 12  # each epoch: the shard exactly once
    assert list(two) != list(one)  # reshuffled


@pytest.mark.parametrize("global_batch", [4, 6, 30])
def test_eval_is_exact_across_processes(folder, global_batch):
  seen, counts = [], []
  for process in (0, 1):
    batches = list(pipeline.eval_iterator(_folder(folder), global_batch_size=global_batch,
                                          process_index=process, process_count=2))
    counts.append(len(batches))
    for batch in batches:
      assert batch["image"].shape[0] == global_batch // 2
      ids = _ids(batch["image"])[batch["mask"]]
      np.testing.assert_array_equal(batch["labels"][batch["mask"]].argmax(-1), ids % 3)
      assert not batch["labels"][~batch["mask"]].any()  # padding: all-zero label rows
      seen.extend(ids)
  assert counts[0] == counts[1] == -(-23 // global_batch)
  assert sorted(seen) == list(range(23))  # every example once, padding masked out


def test_eval_has_no_augmentation(digits_dir):
  config = _digits(digits_dir, random_resized_crop=True, flip=True, mixup_alpha=1.0)
  first = list(pipeline.eval_iterator(config, global_batch_size=100))
  second = list(pipeline.eval_iterator(_digits(digits_dir), global_batch_size=100))
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a["image"], b["image"])


# ----------------------------------------------------------------------------- determinism


MIXED = dict(image_size=32, random_resized_crop=True, crop_scale=(0.3, 1.0), flip=True,
             mixup_alpha=0.8, cutmix_alpha=1.0)


def _assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      assert a[key].tobytes() == b[key].tobytes(), key


def test_same_seed_same_batches_other_seed_other_batches(digits_dir):
  config = _digits(digits_dir, **MIXED)
  runs = [_take(pipeline.train_iterator(config, global_batch_size=8, seed=s), 3)
          for s in (5, 5, 6)]
  _assert_same_batches(runs[0], runs[1])
  assert not np.array_equal(runs[0][0]["image"], runs[2][0]["image"])


@pytest.mark.parametrize("augment", [{}, MIXED])
def test_checkpoint_resumes_exactly(digits_dir, augment):
  config = _digits(digits_dir, **augment)
  train = pipeline.train_iterator(config, global_batch_size=8, seed=0)
  _take(train, 3)
  state = train.get_state()
  expected = _take(train, 3)
  if augment:  # mixing really happened: some targets are soft
    assert any(np.any((b["labels"] > 0) & (b["labels"] < 1)) for b in expected)
  resumed = pipeline.train_iterator(config, global_batch_size=8, seed=0)
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 3), expected)


def test_checkpoint_through_orbax(digits_dir, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  config = _digits(digits_dir, **MIXED)
  train = pipeline.train_iterator(config, global_batch_size=8, seed=0)
  _take(train, 2)
  checkpointer = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
  checkpointer.save(tmp_path / "ckpt", args=grain.checkpoint.CheckpointSave(train))
  expected = _take(train, 2)
  resumed = pipeline.train_iterator(config, global_batch_size=8, seed=0)
  checkpointer.restore(tmp_path / "ckpt", args=grain.checkpoint.CheckpointRestore(resumed))
  _assert_same_batches(_take(resumed, 2), expected)


def test_worker_processes_give_the_same_batches(digits_dir):
  config = _digits(digits_dir, **MIXED)
  expected = _take(pipeline.train_iterator(config, global_batch_size=8, seed=0), 2)
  with_workers = pipeline.train_iterator({**config, "worker_count": 1}, global_batch_size=8,
                                         seed=0)
  _assert_same_batches(_take(with_workers, 2), expected)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("config,error,pattern", [
    ({"colour": "red"}, ValueError, r"unknown data config key 'colour'; allowed keys: \['build'"),
    ({"name": "no_such_dataset"}, ValueError, "unknown dataset name 'no_such_dataset'"),
    ({"image_size": 0}, ValueError, "image_size must be a positive int"),
    ({"mix_prob": 2.0}, ValueError, r"mix_prob must lie in \[0, 1\]"),
    ({"crop_scale": (0.5, 0.1)}, ValueError, "crop_scale must be"),
    ({"train_examples": 0}, ValueError, "train_examples must be None or a positive int"),
])
def test_bad_config(config, error, pattern):
  with pytest.raises(error, match=pattern):
    pipeline.dataset_info(config)


def test_bad_batch_and_process(digits_dir):
  with pytest.raises(ValueError, match="global_batch_size 7 is not divisible by the process "
                                       "count 2"):
    pipeline.train_iterator(_digits(digits_dir), global_batch_size=7, seed=0, process_index=0,
                            process_count=2)
  with pytest.raises(ValueError, match="global_batch_size 6 is not divisible"):
    pipeline.eval_iterator(_digits(digits_dir), global_batch_size=6, process_index=0,
                           process_count=4)
  with pytest.raises(ValueError, match="need 0 <= process_index < process_count"):
    pipeline.eval_iterator(_digits(digits_dir), global_batch_size=4, process_index=2,
                           process_count=2)


def test_mean_must_match_channels(digits_dir):
  with pytest.raises(ValueError, match=r"mean has 3 values but the images have 1 channel"):
    pipeline.dataset_info(_digits(digits_dir, mean=(0.5, 0.5, 0.5)))


def test_unknown_split(digits_dir, folder):
  with pytest.raises(ValueError, match="has no split 'validation'"):
    pipeline.eval_iterator(_digits(digits_dir, eval_split="validation"), global_batch_size=4)
  with pytest.raises(FileNotFoundError, match="has no split folder 'validation'"):
    pipeline.eval_iterator(_folder(folder, eval_split="validation"), global_batch_size=4)


def test_missing_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="image folder .*nowhere does not exist"):
    pipeline.dataset_info({"folder": str(tmp_path / "nowhere")})
  (tmp_path / "empty" / "train").mkdir(parents=True)
  with pytest.raises(ValueError, match="image folder .*empty has no classes"):
    pipeline.dataset_info({"folder": str(tmp_path / "empty")})
  (tmp_path / "empty" / "train" / "cat").mkdir()
  with pytest.raises(ValueError, match="has no .png/.jpg/.jpeg images"):
    pipeline.dataset_info({"folder": str(tmp_path / "empty"), "eval_split": "train"})


def test_missing_dataset_without_build(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"not in data_dir {tmp_path}"):
    pipeline.dataset_info({"data_dir": str(tmp_path), "build": False})


def test_manual_download_dataset_names_data_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"(?s)'imagenet2012' is not in data_dir "
                                              f"{tmp_path} and needs a manual download"):
    pipeline.dataset_info({"name": "imagenet2012", "data_dir": str(tmp_path)})
