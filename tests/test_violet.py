"""VIOLET-style masked visual-token modeling on clips (vitoken.models.violet, the `violet` task,
the space-time masks of vitoken.models.block_masking, configs/video.py:stage=tokenizer|violet).

- Masks: the space-time block rules against a reference written here from their statement
  (BEiT's `masking_generator.py` with a temporal extent: pure-Python lists, the cell loops
  written out), draw for draw with `random.Random`; VIOLET's blockwise masking against a
  transcription of tsujuifu/pytorch_violet `main_pretrain.py` (`Agent_Pretrain.masking`) on the
  same numpy RandomState draws; distributions (counts, cuboid extents over time and space); the
  pipeline field reproduced from the data position.
- Targets: each token's codes are the tokenizer's nearest centroids of its patch in each of its
  frames, computed in numpy frame by frame.
- Loss: the cross-entropy over masked tokens and their frames, by hand in numpy.
- A smoke pretraining that learns, its previews, fine-tuning from it, and the errors that name
  the setting.

No expected value here is computed by the code under test.
"""
import math
import os
import random

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import video
from tests.test_masked_modeling_train import flat, initial_params
from tests.test_train_loop import losses
from vitoken import tasks
from vitoken.data import pipeline
from vitoken.engine import checkpoint as ckpt_lib
from vitoken.engine.metrics import read_jsonl
from vitoken.errors import ConfigError
from vitoken.models import block_masking, violet
from vitoken.models.block_masking import GeneratorSource, SpaceTimeBlockMasking, VioletBlockMasking
from vitoken.tasks import masked_modeling
import vitoken.tokenizers
from vitoken.train import trainer

CODES = 16  # the test tokenizer's codebook: a meaningful ln(K) bound for a 12-step run
GRID = (2, 8, 8)  # 8 frames of 64 px in (4, 8, 8) tubelets
TUBELET = 4
BUDGET = 49  # round(75 / 196 * 128)


# ------------------------------------------------------------------ references


class RefSpaceTimeMasking:
  """BEiT's MaskingGenerator rules with cuboids: a volume from U(min, room), frames from
  randint(min_frames, max_frames), an aspect log-uniform; the face of area volume / frames is
  h = round(sqrt(area * aspect)) by w = round(sqrt(area / aspect)), strictly inside the spatial
  grid; then its first frame, top and left; kept when it adds 1 to `room` new tokens (10
  attempts); until the budget or a cuboid that adds nothing. `source` has uniform(a, b) and
  randint(a, b) (inclusive). Records every attempt and every accepted cuboid."""

  def __init__(self, grid, budget, min_patches=16, max_patches=None, min_aspect=0.3,
               min_frames=1, max_frames=None):
    self.time, self.height, self.width = grid
    self.budget = budget
    self.min_patches = min_patches
    self.max_patches = budget if max_patches is None else max_patches
    self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    self.min_frames = min_frames
    self.max_frames = self.time if max_frames is None else max_frames
    self.attempts = []  # (frames, h, w, aspect) of every attempt
    self.blocks = []  # (first, top, left, frames, h, w, added) of every accepted cuboid

  def _mask(self, mask, room, source):
    delta = 0
    for _ in range(10):
      volume = source.uniform(self.min_patches, room)
      frames = source.randint(self.min_frames, self.max_frames)
      aspect = math.exp(source.uniform(*self.log_aspect))
      h = int(round(math.sqrt(volume / frames * aspect)))
      w = int(round(math.sqrt(volume / frames / aspect)))
      self.attempts.append((frames, h, w, aspect))
      if w < self.width and h < self.height:
        first = source.randint(0, self.time - frames)
        top = source.randint(0, self.height - h)
        left = source.randint(0, self.width - w)
        cells = [(f, i, j) for f in range(first, first + frames) for i in range(top, top + h)
                 for j in range(left, left + w)]
        num_masked = sum(mask[f][i][j] for f, i, j in cells)
        if 0 < len(cells) - num_masked <= room:
          added = 0
          for f, i, j in cells:
            if mask[f][i][j] == 0:
              mask[f][i][j] = 1
              added += 1
          delta += added
          self.blocks.append((first, top, left, frames, h, w, added))
      if delta > 0:
        break
    return delta

  def __call__(self, source):
    mask = [[[0] * self.width for _ in range(self.height)] for _ in range(self.time)]
    count = 0
    while count < self.budget:
      delta = self._mask(mask, min(self.budget - count, self.max_patches), source)
      if delta == 0:
        break
      count += delta
    return mask


