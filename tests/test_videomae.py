"""VideoMAE's tube masks, targets and loss against numpy transcriptions of MCG-NJU/VideoMAE
(`masking_generator.TubeMaskingGenerator`, `engine_for_pretraining.train_one_epoch`)."""
import numpy as np
import pytest

from vitoken.errors import ConfigError, InputError
from vitoken.models import masking, videomae

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.mark.parametrize("hw, ratio, want", [(196, 0.9, 176), (64, 0.9, 57), (16, 0.75, 12),
                                             (10, 0.5, 5)])
def test_tube_masks_the_same_positions_in_every_slice_with_the_references_count(hw, ratio, want):
  noise = np.random.default_rng(0).random((4, hw)).astype(np.float32)
  mask = np.asarray(masking.tube_mask(noise, ratio, frames=3))
  assert mask.shape == (4, 3 * hw) and set(np.unique(mask)) <= {0.0, 1.0}
  per_slice = mask.reshape(4, 3, hw)
  assert np.all(per_slice == per_slice[:, :1])  # tubes: identical over time
  assert np.all(per_slice.sum(-1) == want)  # int(ratio * h * w) masked
  # The masked positions are those of highest noise.
  for b in range(4):
    np.testing.assert_array_equal(np.sort(np.flatnonzero(per_slice[b, 0])),
                                  np.sort(np.argsort(noise[b])[hw - want:]))
  if (hw, ratio) == (196, 0.9):  # MAE's rule would keep int(196 * 0.1) = 19, masking 177
    assert hw - masking.keep_count(hw, ratio) == 177


def test_tube_masks_are_uniform_over_positions():
  """Over many clips every position is masked equally often (a uniformly random subset, as
  the reference's shuffle), within a few standard errors."""
  hw, ratio, n = 16, 0.75, 4000
  mask = np.asarray(masking.tube_mask(np.random.default_rng(1).random((n, hw)), ratio, frames=1))
  rate = mask.mean(0)
  p = 12 / 16
  assert np.all(np.abs(rate - p) < 5 * np.sqrt(p * (1 - p) / n)), rate


@pytest.mark.parametrize("ratio, message", [(0.01, "masks nothing"), (1.0, r"in \(0, 1\)"),
                                            (0.0, r"in \(0, 1\)"), (-0.5, r"in \(0, 1\)")])
def test_tube_ratios_that_mask_nothing_or_everything_are_errors(ratio, message):
  with pytest.raises(ConfigError, match=message):
    masking.tube_mask(np.zeros((1, 16), np.float32), ratio, frames=2)


def _reference_targets(videos_bthwc, t, p, norm_target, mean=None, std=None):
  """The reference's target code in numpy: channels-first clips, `rearrange` spelt out."""
  v = np.asarray(videos_bthwc, np.float64).transpose(0, 4, 1, 2, 3)  # b c T H W
  if mean is not None:
    v = v * np.asarray(std)[None, :, None, None, None] + np.asarray(mean)[None, :, None, None, None]
  b, c, T, H, W = v.shape
  gt, gh, gw = T // t, H // p, W // p
  # 'b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c'
  x = v.reshape(b, c, gt, t, gh, p, gw, p).transpose(0, 2, 4, 6, 3, 5, 7, 1)
  x = x.reshape(b, gt * gh * gw, t * p * p, c)
  if norm_target:
    x = (x - x.mean(axis=-2, keepdims=True)) / (np.sqrt(x.var(axis=-2, ddof=1, keepdims=True))
                                                + 1e-6)
  return x.reshape(b, gt * gh * gw, t * p * p * c)  # 'b n p c -> b n (p c)'


@pytest.mark.parametrize("norm_target", [True, False])
@pytest.mark.parametrize("stats", [False, True])
def test_targets_match_the_reference(norm_target, stats):
  rng = np.random.default_rng(2)
  clips = rng.normal(size=(2, 4, 8, 12, 3)).astype(np.float32)
  kw = dict(input_mean=MEAN, input_std=STD) if stats else {}
  got = np.asarray(videomae.targets(clips, (2, 4, 4), norm_target, **kw))
  want = _reference_targets(clips, 2, 4, norm_target, *((MEAN, STD) if stats else ()))
  assert got.shape == (2, 2 * 2 * 3, 2 * 4 * 4 * 3)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_loss_is_the_mse_over_masked_tubelets_in_position_order():
  rng = np.random.default_rng(3)
  clips = rng.normal(size=(3, 4, 8, 8, 3)).astype(np.float32)
  mask = np.asarray(masking.tube_mask(rng.random((3, 4)), 0.5, frames=2))  # 2 of 4 per slice
  m = int(mask[0].sum())
  pred = rng.normal(size=(3, m, 2 * 4 * 4 * 3)).astype(np.float32)
  got = float(videomae.loss(clips, pred, mask, (2, 4, 4), True, input_mean=MEAN, input_std=STD))
  target = _reference_targets(clips, 2, 4, True, MEAN, STD)
  labels = target[mask.astype(bool)].reshape(3, -1, target.shape[-1])  # boolean indexing
  np.testing.assert_allclose(got, np.mean((pred - labels) ** 2), rtol=1e-5)
  # A prediction in another order than the positions' is a different loss.
  shuffled = float(videomae.loss(clips, pred[:, ::-1], mask, (2, 4, 4), True, input_mean=MEAN,
                                 input_std=STD))
  assert abs(shuffled - got) > 1e-3


def test_patchify_clips_and_bad_shapes():
  clips = np.arange(2 * 4 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 4, 1)
  tubes = np.asarray(masking.patchify(clips, (2, 2, 2)))
  assert tubes.shape == (2, 8, 8)
  # The first tubelet: frames 0-1, rows 0-1, columns 0-1, flattened (time, row, column).
  np.testing.assert_array_equal(tubes[0, 0], clips[0, :2, :2, :2, 0].reshape(-1))
  # The second token is the next column block of the same time slice (time-major order).
  np.testing.assert_array_equal(tubes[0, 1], clips[0, :2, :2, 2:4, 0].reshape(-1))
  with pytest.raises(InputError, match="clips must be"):
    masking.patchify(clips[:, 0], (2, 2, 2))
  with pytest.raises(InputError, match="do not split into tubelets of 3"):
    masking.patchify(clips, (3, 2, 2))
  with pytest.raises(InputError, match="predictions"):
    videomae.loss(clips, np.zeros((2, 3, 5), np.float32), np.ones((2, 8)), (2, 2, 2))
