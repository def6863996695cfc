"""Reducers over space-time: any entry with `per_slice` runs on each time slice as its own
sequence (TokenLearner over time as scenic's video TokenLearner, ToMe within frames), and a
reducer over all tokens of a clip keeps sizes, sources and the class token right."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitoken.models import vit
from vitoken.models.patches import PatchGrid
from vitoken.models.reducers import base as rbase

WIDTH, HEADS = 16, 2
GRID = PatchGrid((2, 4, 4), (3, 2, 3))  # 3 time slices of 2x3 patches


class _Stage(nn.Module):
  """One reducer entry at one stage, called as the block calls it."""
  planned: rbase.PlannedReducer

  @nn.compact
  def __call__(self, state, info):
    # The model's context (a class-token ViT), whatever the state the reducer is handed.
    context = rbase.ModelContext(width=WIDTH, num_heads=HEADS, mlp_dim=2 * WIDTH, depth=4,
                                 num_prefix=1, class_token=True)
    return rbase.run_reducer(self.planned.build(1, context), state, info, train=False)


def _entry(spec, per_slice):
  plan = rbase.build_plan(dict(spec, per_slice=per_slice), 4)
  (planned,) = plan.at(1)
  return planned, plan


def _video_state(num_prefix=1, seed=0, track_source=True):
  rng = np.random.default_rng(seed)
  n = num_prefix + GRID.num_patches
  x = jnp.asarray(rng.normal(size=(2, n, WIDTH)), jnp.float32)
  return rbase.TokenState.create(x, num_prefix=num_prefix, grid=GRID, track_source=track_source)


def _info(state, stage, seed=1):
  rng = np.random.default_rng(seed)
  keys = jnp.asarray(rng.normal(size=state.x.shape[:2] + (WIDTH // HEADS,)), jnp.float32)
  attn = jnp.asarray(rng.random(state.x.shape[:2]), jnp.float32)
  return rbase.BlockInfo(layer=1, stage=stage, keys_mean=keys, cls_attn=attn)


def _slice_state(state, t):
  """Time slice t of a fresh video state as an image state: its patches, no prefix, global
  ids and sources (what `fold_slices` must produce for it)."""
  n = GRID.num_patches // GRID.frames
  lo = state.num_prefix + t * n
  return state.map_tokens(lambda a: a[:, lo:lo + n]).replace(
      num_prefix=0, slices=1, grid=GRID.slice_grid())


def _slice_info(info, state, t):
  n = GRID.num_patches // GRID.frames
  lo = state.num_prefix + t * n
  return info.replace(keys_mean=info.keys_mean[:, lo:lo + n], cls_attn=info.cls_attn[:, lo:lo + n])


SPECS = {
    "token_learner": ({"method": "token_learner", "num_tokens": 2, "loc": 1}, rbase.PRE_BLOCK),
    "tome": ({"method": "tome", "r": 2}, rbase.POST_ATTN),
    "evit": ({"method": "evit", "keep_rate": 0.5, "layers": [1]}, rbase.POST_ATTN),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_per_slice_equals_the_reducer_on_each_slice(name):
  spec, stage = SPECS[name]
  state, _ = _video_state(), None
  info = _info(state, stage)
  planned, _ = _entry(spec, per_slice=True)
  module = _Stage(planned)
  params = module.init(jax.random.key(0), state, info)
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(3), a.shape), params)
  got, _ = module.apply(params, state, info)
  # The same entry without per_slice, on each slice's state alone, with the same parameters.
  plain = _Stage(_entry(spec, per_slice=False)[0])
  parts = [plain.apply(params, _slice_state(state, t), _slice_info(info, state, t))[0]
           for t in range(GRID.frames)]
  assert got.slices == GRID.frames and got.num_prefix == 1
  per = (got.num_tokens - 1) // GRID.frames
  for t, part in enumerate(parts):
    sl = slice(1 + t * per, 1 + (t + 1) * per)
    assert part.num_tokens == per
    np.testing.assert_allclose(np.asarray(got.x[:, sl]), np.asarray(part.x), atol=1e-6)
    np.testing.assert_allclose(np.asarray(got.size[:, sl]), np.asarray(part.size), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got.ids[:, sl]), np.asarray(part.ids))
    np.testing.assert_allclose(np.asarray(got.source[:, sl]), np.asarray(part.source), atol=1e-6)
  # The class token is untouched, and every slice's tokens hold only that slice's patches.
  np.testing.assert_array_equal(np.asarray(got.x[:, 0]), np.asarray(state.x[:, 0]))
  src = np.asarray(got.source)
  n = GRID.num_patches // GRID.frames
  for t in range(GRID.frames):
    rows = src[:, 1 + t * per:1 + (t + 1) * per]
    outside = np.delete(rows, np.s_[1 + t * n:1 + (t + 1) * n], axis=-1)
    assert not np.any(outside), (name, t)


def test_token_learner_over_time_gives_s_tokens_per_slice_in_a_video_vit():
  """scenic's video TokenLearner: [B, T'hw, C] -> [B, T'S, C] at `loc`, the per-slice state
  carried on; with gap pooling every learned token counts as one."""
  model = vit.Model(5, patch_size=(2, 4, 4), width=WIDTH, depth=3, mlp_dim=32, num_heads=HEADS,
                    channels=1, pool_type="gap",
                    token_reduction={"method": "token_learner", "num_tokens": 4, "loc": 1,
                                     "per_slice": True})
  clips = np.random.default_rng(0).normal(size=(2, 6, 8, 12, 1)).astype(np.float32)
  variables = model.init(jax.random.key(0), clips)
  logits, aux = model.apply(variables, clips)
  assert [b.shape[1] for b in aux["blocks"].values()] == [18, 12, 12]
  assert aux["state"].slices == 3 and np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.parametrize("per_slice", [False, True])
def test_tome_over_space_time_keeps_sizes_sources_and_the_class_token(per_slice):
  model = vit.Model(5, patch_size=(2, 4, 4), width=WIDTH, depth=3, mlp_dim=32, num_heads=HEADS,
                    channels=1, pool_type="tok",
                    token_reduction={"method": "tome", "r": 2, "trace_source": True,
                                     "per_slice": per_slice})
  clips = np.random.default_rng(1).normal(size=(2, 6, 8, 12, 1)).astype(np.float32)
  variables = model.init(jax.random.key(0), clips)
  _, aux = model.apply(variables, clips)
  state = aux["state"]
  counts = [b.shape[1] for b in aux["blocks"].values()]
  # 1 + 18 tokens; over all of them 2 merge per block, per slice 2 in each of the 3 slices.
  assert counts == ([17, 15, 13] if not per_slice else [13, 7, 4])
  size, source, ids = (np.asarray(a) for a in (state.size, state.source, state.ids))
  np.testing.assert_allclose(size.sum(1), 19)  # every patch (and the class token) counted once
  np.testing.assert_allclose(source.sum(1), 1)  # each initial token in exactly one token
  np.testing.assert_allclose(source.sum(2), size)
  assert np.all(ids[:, 0] == 0) and np.all(size[:, 0] == 1) and np.all(source[:, 0, 0] == 1)
  assert state.slices == (3 if per_slice else 1)
  if per_slice:  # merges stay within a slice: each token's patches share one frame
    per = (state.num_tokens - 1) // 3
    for t in range(3):
      held = source[:, 1 + t * per:1 + (t + 1) * per].sum(1)
      assert np.all(held[:, 1 + t * 6:1 + (t + 1) * 6] == 1) and held.sum() == 2 * 6


def test_fold_and_unfold_are_inverse_and_refuse_uneven_slices():
  state = _video_state(num_prefix=2)
  state = state.put("m", "w", jnp.arange(state.num_tokens, dtype=jnp.float32)[None].repeat(2, 0),
                    per_token=True, merge="sum").put("m", "global", jnp.ones(3))
  folded, prefix = state.fold_slices()
  assert folded.x.shape == (6, 6, WIDTH) and folded.num_prefix == 0
  assert folded.grid == PatchGrid((4, 4), (2, 3))
  np.testing.assert_array_equal(np.asarray(folded.carry["m/w"][1]), np.arange(8, 14))
  back = state.unfold_slices(folded, prefix)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert back.slices == 3 and back.num_prefix == 2
  with pytest.raises(ValueError, match="do not split into 3 time slices"):
    state.gather(jnp.arange(2 + 17)[None].repeat(2, 0)).fold_slices()


def test_per_slice_must_be_a_boolean():
  with pytest.raises(ValueError, match="per_slice must be true or false"):
    rbase.build_plan({"method": "tome", "r": 2, "per_slice": "yes"}, 4)