def ref_violet_masking(_T, _h, _w, rs):
  """pytorch_violet main_pretrain.py, Agent_Pretrain.masking, the blockwise branch's mask_mvm
  (np.random replaced by the RandomState `rs`) as a [T, h, w] 0/1 cover."""
  mask_mvm = set()
  for _ in range(_T):
    t, h, w = [rs.randint(1, _T) if _T > 1 else 1,
               rs.randint(1, _h * 2 // 3), rs.randint(1, _w * 2 // 3)]
    t1, h1, w1 = [rs.randint(0, _T - t + 1),
                  rs.randint(0, _h - h + 1), rs.randint(0, _w - w + 1)]
    for i_t in range(t1, t1 + t):
      for i_h in range(h1, h1 + h):
        for i_w in range(w1, w1 + w):
          mask_mvm.add((i_t, i_h, i_w))
  cov = np.zeros((_T, _h, _w))
  for i_t, i_h, i_w in mask_mvm:
    cov[i_t][i_h][i_w] = 1.0
  return cov


class ExclusiveRandint:
  """The project's source interface (randint inclusive) over a RandomState that the reference
  calls with numpy's exclusive upper bounds."""

  def __init__(self, rs):
    self.rs = rs

  def randint(self, a, b):
    return self.rs.randint(a, b + 1)

  def uniform(self, a, b):
    raise AssertionError("VIOLET's masking draws no uniforms")


def np_cross_entropy(logits, codes):
  z = np.asarray(logits, np.float64)
  top = z.max(axis=-1, keepdims=True)
  log_softmax = z - top - np.log(np.exp(z - top).sum(axis=-1, keepdims=True))
  return -np.take_along_axis(log_softmax, np.asarray(codes)[..., None], axis=-1)[..., 0]


def np_violet_loss(logits, codes, mask):
  """Mean cross-entropy over every (masked token, frame): logits [B, L, t, K], codes [B, L, t]."""
  ce = np_cross_entropy(logits, codes)  # [B, L, t]
  picked = [ce[b, i, f] for b in range(ce.shape[0]) for i in range(ce.shape[1])
            for f in range(ce.shape[2]) if mask[b, i] > 0]
  return float(np.mean(picked)) if picked else 0.0


def np_kmeans_frame_codes(frames, centroids, patch=8, eps=0.1):
  """[N, h*w] nearest centroids of a batch of frames' contrast-normalised patches, and each
  patch's margin to its second-nearest centroid."""
  x = np.asarray(frames, np.float64)
  n, h, w, c = x.shape
  x = x.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(n, -1, patch * patch * c)
  x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
  d = ((x[:, :, None, :] - np.asarray(centroids, np.float64)[None, None]) ** 2).sum(-1)
  near = np.sort(d, axis=-1)
  return d.argmin(axis=-1), near[..., 1] - near[..., 0]


# ------------------------------------------------------------------ 1. space-time masks


@pytest.mark.parametrize("grid,budget,kwargs", [
    (GRID, BUDGET, {}),
    ((4, 6, 6), 50, {"min_patches": 8}),
    ((3, 8, 8), 60, {"min_patches": 10, "max_patches": 30, "min_aspect": 0.5,
                     "min_frames": 2, "max_frames": 3}),
    ((1, 8, 8), 24, {}),
], ids=["video_py", "4x6x6", "bounded", "one_slice"])
def test_space_time_blocks_equal_the_reference_draw_for_draw(grid, budget, kwargs):
  ours = SpaceTimeBlockMasking(grid, budget, **kwargs)
  ref = RefSpaceTimeMasking(grid, budget, **kwargs)
  for seed in range(150):
    a, b = random.Random(seed), random.Random(seed)
    got = ours(a)
    want = np.asarray(ref(b), bool)
    assert got.shape == tuple(grid) and got.dtype == bool
    np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}")
    assert a.random() == b.random()  # the same number of draws


def test_violet_masking_equals_the_reference_on_the_same_draws():
  for grid in [GRID, (4, 7, 9), (1, 6, 6), (8, 14, 14)]:
    ours = VioletBlockMasking(grid)
    for seed in range(100):
      rs_ours, rs_ref = np.random.RandomState(seed), np.random.RandomState(seed)
      got = ours(ExclusiveRandint(rs_ours))
      want = ref_violet_masking(*grid, rs_ref)
      np.testing.assert_array_equal(got, want > 0, err_msg=f"{grid} seed {seed}")
      assert rs_ours.randint(1 << 30) == rs_ref.randint(1 << 30)


def test_space_time_mask_distribution():
  """Over 2,000 clips of video.py's grid: never above the budget, near it on average; cuboids
  of both temporal extents, inside the grid, with BEiT's aspect range; masks over time."""
  ref = RefSpaceTimeMasking(GRID, BUDGET)
  source = GeneratorSource(np.random.default_rng(0))
  counts, same, differ = [], 0, 0
  for _ in range(2000):
    mask = np.asarray(ref(source), bool)
    counts.append(mask.sum())
    if mask[0].any() and mask[1].any():
      same += np.array_equal(mask[0], mask[1])
      differ += not np.array_equal(mask[0], mask[1])
  counts = np.asarray(counts)
  assert counts.max() <= BUDGET and counts.min() >= 1
  assert 0.85 * BUDGET < counts.mean() <= BUDGET, counts.mean()
  attempts = np.asarray([a[0] for a in ref.attempts])
  # Every attempt draws its frames uniformly from {1, 2}.
  assert abs((attempts == 2).mean() - 0.5) < 0.03, (attempts == 2).mean()
  blocks = np.asarray([b[:6] for b in ref.blocks])
  first, top, left, frames, h, w = blocks.T
  assert set(frames) == {1, 2} and 0.2 < (frames == 2).mean() < 0.8
  assert (first + frames <= GRID[0]).all() and (first >= 0).all()
  assert (h < GRID[1]).all() and (w < GRID[2]).all() and (h >= 1).all() and (w >= 1).all()
  assert (top + h <= GRID[1]).all() and (left + w <= GRID[2]).all()
  aspects = np.asarray([a[3] for a in ref.attempts])
  assert aspects.min() >= 0.3 - 1e-9 and aspects.max() <= 1 / 0.3 + 1e-9
  # Cuboids over both slices give clips masked alike in both; one-slice ones differ.
  assert same > 100 and differ > 100, (same, differ)
  # One slice's cuboids: a position hidden in one slice can show in the other.
  assert ((frames == 1) & (first == 1)).any() and ((frames == 1) & (first == 0)).any()


def test_violet_masking_distribution():
  """VIOLET's rule on a 4 x 9 x 9 grid: 4 cuboids of 1 to 3 slices and 1 to 5 rows/columns,
  so at most 4 * 3 * 25 tokens; every clip masks something."""
  gen = VioletBlockMasking((4, 9, 9))
  source = GeneratorSource(np.random.default_rng(1))
  counts = np.asarray([gen(source).sum() for _ in range(1000)])
  assert counts.min() >= 1 and counts.max() <= 300
  # The extents each clip draws (t, h, w, then t1, top, left per cuboid): t <= T - 1, so one
  # cuboid never hides a position in every slice; h, w < 2/3 of the grid.
  draws = []

  class Recording:
    def randint(self, a, b):
      draws.append((a, b, source.randint(a, b)))
      return draws[-1][2]

  for _ in range(200):
    gen(Recording())
  extents = np.asarray([d[2] for d in draws]).reshape(-1, 6)[:, :3]
  assert extents.min() == 1 and set(extents[:, 0]) == {1, 2, 3}
  assert set(extents[:, 1]) == set(extents[:, 2]) == {1, 2, 3, 4, 5}


def _task(tokenizer="/no/tokenizer", image_shape=(8, 64, 64, 1), model=None, **settings):
  info = pipeline.DataInfo(num_classes=0, image_shape=image_shape, train_examples=0,
                           eval_examples=0)
  config = ml_collections.ConfigDict({
      "model": model or dict(video.ENCODER, depth=1, patch_size=video.VIDEO_PATCH),
      "task": dict(video.VIOLET, tokenizer=tokenizer, **settings),
      "data": {"name": "moving_digits/tiny"}, "eval_model_overrides": {}})
  return tasks.build(config, info)


def test_pipeline_field_is_the_space_time_masks_of_the_batch_generator():
  task = _task()
  fields = task.batch_fields()
  assert isinstance(fields, masked_modeling.BlockMasks)
  batch = {"image": np.zeros((6, 8, 64, 64, 1), np.float32)}
  mask = fields(dict(batch), np.random.default_rng(5))["patch_mask"]
  assert mask.shape == (6, 128) and mask.dtype == np.float32
  ref = RefSpaceTimeMasking(GRID, BUDGET)
  source = GeneratorSource(np.random.default_rng(5))
  want = np.stack([np.asarray(ref(source), np.float32).reshape(-1) for _ in range(6)])
  np.testing.assert_array_equal(mask, want)  # time-major: slice, then row-major positions
  np.testing.assert_array_equal(fields(dict(batch), np.random.default_rng(5))["patch_mask"], mask)
  assert not np.array_equal(fields(dict(batch), np.random.default_rng(6))["patch_mask"], mask)
  # VIOLET's own masking and a ratio.
  assert isinstance(_task(masking="violet").masks, VioletBlockMasking)
  assert _task(mask_ratio=0.6).masks.budget == round(0.6 * 128)


def test_pipeline_masks_are_reproduced_from_the_data_position():
  c = video.get_config("stage=violet,tokenizer=/no/tokenizer,runlocal")
  task = _task()

  def masks(seed):
    it = pipeline.train_iterator(c.data, global_batch_size=4, seed=seed, labels=False,
                                 batch_fields=task.batch_fields())
    return [next(it)["patch_mask"] for _ in range(2)]

  first = masks(0)
  for a, b in zip(first, masks(0)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first[0], first[1])
  assert not np.array_equal(masks(1)[0], first[0])
  assert first[0].shape == (4, 128) and (first[0].sum(1) <= BUDGET).all()


# ------------------------------------------------------------------ 2. targets and loss


def test_tubelet_codes_gather_each_tokens_frames():
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 100, (2, 8, 6)).astype(np.int32)  # [B, T, h*w]
  got = np.asarray(violet.tubelet_codes(jnp.asarray(frames), 4))
  assert got.shape == (2, 2 * 6, 4)
  for b in range(2):
    for s in range(2):
      for p in range(6):
        for f in range(4):
          assert got[b, s * 6 + p, f] == frames[b, s * 4 + f, p]
  np.testing.assert_array_equal(np.asarray(violet.frame_codes(jnp.asarray(got), 6)), frames)


