"""Cluttered digits: the default dataset, built offline from the UCI digits in scikit-learn.

Each 64x64 grayscale image holds one upscaled 8x8 UCI digit (the label) at a random
position and scale, plus a few small fragments of digits of other classes scattered around
it. Most 8x8 patches are empty, so the dataset rewards models that spend compute only on
the tokens that matter, while still needing the whole digit to be read.

The 1,797 glyphs are split once (seeded, stratified by class) into train and test glyphs:
test images are drawn only from glyphs the training images never show, digit and clutter
alike, so test accuracy measures generalization to unseen handwriting.

The dataset is a TFDS `GeneratorBasedBuilder` (`cluttered_digits`), written as array_record
so `tfds.data_source` and grain read it without TensorFlow. Generation is vectorized numpy
with a seeded Generator per (split, chunk of 5,000 images), so a given version is always
byte-identical. Building 50,000 + 10,000 images takes ~20 s on 2 CPU cores (69 MB on disk).

    from vitoken.data import cluttered_digits
    cluttered_digits.build(data_dir=None)          # ~/tensorflow_datasets, $TFDS_DATA_DIR, gs://...
    source = tfds.data_source("cluttered_digits", split="train")   # or "cluttered_digits/tiny"
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Callable, Dict, Iterator, Optional, Tuple
import uuid

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from vitoken import paths

NAME = "cluttered_digits"
CANVAS = 64
NUM_CLASSES = 10
GLYPH = 8  # the UCI digits are 8x8 with values 0..16
GLYPH_MAX = 16.0
TEST_GLYPH_FRACTION = 0.2

# Rendering ranges, chosen so a patch-8 ViT reads the digit easily while most patches
# stay empty: the digit spans 3 to 4 patches per side; a fragment spans at most 1.5.
DIGIT_SIZES = (24, 32)  # inclusive range of the upscaled digit's side, pixels
FRAGMENT_CROPS = (3, 4)  # inclusive range of the fragment's side in glyph pixels
FRAGMENT_SCALE = 3  # fragments are upscaled like a small digit, so strokes look alike
FRAGMENTS_PER_IMAGE = (2, 5)  # inclusive range
PLACEMENT_TRIES = 8  # fragments that still overlap the digit after this many are dropped

# Seeds are part of the dataset version: changing one changes the data, so bump VERSION.
_GLYPH_SPLIT_SEED = 20240601
_SPLIT_SEEDS = {"train": 1, "test": 2}
CHUNK = 5_000  # images rendered at once; part of the version too (it scopes the seeds)


@dataclasses.dataclass
class ClutteredDigitsConfig(tfds.core.BuilderConfig):
  """Split sizes. `default` is the dataset; `tiny` exists so tests build in a second."""
  train_size: int = 50_000
  test_size: int = 10_000


def load_glyphs() -> Tuple[np.ndarray, np.ndarray]:
  """The 1,797 UCI glyphs as float32 [N, 8, 8] in [0, 1], and their int64 labels [N]."""
  # Imported lazily: scikit-learn is only needed when building, never when reading.
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top  (heavy; only the first build needs it)
  digits = sk_datasets.load_digits()
  glyphs = (digits.images / GLYPH_MAX).astype(np.float32)
  return glyphs, digits.target.astype(np.int64)


def load_glyph_split() -> Tuple[np.ndarray, np.ndarray]:
  """Sorted glyph indices (train, test): a fixed, seeded, class-stratified ~80/20 split."""
  _, labels = load_glyphs()
  return split_glyphs(labels)


def split_glyphs(labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(_GLYPH_SPLIT_SEED)
  train, test = [], []
  for digit in range(NUM_CLASSES):
    members = rng.permutation(np.flatnonzero(labels == digit))
    num_test = int(round(TEST_GLYPH_FRACTION * len(members)))
    test.append(members[:num_test])
    train.append(members[num_test:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def bilinear_matrix(src: int, dst: int) -> np.ndarray:
  """[dst, src] weights of half-pixel-centred bilinear upsampling (PIL's convention)."""
  centres = (np.arange(dst) + 0.5) * src / dst - 0.5
  centres = np.clip(centres, 0, src - 1)
  low = np.floor(centres).astype(np.int64)
  high = np.minimum(low + 1, src - 1)
  frac = (centres - low).astype(np.float32)
  weights = np.zeros((dst, src), np.float32)
  np.add.at(weights, (np.arange(dst), low), 1 - frac)
  np.add.at(weights, (np.arange(dst), high), frac)
  return weights


def upscale(glyphs: np.ndarray, size: int) -> np.ndarray:
  """Bilinear upscale of square glyphs [N, g, g] in [0, 1] to uint8 [N, size, size]."""
  weights = bilinear_matrix(glyphs.shape[-1], size)
  tiles = np.einsum("ij,njk,lk->nil", weights, glyphs, weights, optimize=True)
  return np.clip(np.round(tiles * 255.0), 0, 255).astype(np.uint8)


def paste_max(canvas: np.ndarray, rows, tops, lefts, tiles: np.ndarray) -> None:
  """canvas[r, t:t+s, l:l+s] = max(canvas[...], tile) for each row, in place."""
  side = tiles.shape[-1]
  # A loop of slice views beats fancy indexing here: it touches only the pasted pixels.
  for row, top, left, tile in zip(rows, tops, lefts, tiles):
    view = canvas[row, top:top + side, left:left + side]
    np.maximum(view, tile, out=view)


def render(glyphs: np.ndarray, labels: np.ndarray, pool: np.ndarray, num_images: int,
           rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
  """Renders `num_images` cluttered canvases using only glyphs in `pool`.

  Returns uint8 images [num_images, 64, 64, 1] and int64 labels [num_images]. Classes are
  balanced (equal counts up to one) and the order is random.
  """
  canvas = np.zeros((num_images, CANVAS, CANVAS), np.uint8)
  targets = rng.permutation(np.arange(num_images) % NUM_CLASSES)
  digit_glyphs = sample_glyphs_of_class(labels, pool, targets, rng)
  sizes = rng.integers(DIGIT_SIZES[0], DIGIT_SIZES[1] + 1, num_images)
  tops = rng.integers(0, CANVAS - sizes + 1)
  lefts = rng.integers(0, CANVAS - sizes + 1)
  for size in np.unique(sizes):
    rows = np.flatnonzero(sizes == size)
    paste_max(canvas, rows, tops[rows], lefts[rows], upscale(glyphs[digit_glyphs[rows]], size))
  add_clutter(canvas, glyphs, labels, pool, targets, (tops, lefts, sizes), rng)
  return canvas[..., None], targets.astype(np.int64)


def sample_glyphs_of_class(labels, pool, classes, rng) -> np.ndarray:
  """For each entry of `classes`, a random glyph index from `pool` with that class."""
  chosen = np.empty(len(classes), np.int64)
  for digit in range(NUM_CLASSES):
    rows = np.flatnonzero(classes == digit)
    members = pool[labels[pool] == digit]
    chosen[rows] = members[rng.integers(0, len(members), len(rows))]
  return chosen


def add_clutter(canvas, glyphs, labels, pool, targets, digit_boxes, rng) -> None:
  """Scatters fragments of other-class glyphs around (never over) each image's digit."""
  num_images = canvas.shape[0]
  counts = rng.integers(FRAGMENTS_PER_IMAGE[0], FRAGMENTS_PER_IMAGE[1] + 1, num_images)
  for slot in range(FRAGMENTS_PER_IMAGE[1]):
    # Other classes only, so clutter never hints at the label.
    classes = (targets + rng.integers(1, NUM_CLASSES, num_images)) % NUM_CLASSES
    sources = glyphs[sample_glyphs_of_class(labels, pool, classes, rng)]
    crops = rng.integers(FRAGMENT_CROPS[0], FRAGMENT_CROPS[1] + 1, num_images)
    for crop in np.unique(crops):
      rows = np.flatnonzero((crops == crop) & (slot < counts))
      pieces = random_crops(sources[rows], crop, rng)
      side = crop * FRAGMENT_SCALE
      tops, lefts, keep = place_outside(digit_boxes, rows, side, rng)
      paste_max(canvas, rows[keep], tops[keep], lefts[keep], upscale(pieces[keep], side))


def random_crops(glyphs: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
  """A random crop x crop window of each glyph [N, 8, 8], away from the blank border."""
  cy = rng.integers(1, GLYPH - crop, len(glyphs))
  cx = rng.integers(1, GLYPH - crop, len(glyphs))
  window = np.arange(crop)
  return glyphs[np.arange(len(glyphs))[:, None, None],
                cy[:, None, None] + window[None, :, None],
                cx[:, None, None] + window[None, None, :]]


def place_outside(digit_boxes, rows, side, rng):
  """Random positions for side x side fragments not overlapping the digit's box.

  Returns (tops, lefts, keep); `keep` is False where every try overlapped.
  """
  tops_d, lefts_d, sizes_d = (a[rows] for a in digit_boxes)
  tops = np.zeros(len(rows), np.int64)
  lefts = np.zeros(len(rows), np.int64)
  placed = np.zeros(len(rows), bool)
  for _ in range(PLACEMENT_TRIES):
    ty = rng.integers(0, CANVAS - side + 1, len(rows))
    tx = rng.integers(0, CANVAS - side + 1, len(rows))
    apart = ((ty + side <= tops_d) | (ty >= tops_d + sizes_d) |
             (tx + side <= lefts_d) | (tx >= lefts_d + sizes_d))
    fresh = apart & ~placed
    tops[fresh], lefts[fresh] = ty[fresh], tx[fresh]
    placed |= fresh
  return tops, lefts, placed


def generate_split(split: str, num_images: int) -> Tuple[np.ndarray, np.ndarray]:
  """All images [N, 64, 64, 1] uint8 and labels [N] of `split`, as the builder writes them."""
  chunks = list(iterate_split(split, num_images))
  return (np.concatenate([images for images, _ in chunks]),
          np.concatenate([labels for _, labels in chunks]))


def iterate_split(split: str, num_images: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """Yields (images, labels) chunks of `split`, deterministic for this version.

  Chunk k has its own Generator seeded by (split, k), so memory stays bounded and the
  data does not depend on how a consumer batches it.
  """
  if split not in _SPLIT_SEEDS:
    raise ValueError(f"cluttered_digits has splits {sorted(_SPLIT_SEEDS)}, not {split!r}")
  glyphs, labels = load_glyphs()
  train_pool, test_pool = split_glyphs(labels)
  pool = train_pool if split == "train" else test_pool
  for chunk, start in enumerate(range(0, num_images, CHUNK)):
    rng = np.random.default_rng([_SPLIT_SEEDS[split], chunk])
    yield render(glyphs, labels, pool, min(CHUNK, num_images - start), rng)


class ClutteredDigits(tfds.core.GeneratorBasedBuilder):
  """UCI digits on a cluttered 64x64 canvas; train and test use disjoint glyphs."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      ClutteredDigitsConfig(name="default", description="50,000 train / 10,000 test images."),
      ClutteredDigitsConfig(name="tiny", train_size=1_000, test_size=300,
                            description="1,000 / 300 images, for tests."),
  ]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds finds a packaged builder's source through `importlib_resources`, which tfds
    # only declares for Python < 3.9 (etils[epath] would bring it). This file is the
    # answer anyway, and tfds then looks for a checksums file beside it: there is none.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(CANVAS, CANVAS, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=[str(d) for d in range(NUM_CLASSES)]),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,
        homepage="https://archive.ics.uci.edu/dataset/80",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything comes from scikit-learn's bundled copy: nothing to download
    return {
        "train": self._generate_examples("train", self.builder_config.train_size),
        "test": self._generate_examples("test", self.builder_config.test_size),
    }

  def _generate_examples(self, split: str, num_images: int) -> Iterator[Tuple[int, Dict]]:
    index = 0
    for images, labels in iterate_split(split, num_images):
      for image, label in zip(images, labels):
        yield index, {"image": image, "label": int(label)}
        index += 1


def builder(data_dir: Optional[str] = None, config: str = "default") -> ClutteredDigits:
  """The builder, set to write array_record (what grain and `tfds.data_source` read)."""
  return ClutteredDigits(config=config, data_dir=data_dir, file_format="array_record")


def build(data_dir: Optional[str] = None, config: str = "default") -> ClutteredDigits:
  """Builds the dataset into `data_dir` unless it is already there; returns the builder."""
  return prepare_once(lambda directory=data_dir: builder(directory, config))


def prepare_once(make_builder: Callable[..., tfds.core.DatasetBuilder]) -> tfds.core.DatasetBuilder:
  """Prepares a TFDS dataset as array_record unless it is there; returns a builder that reads it.

  `make_builder()` makes the builder of the dataset's data_dir (local or a bucket), and
  `make_builder(other_dir)` the same builder for another data_dir.

  Processes that share the data_dir (pytest-xdist workers, trainers on several hosts) would
  race if they built into it: tfds deletes "incomplete" files it finds, and the loser's final
  rename fails. No lock works on every storage (object storage has none), so each process
  builds into a private temporary data_dir and then publishes the finished version folder:
  on a local disk by one atomic rename, which only one process wins; in a bucket by copying
  its files, dataset_info.json last (tfds counts a version as prepared once that file is
  there). A process that finds the dataset published meanwhile uses that copy.
  """
  dataset_builder = make_builder()
  if dataset_builder.is_prepared():
    return dataset_builder
  final = epath.Path(dataset_builder.data_path)  # {data_dir}/{name}/{config}/{version}
  root = epath.Path(dataset_builder.data_dir_root)
  remote = paths.is_remote(root)
  # A bucket's dataset is built on local disk and uploaded; a local one next to its final
  # place, so that publishing it is a rename on the same filesystem.
  private = (epath.Path(tempfile.mkdtemp(prefix="vitoken-build-")) if remote
             else root / f".vitoken-build-{uuid.uuid4().hex}")
  try:
    building = make_builder(os.fspath(private))
    # Manually downloaded files stay where tfds looks for them: {data_dir}/downloads/manual.
    building.download_and_prepare(file_format="array_record", download_dir=root / "downloads")
    built = epath.Path(building.data_path)
    if not make_builder().is_prepared():  # a fresh builder: another process may have won
      _publish(built, final, remote)
      defaults = built.parent.parent / ".config"
      if defaults.is_dir() and not (final.parent.parent / ".config").exists():
        _publish(defaults, final.parent.parent / ".config", remote, marker=None)
  finally:
    if private.exists():
      private.rmtree()
  # A fresh builder: one made before the dataset was published has no split info.
  return make_builder()


def _publish(built: epath.Path, final: epath.Path, remote: bool,
             marker: Optional[str] = "dataset_info.json") -> None:
  """Puts the folder `built` at `final`; in a bucket the `marker` file is copied last."""
  if not remote:
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
      built.rename(final)
    except OSError as e:  # published meanwhile by another process: that copy is used
      if marker and built.exists() and not (final / marker).exists():
        raise RuntimeError(f"{final} holds an unfinished dataset (no dataset_info.json), left by "
                           "an interrupted build; delete it and build again") from e
    return
  files = sorted((p for p in built.iterdir() if not p.is_dir()),
                 key=lambda p: (p.name == marker, p.suffix == ".json", p.name))
  for source in files:
    paths.copy_file(source, final / source.name)
