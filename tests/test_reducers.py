"""The token-reduction contract: plans from config, the identity reducer, and a test reducer
that exercises every hook (stages, needs, masks, aux losses, proportional attention)."""
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vitoken.models import vit
from vitoken.models.reducers import base

IMAGES = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))


def _model(**kw):
  return vit.Model(7, variant="Ti/8", depth=4, head_zeroinit=False, **kw)


@base.register("test_keep_first")
class KeepFirst(base.Reducer):
  """Keeps the first `keep` tokens; records what the block handed it."""
  keep: int = 0
  stages = (base.POST_ATTN,)
  needs = frozenset({base.KEYS_MEAN, base.CLS_ATTN})

  @classmethod
  def layer_settings(cls, depth, layers: Sequence[int] = (1,), keep: int = 8):
    return {i: {"keep": keep} for i in layers}

  def __call__(self, state, info, *, train=False):
    self.check_protected(state, self.keep)
    b = state.x.shape[0]
    idx = jnp.broadcast_to(jnp.arange(self.keep), (b, self.keep))
    aux = {"losses": {"kept_fraction": jnp.float32(self.keep / state.num_tokens)},
           "keys_mean_shape": jnp.zeros(info.keys_mean.shape[:2]), "cls_attn": info.cls_attn}
    return state.gather(idx), aux


@base.register("test_mask_half")
class MaskHalf(base.Reducer):
  """Soft pruning: masks out the second half of the patch tokens without changing shapes."""
  stages = (base.PRE_BLOCK,)
  changes_shape = False
  proportional_attention = True

  def __call__(self, state, info, *, train=False):
    n = state.num_tokens
    keep = jnp.arange(n) < state.num_prefix + (n - state.num_prefix) // 2
    mask = jnp.broadcast_to(keep, state.x.shape[:2])
    return state.replace(mask=mask, size=state.size * 2.0), {}


def _apply(model, variables=None, **kw):
  variables = variables or model.init(jax.random.key(0), IMAGES)
  return variables, model.apply(variables, IMAGES, **kw)


@pytest.mark.parametrize("spec", [
    {"method": "identity"},
    [{"method": "identity"}, {"method": "identity", "name": "identity_b", "layers": [0, 2]}],
    ml_collections.ConfigDict({"method": "identity"}),
], ids=["dict", "list", "configdict"])
@pytest.mark.parametrize("pool_type", ["tok", "gap", "map"])
def test_identity_everywhere_is_exactly_the_plain_vit(spec, pool_type):
  plain = _model(pool_type=pool_type)
  reduced = _model(pool_type=pool_type, token_reduction=spec)
  variables, (logits, aux) = _apply(plain)
  _, (logits_r, aux_r) = _apply(reduced, variables)
  assert jax.tree.structure(reduced.init(jax.random.key(0), IMAGES)) == jax.tree.structure(variables)
  np.testing.assert_array_equal(logits, logits_r)
  jax.tree.map(np.testing.assert_array_equal, aux["blocks"], aux_r["blocks"])
  # Training mode with the same dropout/drop-path randomness is identical too.
  kw = dict(train=True, rngs={"dropout": jax.random.key(3)})
  plain_t = _model(pool_type=pool_type, drop_path_rate=0.3, dropout=0.1)
  reduced_t = _model(pool_type=pool_type, drop_path_rate=0.3, dropout=0.1, token_reduction=spec)
  np.testing.assert_array_equal(plain_t.apply(variables, IMAGES, **kw)[0],
                                reduced_t.apply(variables, IMAGES, **kw)[0])


def test_identity_reducers_can_be_scanned():
  plain = _model(scan=True)
  variables, (logits, _) = _apply(plain)
  _, (logits_r, _) = _apply(_model(scan=True, token_reduction={"method": "identity"}), variables)
  np.testing.assert_array_equal(logits, logits_r)


def test_reducer_changes_token_count_and_reports_aux():
  model = _model(token_reduction={"method": "test_keep_first", "layers": [1, 2], "keep": 9})
  _, (logits, aux) = _apply(model)
  counts = [aux["blocks"][f"block_{i:02d}"].shape[1] for i in range(4)]
  assert counts == [17, 9, 9, 9]
  assert logits.shape == (2, 7)
  assert set(aux["losses"]) == {"block_01/test_keep_first/kept_fraction",
                                "block_02/test_keep_first/kept_fraction"}
  np.testing.assert_allclose(aux["losses"]["block_01/test_keep_first/kept_fraction"], 9 / 17)
  rec = aux["reduction"]["block_01/test_keep_first"]
  assert rec["keys_mean_shape"].shape == (2, 17)  # keys averaged over heads, one row per token
  np.testing.assert_allclose(rec["cls_attn"].sum(-1), 1.0, rtol=1e-5)
  state = aux["state"]
  assert state.x.shape == (2, 9, 192) and state.num_prefix == 1
  np.testing.assert_array_equal(state.ids, np.broadcast_to(np.arange(9), (2, 9)))