def test_loss_is_the_cross_entropy_over_masked_tokens_and_their_frames():
  rng = np.random.default_rng(1)
  b, length, t, k = 3, 10, 4, 7
  logits = (rng.normal(size=(b, length, t, k)) * 3).astype(np.float32)
  codes = rng.integers(0, k, (b, length, t)).astype(np.int32)
  mask = (rng.random((b, length)) < 0.4).astype(np.float32)
  mask[0, :3], mask[1] = 1, 0
  got = float(violet.loss(jnp.asarray(logits), jnp.asarray(codes), jnp.asarray(mask)))
  assert got == pytest.approx(np_violet_loss(logits, codes, mask), rel=1e-5)
  total, count = violet.per_example_loss(jnp.asarray(logits), jnp.asarray(codes),
                                         jnp.asarray(mask))
  ce = np_cross_entropy(logits, codes)
  np.testing.assert_allclose(total, (ce * mask[..., None]).sum(axis=(1, 2)), rtol=1e-5)
  np.testing.assert_array_equal(count, mask.sum(1) * t)
  correct, _ = violet.code_accuracy(jnp.asarray(logits), jnp.asarray(codes), jnp.asarray(mask))
  np.testing.assert_array_equal(correct, ((logits.argmax(-1) == codes) * mask[..., None]).sum((1, 2)))
  # A frame's logits that change only at visible tokens leave the loss as it is.
  changed = logits.copy()
  changed[mask == 0] += rng.normal(size=changed[mask == 0].shape).astype(np.float32)
  assert float(violet.loss(jnp.asarray(changed), jnp.asarray(codes), jnp.asarray(mask))) == (
      pytest.approx(got, rel=1e-6))


