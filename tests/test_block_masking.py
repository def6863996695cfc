"""BEiT's block-wise masking (vitoken.models.block_masking) against an independent reference
written here from the rules of microsoft/unilm `beit/masking_generator.py` (MaskingGenerator):
draw-for-draw equality with `random.Random`, statistics over many numpy-driven masks, the rules
checked on the project's own recorded draws (aspect range, strict fit, room, 10 attempts, the
mask as a union of accepted rectangles), the default budget, the "patch_mask" batch field, the
BEiT task's settings, and input errors.

No expected value here is computed by vitoken itself.
"""
import math
import random

import ml_collections
import numpy as np
import pytest
import scipy.stats

from vitoken import tasks
from vitoken.data import pipeline
from vitoken.models import block_masking
from vitoken.models.block_masking import BlockMasking, GeneratorSource, default_budget
from vitoken.tasks import masked_modeling


# ------------------------------ reference (microsoft/unilm beit/masking_generator.py) -----------
class RefMaskingGenerator:
  """MaskingGenerator's rules; `source` has uniform(a, b) and randint(a, b) (inclusive) like the
  `random` module the reference calls. Plain Python lists, the cell loop written out."""

  def __init__(self, input_size, num_masking_patches, min_num_patches=4, max_num_patches=None,
               min_aspect=0.3, max_aspect=None):
    self.height, self.width = input_size
    self.num_masking_patches = num_masking_patches
    self.min_num_patches = min_num_patches
    self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
    max_aspect = max_aspect or 1 / min_aspect
    self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
    self.blocks = []  # (top, left, h, w, added) of every accepted block of the last call

  def _mask(self, mask, max_mask_patches, source):
    delta = 0
    for _ in range(10):
      target_area = source.uniform(self.min_num_patches, max_mask_patches)
      aspect_ratio = math.exp(source.uniform(*self.log_aspect_ratio))
      h = int(round(math.sqrt(target_area * aspect_ratio)))
      w = int(round(math.sqrt(target_area / aspect_ratio)))
      if w < self.width and h < self.height:
        top = source.randint(0, self.height - h)
        left = source.randint(0, self.width - w)
        num_masked = sum(mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
        if 0 < h * w - num_masked <= max_mask_patches:
          added = 0
          for i in range(top, top + h):
            for j in range(left, left + w):
              if mask[i][j] == 0:
                mask[i][j] = 1
                added += 1
          delta += added
          self.blocks.append((top, left, h, w, added))
        if delta > 0:
          break
    return delta

  def __call__(self, source):
    self.blocks = []
    mask = [[0] * self.width for _ in range(self.height)]
    mask_count = 0
    while mask_count < self.num_masking_patches:
      max_mask_patches = min(self.num_masking_patches - mask_count, self.max_num_patches)
      delta = self._mask(mask, max_mask_patches, source)
      if delta == 0:
        break
      mask_count += delta
    return np.array(mask, dtype=np.int64)


def ref_budget(grid):
  """BEiT's 75 masked of 14 x 14 = 196 patches, scaled to the grid."""
  return max(1, int(round(75 * grid[0] * grid[1] / 196)))


class Recorder:
  """Wraps a source and records every draw as (kind, a, b, value)."""

  def __init__(self, source):
    self.source, self.log = source, []

  def uniform(self, a, b):
    value = self.source.uniform(a, b)
    self.log.append(("uniform", a, b, value))
    return value

  def randint(self, a, b):
    value = self.source.randint(a, b)
    self.log.append(("randint", a, b, value))
    return value


# (grid, budget (None: the default), min_patches, max_patches, min_aspect)
SETTINGS = [
    ((14, 14), 75, 16, None, 0.3),  # BEiT's ImageNet setting
    ((8, 8), None, 16, None, 0.3),  # default budget 24
    ((8, 8), None, 4, None, 0.3),
    ((6, 10), 20, 4, None, 0.3),  # uneven grids
    ((10, 7), 30, 16, None, 0.5),
    ((14, 14), 75, 4, 20, 0.3),  # a cap on the block size
    ((12, 12), 60, 4, 12, 0.5),
    ((3, 3), 8, 1, None, 0.3),  # a tiny grid: blocks of at most 2 x 2 fit
]
IDS = [f"{g[0]}x{g[1]}-b{b}-min{m}-max{x}-a{a}" for g, b, m, x, a in SETTINGS]


def project(grid, budget, min_patches, max_patches, min_aspect):
  return BlockMasking(grid, budget, min_patches, max_patches, min_aspect)


def reference(grid, budget, min_patches, max_patches, min_aspect):
  budget = ref_budget(grid) if budget is None else budget
  return RefMaskingGenerator(grid, budget, min_patches, max_patches, min_aspect)


# ------------------------------------------------------------------ 1. draw-for-draw equality
@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_matches_reference_with_random_random(setting):
  gen, ref = project(*setting), reference(*setting)
  for seed in range(200):
    a, b = random.Random(seed), random.Random(seed)
    got = gen(a)
    want = ref(b)
    assert got.shape == setting[0] and got.dtype == bool
    np.testing.assert_array_equal(got.astype(np.int64), want, err_msg=f"seed {seed}")
    # the same number of draws: the next draw of both generators agrees
    assert a.random() == b.random(), f"seed {seed}: a different number of draws"


@pytest.mark.parametrize("setting", SETTINGS[:4], ids=IDS[:4])
def test_matches_reference_with_numpy_generators(setting):
  gen, ref = project(*setting), reference(*setting)
  for seed in range(50):
    got = gen(GeneratorSource(np.random.default_rng(seed)))
    want = ref(GeneratorSource(np.random.default_rng(seed)))
    np.testing.assert_array_equal(got.astype(np.int64), want, err_msg=f"seed {seed}")
  # batch: one mask after another from the same generator, flattened row-major, float32
  out = gen.batch(16, np.random.default_rng(7))
  source = GeneratorSource(np.random.default_rng(7))
  want = np.stack([ref(source).reshape(-1) for _ in range(16)])
  assert out.shape == (16, setting[0][0] * setting[0][1]) and out.dtype == np.float32
  np.testing.assert_array_equal(out, want.astype(np.float32))


def test_defaults_are_beits_imagenet_setting():
  gen = BlockMasking((14, 14))
  ref = RefMaskingGenerator((14, 14), 75, min_num_patches=16)
  for seed in range(50):
    np.testing.assert_array_equal(gen(random.Random(seed)).astype(np.int64),
                                  ref(random.Random(seed)))


def test_generator_source_draws():
  source = GeneratorSource(np.random.default_rng(0))
  ints = [source.randint(2, 5) for _ in range(2000)]
  assert set(ints) == {2, 3, 4, 5}  # both ends inclusive
  values = np.array([source.uniform(3.0, 7.0) for _ in range(2000)])
  assert values.min() >= 3.0 and values.max() <= 7.0 and abs(values.mean() - 5.0) < 0.15
  # like random.uniform, a > b draws in [b, a] (the area draw U(min_patches, room) can have
  # room < min_patches)
  values = np.array([source.uniform(16, 5) for _ in range(2000)])
  assert values.min() >= 5 and values.max() <= 16 and abs(values.mean() - 10.5) < 0.4
  assert source.randint(3, 3) == 3


# ------------------------------------------------------------------ 2. statistics of many masks
def _counts_and_freq(masks):
  masks = np.asarray(masks, np.float64)
  return masks.sum(axis=1), masks.mean(axis=0)


@pytest.mark.parametrize("setting", [SETTINGS[0], SETTINGS[1], SETTINGS[3], SETTINGS[5]],
                         ids=[IDS[0], IDS[1], IDS[3], IDS[5]])
def test_statistics_match_reference(setting):
  n = 2000
  grid = setting[0]
  gen, ref = project(*setting), reference(*setting)
  budget = gen.budget
  got = gen.batch(n, np.random.default_rng(1234))
  assert got.shape == (n, grid[0] * grid[1]) and got.dtype == np.float32
  assert set(np.unique(got)) <= {0.0, 1.0}
  rnd = random.Random(4321)  # the reference's own, independent draws
  want = np.stack([ref(rnd).reshape(-1) for _ in range(n)])
  got_counts, got_freq = _counts_and_freq(got)
  want_counts, want_freq = _counts_and_freq(want)

  assert got_counts.max() <= budget and want_counts.max() <= budget
  assert got_counts.min() >= 1

  # Means: two independent samples of n; the difference has standard error
  # sqrt(var_a / n + var_b / n). 4.5 of them bounds a sampling miss by ~1e-5 (the seeds are
  # fixed, so the test is deterministic; the margin keeps it valid for any seed).
  se = math.sqrt(got_counts.var(ddof=1) / n + want_counts.var(ddof=1) / n)
  assert abs(got_counts.mean() - want_counts.mean()) <= 4.5 * max(se, 0.05), (
      got_counts.mean(), want_counts.mean(), se)

  # Distributions of the count: quantiles within 2 patches, and a chi-square test of the two
  # histograms (sparse counts pooled into bins with >= 10 expected each) at p > 1e-3.
  for q in (0.05, 0.25, 0.5, 0.75, 0.95):
    assert abs(np.quantile(got_counts, q) - np.quantile(want_counts, q)) <= 2, q
  values = np.arange(budget + 1)
  table = np.stack([(got_counts[:, None] == values).sum(0), (want_counts[:, None] == values).sum(0)])
  bins, current = [], np.zeros(2)
  for col in table.T:
    current = current + col
    if current.sum() >= 20:
      bins.append(current)
      current = np.zeros(2)
  if current.sum():
    if bins:
      bins[-1] = bins[-1] + current
    else:
      bins.append(current)
  if len(bins) > 1:
    p = scipy.stats.chi2_contingency(np.stack(bins).T)[1]
    assert p > 1e-3, (p, np.stack(bins).T)
  # share of masks that spend the whole budget
  full_se = math.sqrt(0.5 / n)
  assert abs((got_counts == budget).mean() - (want_counts == budget).mean()) <= 4.5 * full_se

  # Where the masks fall: every cell's masking frequency within 4.5 standard errors of the
  # reference's (a top/left bias, e.g. an off-by-one in the placement, shows here).
  pooled = (got_freq + want_freq) / 2
  cell_se = np.sqrt(np.maximum(2 * pooled * (1 - pooled) / n, 1e-6))
  z = np.abs(got_freq - want_freq) / cell_se
  assert z.max() < 4.5, (z.max(), got_freq.reshape(grid), want_freq.reshape(grid))


# ------------------------------------------------------------------ 3. the rules, on recorded draws
def replay(log, grid, budget, min_patches, max_patches, min_aspect):
  """Checks the project's recorded draws against the rules, rebuilding the mask from them:
  returns (mask, accepted blocks (top, left, h, w, added), attempts of every block)."""
  gh, gw = grid
  lo, hi = math.log(min_aspect), math.log(1 / min_aspect)
  mask = np.zeros(grid, dtype=bool)
  count, i, attempts, blocks, per_block = 0, 0, 0, [], []
  while i < len(log):
    room = min(budget - count, max_patches)
    assert room >= 1
    kind, a, b, area = log[i]
    assert (kind, a, b) == ("uniform", min_patches, room), log[i]
    assert min(a, b) <= area <= max(a, b)
    kind, a, b, log_aspect = log[i + 1]
    assert kind == "uniform" and (a, b) == pytest.approx((lo, hi)), log[i + 1]
    assert lo - 1e-12 <= log_aspect <= hi + 1e-12  # the aspect draw is within the bounds
    h = int(round(math.sqrt(area * math.exp(log_aspect))))
    w = int(round(math.sqrt(area / math.exp(log_aspect))))
    i += 2
    attempts += 1
    if h < gh and w < gw:  # strict fit: only then is the block placed
      assert log[i][:3] == ("randint", 0, gh - h) and log[i + 1][:3] == ("randint", 0, gw - w)
      top, left = log[i][3], log[i + 1][3]
      assert 0 <= top <= gh - h and 0 <= left <= gw - w
      i += 2
      new = h * w - int(mask[top:top + h, left:left + w].sum())
      if 0 < new <= room:
        mask[top:top + h, left:left + w] = True
        count += new
        blocks.append((top, left, h, w, new))
        per_block.append(attempts)
        attempts = 0
    else:  # a block that does not fit draws no position
      assert i == len(log) or log[i][0] == "uniform", log[i]
    assert attempts <= 10
  if count < budget:  # stopped by a block that failed all its 10 attempts
    assert attempts == 10, (count, budget, attempts)
    per_block.append(attempts)
  else:
    assert count == budget and attempts == 0
  return mask, blocks, per_block


@pytest.mark.parametrize("numpy_source", [False, True])
@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_recorded_draws_follow_the_rules(setting, numpy_source):
  grid, _, min_patches, max_patches, min_aspect = setting
  gen = project(*setting)
  budget = gen.budget
  max_patches = budget if max_patches is None else max_patches
  ref = reference(*setting)
  saw_failed_attempt = saw_overlap = False
  for seed in range(40):
    base = (GeneratorSource(np.random.default_rng(seed)) if numpy_source
            else random.Random(seed))
    rec = Recorder(base)
    out = gen(rec)
    mask, blocks, per_block = replay(rec.log, grid, budget, min_patches, max_patches, min_aspect)
    # the mask is exactly the union of the accepted rectangles
    np.testing.assert_array_equal(out, mask)
    assert out.sum() == sum(b[-1] for b in blocks) <= budget
    for top, left, h, w, added in blocks:
      assert 1 <= h < grid[0] and 1 <= w < grid[1] and 1 <= added <= h * w
      assert out[top:top + h, left:left + w].all()
    saw_failed_attempt |= any(n > 1 for n in per_block)
    saw_overlap |= any(added < h * w for _, _, h, w, added in blocks)
    # the reference, fed the same draws, accepts the same blocks
    ref_rec = Recorder(random.Random(seed)) if not numpy_source else Recorder(
        GeneratorSource(np.random.default_rng(seed)))
    ref(ref_rec)
    assert ref_rec.log == rec.log
    assert [b for b in ref.blocks] == blocks
  if setting[0] == (14, 14):  # the retries and the overlaps are exercised, not only the easy path
    assert saw_failed_attempt and saw_overlap


class FirstBlockOnly:
  """random.Random that, once the first block is placed, only draws blocks too large to fit, so
  the generator stops with the first block alone in the mask."""

  def __init__(self, seed, grid):
    self.rnd, self.grid, self.log = random.Random(seed), grid, []
    self.stopped, self.calls_after = False, 0

  def uniform(self, a, b):
    if self.stopped:  # area, aspect, area, aspect, ...: area 1e6 at aspect 1 fits no grid
      self.calls_after += 1
      return 1e6 if self.calls_after % 2 else 0.0
    value = self.rnd.uniform(a, b)
    self.log.append(("uniform", a, b, value))
    return value

  def randint(self, a, b):
    assert not self.stopped, "a position drawn for a block that cannot fit"
    value = self.rnd.randint(a, b)
    self.log.append(("randint", a, b, value))
    if len(self.log) >= 4 and self.log[-2][0] == "randint":
      h, w = self.grid[0] - self.log[-2][2], self.grid[1] - b
      room = self.log[-4][2]
      if 0 < h * w <= room:  # on the empty mask, the first such block is accepted
        self.stopped = True
    return value


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_first_block_is_a_full_rectangle_obeying_the_rules(setting):
  grid, _, min_patches, max_patches, min_aspect = setting
  gen = project(*setting)
  room0 = min(gen.budget, gen.budget if max_patches is None else max_patches)
  lo, hi = math.log(min_aspect), math.log(1 / min_aspect)
  placed = 0
  for seed in range(100):
    source = FirstBlockOnly(seed, grid)
    out = gen(source)
    if not source.stopped:  # no block fit in 10 attempts (possible on tiny grids): empty mask
      assert not out.any()
      continue
    placed += 1
    (_, a0, b0, area), (_, a1, b1, log_aspect), (_, _, top_max, top), (_, _, left_max, left) = \
        source.log[-4:]
    assert (a0, b0) == (min_patches, room0)
    assert (a1, b1) == pytest.approx((lo, hi)) and lo <= log_aspect <= hi
    h, w = grid[0] - top_max, grid[1] - left_max
    assert h == int(round(math.sqrt(area * math.exp(log_aspect))))
    assert w == int(round(math.sqrt(area / math.exp(log_aspect))))
    assert 1 <= h < grid[0] and 1 <= w < grid[1] and h * w <= room0
    want = np.zeros(grid, bool)
    want[top:top + h, left:left + w] = True
    np.testing.assert_array_equal(out, want)
    # the attempts before it: at most 9, all unplaced or empty, each within the aspect bounds
    assert (len(source.log) - 4) <= 9 * 4
  assert placed >= 50


# ------------------------------------------------------------------ 4. default budget
@pytest.mark.parametrize("grid,want", [((14, 14), 75), ((8, 8), 24), ((16, 16), 98),
                                       ((28, 28), 300), ((7, 7), 19), ((6, 10), 23),
                                       ((10, 7), 27), ((1, 1), 1), ((2, 2), 2)])
def test_default_budget(grid, want):
  assert want == ref_budget(grid)
  assert default_budget(grid) == want
  assert BlockMasking(grid).budget == want
  assert default_budget(list(grid)) == want


def test_default_budget_scales_with_the_grid():
  for g in range(2, 40):
    assert default_budget((g, g)) == ref_budget((g, g))
    assert abs(default_budget((g, g)) / (g * g) - 75 / 196) <= 0.5 / (g * g) + 1e-12
  assert default_budget((28, 28)) == 4 * default_budget((14, 14))


# ------------------------------------------------------------------ 5. the batch field
def _batch(n=6):
  return {"image": np.zeros((n, 32, 48, 3), np.float32), "labels": np.ones((n, 10), np.float32),
          "mask": np.ones((n,), bool)}


def test_block_masks_field_is_reproducible_and_shaped():
  gen = BlockMasking((6, 10), 20, 4)
  field = masked_modeling.BlockMasks(gen)
  batch = _batch()
  a = field(batch, np.random.default_rng(3))
  b = field(batch, np.random.default_rng(3))
  c = field(batch, np.random.default_rng(4))
  assert set(a) == {"image", "labels", "mask", "patch_mask"}
  assert "patch_mask" not in batch  # the input batch is not modified
  for key in ("image", "labels", "mask"):
    assert a[key] is batch[key]
  pm = a["patch_mask"]
  assert pm.shape == (6, 60) and pm.dtype == np.float32
  assert set(np.unique(pm)) <= {0.0, 1.0}
  assert (pm.sum(axis=1) <= 20).all() and (pm.sum(axis=1) >= 1).all()
  np.testing.assert_array_equal(a["patch_mask"], b["patch_mask"])
  assert not np.array_equal(a["patch_mask"], c["patch_mask"])
  assert len({row.tobytes() for row in pm}) > 1  # examples get different masks
  # the same masks as the reference fed the same generator, one example after another
  ref = RefMaskingGenerator((6, 10), 20, 4)
  source = GeneratorSource(np.random.default_rng(3))
  np.testing.assert_array_equal(pm, np.stack([ref(source).reshape(-1) for _ in range(6)]))


def _beit_config(**task):
  c = ml_collections.ConfigDict()
  c.model = dict(variant="Ti/16", depth=1)
  c.task = dict(name="beit", tokenizer="/nonexistent/tokenizer", **task)
  return c


def test_beit_task_builds_the_masking_from_its_settings():
  info = pipeline.DataInfo(num_classes=10, image_shape=(96, 160, 3), train_examples=1,
                           eval_examples=1)
  task = tasks.build(_beit_config(mask_patches=25, min_block_patches=4, max_block_patches=12,
                                  min_aspect=0.5), info)
  m = task.masks
  assert m.grid == (6, 10) and m.budget == 25 and m.min_patches == 4 and m.max_patches == 12
  assert m.log_aspect == pytest.approx((math.log(0.5), math.log(2.0)))
  batch = {"image": np.zeros((5, 96, 160, 3), np.float32)}
  out = task.batch_fields()(batch, np.random.default_rng(11))
  ref = RefMaskingGenerator((6, 10), 25, 4, 12, 0.5)
  source = GeneratorSource(np.random.default_rng(11))
  np.testing.assert_array_equal(out["patch_mask"],
                                np.stack([ref(source).reshape(-1) for _ in range(5)]))
  # defaults: BEiT's 75 of 196 scaled to the grid, blocks of at least 16, aspect 0.3
  task = tasks.build(_beit_config(), info)
  assert task.masks.budget == ref_budget((6, 10)) and task.masks.min_patches == 16
  assert task.masks.max_patches == task.masks.budget
  assert task.masks.log_aspect == pytest.approx((math.log(0.3), math.log(1 / 0.3)))
  with pytest.raises(ValueError, match="mask_patches 61 is larger than the 6x10 grid"):
    tasks.build(_beit_config(mask_patches=61), info)


# ------------------------------------------------------------------ 6. errors
ERROR_CASES = [
    (dict(grid=(8, 8), budget=65), r"mask_patches 65 is larger than the 8x8 grid of 64 patches"),
    (dict(grid=(6, 10), budget=61), r"mask_patches 61 is larger than the 6x10 grid"),
    (dict(grid=(8, 8), budget=0), r"mask_patches \(the masking budget\) must be a positive int"),
    (dict(grid=(8, 8), budget=-3), r"mask_patches .* must be a positive int, got -3"),
    (dict(grid=(8, 8), budget=True), r"mask_patches .* must be a positive int, got True"),
    (dict(grid=(8, 8), budget=10.0), r"mask_patches .* must be a positive int, got 10.0"),
    (dict(grid=(8, 8), budget="10"), r"mask_patches .* must be a positive int"),
    (dict(grid=(8, 8), min_patches=0), r"min_block_patches must be a positive int, got 0"),
    (dict(grid=(8, 8), min_patches=False), r"min_block_patches must be a positive int"),
    (dict(grid=(8, 8), max_patches=0), r"max_block_patches must be a positive int, got 0"),
    (dict(grid=(8, 8), min_aspect=0), r"min_aspect must be a positive number, got 0"),
    (dict(grid=(8, 8), min_aspect=-0.3), r"min_aspect must be a positive number"),
    (dict(grid=(8, 8), min_aspect=True), r"min_aspect must be a positive number"),
    (dict(grid=(8, 8), min_aspect="0.3"), r"min_aspect must be a positive number"),
    (dict(grid=(8, 8), min_aspect=float("nan")), r"min_aspect must be a positive number"),
    (dict(grid=(8, 8), min_aspect=0.5, max_aspect=0.4), r"max_aspect 0.4 is below min_aspect"),
    (dict(grid=(8, 8), min_aspect=2.0), r"max_aspect 0.5 is below min_aspect 2"),
    (dict(grid=(0, 8)), r"mask grid must be \(height, width\) of positive ints"),
    (dict(grid=(8, -2)), r"mask grid must be \(height, width\) of positive ints"),
    (dict(grid=(8, 8, 8)), r"mask grid must be \(height, width\) of positive ints"),
    (dict(grid=(8,)), r"mask grid must be \(height, width\) of positive ints"),
]


@pytest.mark.parametrize("kwargs,pattern", ERROR_CASES,
                         ids=[",".join(f"{k}={v!r}" for k, v in kw.items()) for kw, _ in ERROR_CASES])
def test_bad_settings_are_named(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    BlockMasking(**kwargs)


def test_good_edge_settings_are_accepted():
  assert BlockMasking((8, 8), 64).budget == 64  # the whole grid
  assert BlockMasking((8, 8), np.int64(10)).budget == 10
  assert BlockMasking((8, 8), 10, np.int32(4), np.int64(6)).max_patches == 6
  assert BlockMasking((8, 8), min_aspect=1).log_aspect == (0.0, 0.0)
  assert BlockMasking(np.array([6, 10])).grid == (6, 10)
  # a whole-grid budget with blocks strictly smaller than the grid: the generator still stops
  for seed in range(20):
    out = BlockMasking((4, 4), 16, 1)(random.Random(seed))
    assert 1 <= out.sum() <= 16


def test_block_masking_module_constants():
  # the reference's 10 attempts per block and 75 / 196
  assert block_masking.ATTEMPTS == 10
  assert (block_masking.REFERENCE_BUDGET, block_masking.REFERENCE_PATCHES) == (75, 196)
