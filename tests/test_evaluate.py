"""`vitoken.evaluate`: real-weight evaluation, checked against timm's own model and eval
transform on a generated ImageNet-like folder (random weights, a few JPEGs)."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from safetensors.torch import save_file
import torch

from vitoken import evaluate as ev
from vitoken.convert import to_big_vision
from vitoken.convert.torch_reference import import_timm
from vitoken.data import ops
from vitoken.errors import CheckpointError, ConfigError, MissingPathError, UserError
from vitoken.models import Model

timm = import_timm()

WNIDS = ("n01440764", "n01443537", "n01484850")  # sorted, as ImageNet's class folders
TIMM_KWARGS = {"img_size": 64, "depth": 4, "num_classes": len(WNIDS)}
METHODS = "dense,tome:2,topk:0.5,evit:0.5"
TIMING = (1, 1, 1)  # windows, iters, warmup: a smoke test of the timer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """root/val/<wnid>/*.JPEG of mixed sizes and aspect ratios (the crop matters)."""
  root = tmp_path_factory.mktemp("imagenet")
  rng = np.random.RandomState(0)
  for c, wnid in enumerate(WNIDS):
    (root / "val" / wnid).mkdir(parents=True)
    for i in range(4):
      h, w = rng.randint(50, 130, size=2)
      # Smooth colour fields: random pixels would make the JPEG and resize rounding dominate.
      base = rng.rand(4, 4, 3) * 255
      image = Image.fromarray(base.astype(np.uint8)).resize((int(w), int(h)), Image.BICUBIC)
      image.save(root / "val" / wnid / f"ILSVRC2012_val_{c}{i:04d}.JPEG", quality=90)
  return root


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory):
  torch.manual_seed(0)
  model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_KWARGS).eval()
  with torch.no_grad():
    for p in model.parameters():  # no zero-init (head, cls) hides a mistake
      p.add_(torch.randn_like(p) * 0.05)
  path = tmp_path_factory.mktemp("ckpt") / "vit_tiny.pth"
  torch.save(model.state_dict(), path)
  return model, path


@pytest.fixture(scope="module")
def timm_run(folder, timm_checkpoint):
  _, path = timm_checkpoint
  return ev.evaluate(str(path), timm_model="vit_tiny_patch16_224", timm_kwargs=TIMM_KWARGS,
                     data_folder=str(folder), methods=METHODS, batch_size=5, timing=TIMING)


def _timm_reference(model, folder):
  """timm's model on timm's eval transform of every file (sorted wnids, sorted files)."""
  cfg = timm.data.resolve_model_data_config(model)
  cfg["input_size"] = (3, *model.patch_embed.img_size)
  transform = timm.data.create_transform(**cfg, is_training=False)
  images, labels = [], []
  for c, wnid in enumerate(WNIDS):
    for path in sorted((folder / "val" / wnid).iterdir()):
      with Image.open(path) as image:
        images.append(transform(image.convert("RGB")))
      labels.append(c)
  with torch.no_grad():
    logits = model(torch.stack(images)).numpy()
  return logits, np.asarray(labels)


def test_dense_matches_timm_on_its_own_transform(timm_run, timm_checkpoint, folder):
  rows, info = timm_run
  logits, labels = _timm_reference(timm_checkpoint[0], folder)
  assert info["examples"] == len(labels) == 12
  np.testing.assert_array_equal(info["labels"], labels)
  top2 = np.sort(logits, axis=-1)[:, -2:]
  assert (top2[:, 1] - top2[:, 0]).min() > 1e-3, "near-tied logits make the check meaningless"
  dense = rows[0]
  np.testing.assert_array_equal(dense["predictions"], logits.argmax(-1))
  assert dense["accuracy"] == pytest.approx(float(np.mean(logits.argmax(-1) == labels)))
  prep = info["preprocessing"]
  assert (prep.image_size, prep.crop_pct, prep.interpolation) == (64, 0.9, "bicubic")


def test_each_training_free_method_runs_and_reports(timm_run):
  rows, info = timm_run
  assert [(r["method"], r["setting"]) for r in rows] == [
      ("dense", None), ("tome", 2), ("topk", 0.5), ("evit", 0.5)]
  dense = rows[0]
  assert dense["tokens"] == ">".join(["17"] * 5)
  for r in rows:
    assert 0.0 <= r["accuracy"] <= 1.0 and r["predictions"].shape == (12,)
    assert r["img/s"] > 0
  for r in rows[1:]:
    assert r["GFLOPs"] < dense["GFLOPs"], r
    assert int(r["tokens"].split(">")[-1]) < 17, r
  text = ev.table(rows, info)
  assert "| tome | 2 |" in text and "| evit | 0.5 |" in text and "crop_pct 0.9" in text


def test_big_vision_npz(tmp_path, folder):
  module = Model(num_classes=len(WNIDS), variant="Ti/16", depth=2, pool_type="tok",
                 gelu_approximate=True)
  params = module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape),
                        params)
  path = tmp_path / "ti16.npz"
  np.savez(path, **to_big_vision(module, params))
  rows, info = ev.evaluate(str(path), variant="Ti/16", data_folder=str(folder / "val"),
                           methods="dense,tome:2", batch_size=8, timing=None)
  prep = info["preprocessing"]
  assert (prep.image_size, prep.crop_pct, prep.interpolation) == (32, None, "bilinear")
  # big_vision's eval: the whole image squashed to the model's size, scaled to [-1, 1].
  files = [p for w in WNIDS for p in sorted((folder / "val" / w).iterdir())]
  images = np.stack([ops.resize(ops.decode(p.read_bytes(), 3), 32) for p in files])
  logits, _ = module.apply({"params": params}, images / 127.5 - 1.0)
  np.testing.assert_array_equal(rows[0]["predictions"], np.argmax(logits, -1))
  assert rows[1]["method"] == "tome" and np.isnan(rows[1]["img/s"])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(checkpoint="/nowhere/vit.pth", timm_model="vit_tiny_patch16_224"), MissingPathError,
     "checkpoint /nowhere/vit.pth does not exist"),
    (dict(methods="dense,tome:8,fastvit:3"), ConfigError, "unknown method 'fastvit:3'"),
    (dict(methods="tome:eight"), ConfigError, "tome needs r as a number"),
    (dict(timm_model="vit_nonexistent_patch16"), ConfigError, "timm_model 'vit_nonexistent"),
    (dict(timm_model="vit_small_patch16_224"), CheckpointError, "does not load into timm model"),
    (dict(timm_kwargs={**TIMM_KWARGS, "num_classes": 5}), CheckpointError,
     "does not load .* size mismatch for head.weight"),
    (dict(checkpoint="five_classes"), CheckpointError,
     "the data has 3 classes but the checkpoint's head has 5"),
    (dict(data_folder="/nowhere/imagenet"), MissingPathError, "data folder /nowhere/imagenet"),
    (dict(tfds="imagenet2012:validation"), ConfigError, "give one of data_folder .* and tfds"),
])
def test_bad_inputs_give_one_clear_error(kwargs, error, match, folder, timm_checkpoint,
                                         tmp_path):
  args = dict(checkpoint=str(timm_checkpoint[1]), timm_model="vit_tiny_patch16_224",
              timm_kwargs=TIMM_KWARGS, data_folder=str(folder), methods="dense", timing=None)
  args.update(kwargs)
  if args["checkpoint"] == "five_classes":
    kw = {**TIMM_KWARGS, "num_classes": 5}
    args.update(checkpoint=str(tmp_path / "five.safetensors"), timm_kwargs=kw)
    save_file(timm.create_model("vit_tiny_patch16_224", **kw).state_dict(), args["checkpoint"])
  with pytest.raises(error, match=match):
    ev.evaluate(args.pop("checkpoint"), **args)


def test_command_line_prints_the_table(folder, timm_checkpoint):
  out = subprocess.run(
      [sys.executable, "-m", "vitoken.evaluate", f"--checkpoint={timm_checkpoint[1]}",
       "--timm_model=vit_tiny_patch16_224", '--timm_kwargs={"img_size": 64, "depth": 4, '
       '"num_classes": 3}', f"--data_folder={folder}", "--methods=dense,tome:2,evit:0.5",
       "--batch_size=8", "--timing=1,1,1"], capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  print(out.stdout)
  lines = out.stdout.strip().splitlines()
  assert "12 images at 64px, crop_pct 0.9, bicubic" in lines[0]
  assert lines[1].startswith("| method | setting | top-1 | img/s | GFLOPs |")
  assert [line.split("|")[1].strip() for line in lines[3:]] == ["dense", "tome", "evit"]
  bad = subprocess.run([sys.executable, "-m", "vitoken.evaluate", "--checkpoint=/nowhere.npz",
                        f"--data_folder={folder}"], capture_output=True, text=True, check=False)
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  assert "error: checkpoint /nowhere.npz does not exist" in bad.stderr


def test_tfds_split_reads_only_the_eval_split():
  prep = ev.Preprocessing(224, 0.9, "bicubic", (0.5,), (0.5,))
  config = ev._data_config(  # pylint: disable=protected-access
      prep, data_folder=None, tfds="imagenet2012:validation", data_dir="/tfds", max_examples=None,
      workers=0)
  assert (config["name"], config["eval_split"], config["train_split"], config["data_dir"]) == (
      "imagenet2012", "validation", "validation", "/tfds")
  assert issubclass(CheckpointError, UserError) and issubclass(ConfigError, UserError)