def test_model_predicts_every_frame_of_every_token():
  model = violet.VIOLET(encoder=dict(video.ENCODER, depth=1, patch_size=video.VIDEO_PATCH,
                                    channels=1),
                        codebook_size=CODES)
  rng = np.random.default_rng(2)
  clips = rng.normal(size=(2, 8, 64, 64, 1)).astype(np.float32)
  codes = rng.integers(0, CODES, (2, 128, TUBELET)).astype(np.int32)
  mask = (rng.random((2, 128)) < 0.4).astype(np.float32)
  params = model.init(jax.random.key(0), clips, codes, mask)["params"]
  assert sorted(params) == ["encoder", "lm_head"]
  assert params["lm_head"]["kernel"].shape == (64, TUBELET * CODES)
  loss, logits, got_mask = model.apply({"params": params}, clips, codes, mask)
  assert logits.shape == (2, 128, TUBELET, CODES)
  np.testing.assert_array_equal(got_mask, mask)
  assert float(loss) == pytest.approx(np_violet_loss(np.asarray(logits), codes, mask), rel=1e-5)


# ------------------------------------------------------------------ 3. runs


def _violet_config(tokenizer, **task):
  c = video.get_config(f"stage=violet,tokenizer={tokenizer},runlocal")
  c.progress_bar = False
  c.checkpoint.async_save = False
  c.task.update(task)
  return c