def test_mask_and_proportional_attention_reach_attention_and_pooling():
  """A masked key must not influence anything: perturbing masked tokens changes nothing."""
  model = _model(pool_type="gap", token_reduction={"method": "test_mask_half", "layers": [0]})
  assert model.plan().proportional_attention
  variables, (logits, aux) = _apply(model)
  # Perturb the image region whose patches get masked (the bottom half of the 4x4 grid).
  perturbed = IMAGES.at[:, 16:].add(5.0)
  logits_p, aux_p = model.apply(variables, perturbed)
  np.testing.assert_allclose(logits, logits_p, atol=1e-5)
  assert aux["state"].mask.shape == (2, 16) and int(aux["state"].mask[0].sum()) == 8
  np.testing.assert_array_equal(aux["state"].size, 2.0)
  # Without the mask the perturbation would matter.
  plain = _model(pool_type="gap")
  assert np.abs(plain.apply(variables, IMAGES)[0] - plain.apply(variables, perturbed)[0]).max() > 1e-3


def test_token_state_gather_moves_every_per_token_field():
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, 6, 4), jnp.float32)
  state = base.TokenState.create(x, num_prefix=1, grid=(1, 5), track_source=True)
  state = state.replace(mask=jnp.asarray(rng.rand(2, 6) > 0.5), size=jnp.asarray(rng.rand(2, 6)))
  idx = jnp.asarray([[0, 5, 2], [0, 1, 4]])
  out = state.gather(idx)
  for name in ("x", "size", "ids", "source", "mask"):
    src = np.asarray(getattr(state, name))
    want = np.stack([src[b][np.asarray(idx[b])] for b in range(2)])
    np.testing.assert_array_equal(getattr(out, name), want, err_msg=name)
  assert out.num_prefix == 1 and out.grid.hw == (1, 5) and out.grid.num_patches == 5


def test_plan_is_static_and_scan_rejects_shape_changes():
  plan = base.build_plan([{"method": "test_keep_first", "layers": [2]}, {"method": "identity"}], 4)
  assert [len(p) for p in plan.per_layer] == [1, 1, 2, 1]
  assert not plan.scannable and base.build_plan({"method": "identity"}, 4).scannable
  assert base.build_plan(None, 4).empty and base.build_plan({"method": "none"}, 4).empty
  with pytest.raises(ValueError, match="scan=True needs"):
    _apply(_model(scan=True, token_reduction={"method": "test_keep_first"}))


@pytest.mark.parametrize("spec,pattern", [
    ({"method": "nope"}, r"unknown token_reduction method 'nope'; known: \[.*'identity'"),
    ({"method": "identity", "r": 3}, r"unknown token_reduction method 'identity' key 'r'; allowed keys: \['layers'\]"),
    ({"method": "test_keep_first", "layers": [4]}, "targets layer 4, but the ViT has 4 layers"),
    ({"r": 3}, "needs a 'method' key"),
    ("tome", "must be a dict, a list of dicts or None"),
    ({"method": "test_mask_half"}, "needs `layers`"),
])
def test_bad_token_reduction_configs_are_named(spec, pattern):
  with pytest.raises(ValueError, match=pattern):
    base.build_plan(spec, 4)


def test_reducer_may_not_eat_protected_tokens():
  model = _model(num_registers=2, token_reduction={"method": "test_keep_first", "keep": 2})
  with pytest.raises(ValueError, match="layer 1: test_keep_first would keep 2 tokens but 3 are protected"):
    _apply(model)


@base.register("skip_block")
class SkipBlock(base.Reducer):
  """docs/reducers.md's two-stage example, verbatim."""
  stages = (base.PRE_BLOCK, base.POST_BLOCK)
  changes_shape = False

  @classmethod
  def layer_settings(cls, depth, layers=(0,)):   # the config schema
    return {i: {} for i in layers}

  def __call__(self, state, info, *, train=False):
    if info.stage == base.PRE_BLOCK:
      return state.put(self.name, "x", state.x, per_token=True), {}
    stashed, state = state.pop(self.name, "x")
    return state.replace(x=0.5 * (state.x + stashed)), {}


def test_readme_two_stage_example_halves_the_block_update():
  spec = [{"method": "skip_block", "layers": [2], "name": "skip"}]
  variables, (_, aux) = _apply(_model(token_reduction=spec))
  _, (_, plain) = _apply(_model(), variables)
  before, after = plain["blocks"]["block_01"], plain["blocks"]["block_02"]
  np.testing.assert_allclose(aux["blocks"]["block_02"], 0.5 * (before + after), rtol=1e-5, atol=1e-5)
  assert not aux["state"].carry  # popped again after the block
  # With ToMe at every layer the stash is merged along with the tokens at layer 2.
  spec = [{"method": "tome", "r": 2}] + spec
  _, (_, aux) = _apply(_model(token_reduction=spec), variables)
  assert aux["blocks"]["block_02"].shape[1] == 17 - 3 * 2