def _tokenizer_config(**task):
  c = video.get_config("stage=tokenizer,runlocal")
  c.progress_bar = False
  c.checkpoint.async_save = False
  c.task.codebook_size = CODES
  c.task.update(task)
  return c


@pytest.fixture(scope="module")
def violet_tokenizer(tmp_path_factory):
  """(workdir, summary) of configs/video.py:stage=tokenizer,runlocal cut to 16 codes."""
  workdir = tmp_path_factory.mktemp("violet_tokenizer")
  return workdir, vitoken.tokenizers.fit(_tokenizer_config(), str(workdir))


@pytest.fixture(scope="module")
def violet_run(violet_tokenizer, tmp_path_factory):
  """(workdir, summary) of configs/video.py:stage=violet,runlocal (12 steps of 32 clips)."""
  workdir = tmp_path_factory.mktemp("violet_run")
  return workdir, trainer.run(_violet_config(violet_tokenizer[0]), str(workdir))


def test_targets_are_the_tokenizers_codes_frame_by_frame(violet_tokenizer):
  c = _violet_config(violet_tokenizer[0])
  task = tasks.build(c, pipeline.dataset_info(c.data))
  frozen = task.frozen_params()
  batch = next(pipeline.eval_iterator(c.data, global_batch_size=3, labels=False,
                                      batch_fields=task.batch_fields()))
  clips = np.asarray(batch["image"])
  codes = np.asarray(jax.jit(task.codes)(frozen, clips))
  assert codes.shape == (3, 128, TUBELET)
  centroids = np.asarray(frozen["tokenizer"]["centroids"])
  clear = 0
  for b in range(3):
    want, margin = np_kmeans_frame_codes(clips[b], centroids)  # [8 frames, 64 patches]
    for s in range(2):
      for p in range(64):
        for f in range(TUBELET):
          if margin[s * TUBELET + f, p] > 1e-4:
            clear += 1
            assert codes[b, s * 64 + p, f] == want[s * TUBELET + f, p], (b, s, p, f)
  assert clear > 0.99 * 3 * 128 * TUBELET


def test_pretraining_learns_the_codes(violet_run, violet_tokenizer):
  workdir, summary = violet_run
  assert summary["task"] == "violet" and summary["final_step"] == 12
  train = losses(workdir)
  evals = [r for r in read_jsonl(str(workdir / "metrics.jsonl")) if r["split"] == "eval"]
  assert len(train) == 6 and all(np.isfinite(train))
  chance = np.log(CODES)
  assert train[-1] < train[0] and train[-1] < chance, train
  assert evals[-1]["loss"] < chance and evals[-1]["loss"] < evals[0]["loss"], evals
  ev = summary["eval"]
  assert 0 < ev["masked_share"] <= BUDGET / 128 + 1e-6
  assert 0 <= ev["code_accuracy"] <= 1 and 1 <= ev["target_perplexity"] <= CODES
  params = ckpt_lib.load_params(str(workdir))
  assert sorted(params) == ["encoder", "lm_head"]
  assert params["lm_head"]["kernel"].shape == (video.ENCODER["width"], TUBELET * CODES)
  previews = workdir / "previews"
  assert sorted(os.listdir(previews)) == ["reconstructions.png", "reconstructions_000006.png",
                                          "reconstructions_000012.png"]
  picture = np.asarray(Image.open(previews / "reconstructions.png").convert("RGB"), np.float32)
  # Two clips of three rows of 8 frames (64 px, shown at 2x with 2 px gaps).
  assert picture.shape[1] == 2 * (8 * 64 + 7 * 2) and picture.std() > 2


def test_eval_sums_and_preview_against_numpy(violet_run, violet_tokenizer):
  workdir, _ = violet_run
  c = _violet_config(violet_tokenizer[0])
  task = tasks.build(c, pipeline.dataset_info(c.data))
  params, frozen = ckpt_lib.load_params(str(workdir)), task.frozen_params()
  batch = next(pipeline.eval_iterator(c.data, global_batch_size=4, labels=False,
                                      batch_fields=task.batch_fields()))
  batch["mask"] = np.array([True, True, True, False])
  (_, logits, mask, codes), sums = jax.device_get(jax.jit(
      lambda p, f, b: (task.forward(p, f, b, None, train=False), task.eval_sums(p, f, b, None)))(
          params, frozen, batch))
  np.testing.assert_array_equal(mask, batch["patch_mask"])
  ce = np_cross_entropy(logits, codes)
  per_clip = [(ce[b] * mask[b][:, None]).sum() / (mask[b].sum() * TUBELET) for b in range(3)]
  np.testing.assert_allclose(sums["loss_sum"], sum(per_clip), rtol=1e-5)
  assert float(sums["count"]) == 3
  np.testing.assert_array_equal(sums["code_counts"],
                                np.bincount(codes[:3].ravel(), minlength=CODES))
  # The preview decodes, frame by frame, the predicted codes at masked tokens and the clip's own
  # codes elsewhere: each 8 px patch is its code's centroid at the patch's mean and contrast.
  arrays = jax.device_get(task.preview(params, batch))
  k = task.preview_examples
  clips = np.asarray(batch["image"][:k], np.float64)
  predicted = np.where(mask[:k, :, None] > 0, logits[:k].argmax(-1), codes[:k])
  centroids = np.asarray(frozen["tokenizer"]["centroids"], np.float64)
  want = np.zeros_like(clips)
  for b in range(k):
    for s in range(2):
      for r in range(8):
        for col in range(8):
          for f in range(TUBELET):
            frame = s * TUBELET + f
            px = clips[b, frame, r * 8:(r + 1) * 8, col * 8:(col + 1) * 8, 0]
            shape = centroids[predicted[b, s * 64 + r * 8 + col, f]].reshape(8, 8)
            want[b, frame, r * 8:(r + 1) * 8, col * 8:(col + 1) * 8, 0] = (
                shape * np.sqrt(px.var() + 0.1) + px.mean())
            hidden = mask[b, s * 64 + r * 8 + col]
            assert (arrays["pixel_mask"][b, frame, r * 8:(r + 1) * 8, col * 8:(col + 1) * 8]
                    == hidden).all()
  np.testing.assert_allclose(arrays["reconstruction"], want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(arrays["masked"], clips * (1 - arrays["pixel_mask"]), atol=1e-6)


def test_finetune_starts_from_the_violet_encoder(violet_run, tmp_path):
  workdir, _ = violet_run
  c = video.get_config(f"stage=finetune,init={workdir},runlocal")
  c.progress_bar = False
  got, _ = initial_params(c, tmp_path / "finetune")
  encoder = flat(ckpt_lib.load_params(str(workdir))["encoder"])
  unused = {"encoder_norm/bias", "encoder_norm/scale", "mask_token/mask_token"}
  assert set(encoder) - set(got) == unused
  fresh = ("fc_norm/", "head/")
  from_encoder = [k for k in got if not k.startswith(fresh)]
  assert set(from_encoder) == set(encoder) - unused
  for key in from_encoder:
    np.testing.assert_array_equal(got[key], encoder[key], err_msg=key)


# ------------------------------------------------------------------ 4. errors


@pytest.fixture(scope="module")
def tokenizer_4px(tmp_path_factory):
  """A one-step k-means tokenizer over 4 px patches."""
  workdir = tmp_path_factory.mktemp("violet_tokenizer_4px")
  c = _tokenizer_config(patch_size=4)
  c.total_steps = 1
  vitoken.tokenizers.fit(c, str(workdir))
  return workdir


def test_a_tokenizer_of_another_patch_or_channels_is_named(violet_tokenizer, tokenizer_4px, tmp_path):
  with pytest.raises(ConfigError, match=rf"task violet: the tokenizer at {tokenizer_4px} "
                                        r"\(config.task.tokenizer\) codes 4x4 patches of a frame, "
                                        r"but the video model's patch_size \(4, 8, 8\) "
                                        r"\(config.model\) has 8x8"):
    trainer.Trainer(_violet_config(tokenizer_4px), str(tmp_path / "w"))
  task = _task(str(violet_tokenizer[0]), image_shape=(8, 64, 64, 3))
  with pytest.raises(ConfigError, match=r"codes frames of 1 channels, but the clips "
                                        r"\(config.data\) have 3"):
    task.tokenizer()


@pytest.mark.parametrize("settings,pattern", [
    ({"mask_ratio": 1.5}, r"task mask_ratio must be a number in \(0, 1\), got 1.5"),
    ({"mask_ratio": 0.0}, r"task mask_ratio must be a number in \(0, 1\)"),
    ({"masking": "tube"}, r"task masking must be one of \('block', 'violet'\), got 'tube'"),
    ({"masking": "violet", "mask_ratio": 0.5}, r"mask_ratio is the budget of masking='block'"),
    ({"max_block_frames": 3}, r"max_block_frames 3 is more than the 2 time slices"),
    ({"min_block_frames": 0}, r"min_block_frames must be a positive int"),
    ({"min_aspect": -1.0}, r"min_aspect must be a positive number"),
    ({"min_block_patches": 0}, r"min_block_patches must be a positive int"),
    ({"tokenizer": None}, r"task violet needs `tokenizer` \(config.task.tokenizer\)"),
], ids=lambda v: str(v)[:40])
def test_bad_settings_name_the_setting(settings, pattern):
  with pytest.raises(ConfigError, match=pattern):
    _task(**settings)


def test_bad_inputs_name_the_setting():
  with pytest.raises(ConfigError, match=r"task violet pretrains on clips.*\(64, 64, 1\)"):
    _task(image_shape=(64, 64, 1))
  with pytest.raises(ConfigError, match=r"config.model needs a tubelet patch_size \(t, p, p\)"):
    _task(model=dict(video.ENCODER, depth=1))
  with pytest.raises(ValueError, match=r"do not split into tubelets of 3 frames"):
    _task(model=dict(video.ENCODER, depth=1, patch_size=(3, 8, 8)))
  with pytest.raises(ConfigError, match=r"at least 3x3"):
    block_masking.VioletBlockMasking((2, 2, 8))


@pytest.mark.parametrize("arg,pattern", [
    ("stage=violet", r"stage=violet predicts a visual tokenizer's codes: pass tokenizer="),
    ("stage=pretrain,tokenizer=/t", r"tokenizer is stage=violet's setting"),
    ("stage=violet,tokenizer=/t,masking=tube", r"masking must be one of \('block', 'violet'\)"),
    ("stage=pretrain,masking=block", r"masking must be one of \('tube', 'frame'\)"),
    ("stage=scratch,masking=tube", r"masking is a pretraining setting"),
    ("stage=tokenizer,tl=8", r"stage=tokenizer fits k-means on single frames; it takes no \['tl'\]"),
])
def test_config_arguments_are_checked(arg, pattern):
  with pytest.raises(ValueError, match=pattern):
    video.get_config(arg)


def test_configs_build_the_stages():
  c = video.get_config("stage=violet,tokenizer=/t")
  assert c.task.to_dict() == dict(video.VIOLET, masking="block", tokenizer="/t")
  assert c.total_steps == 2000 and c.data.name == "moving_digits"
  assert tuple(c.model["patch_size"]) == video.VIDEO_PATCH
  assert video.get_config("stage=violet,tokenizer=/t,masking=violet").task.masking == "violet"
  t = video.get_config("stage=tokenizer")
  assert t.task.name == "kmeans_tokenizer" and t.task.patch_size == video.VIDEO_PATCH[1]
  assert t.data.name == "cluttered_digits" and t.total_steps == 300
  assert video.get_config("stage=pretrain").task.masking == "tube"
