"""The video ViT (ViViT's model 1: tubelet embedding, joint space-time attention) and image
models inflated into it, against numpy and against the image model on static clips."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vitoken.convert import inflate
from vitoken.convert.inflate import inflate_kernel
from vitoken.errors import ConfigError, InputError
from vitoken.models import posemb, variants, vit
from vitoken.models.patches import PatchGrid

TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=2)


def _randomised(params, seed=2, scale=0.1):
  """Params with every leaf moved off its init (zero heads, zero class tokens, zero temporal
  tables would hide mistakes)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                   for x, k in zip(leaves, keys)])


def _layer_norm(x, eps=1e-6):
  x = np.asarray(x, np.float64)
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def test_sincos_1d_is_videomaes_table():
  length, width = 37, 24
  # VideoMAE's get_sinusoid_encoding_table, transcribed loop by loop.
  ref = np.array([[pos / np.power(10000, 2 * (j // 2) / width) for j in range(width)]
                  for pos in range(length)])
  ref[:, 0::2] = np.sin(ref[:, 0::2])
  ref[:, 1::2] = np.cos(ref[:, 1::2])
  got = posemb.sincos_1d(length, width)
  assert got.shape == (1, length, width) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got[0]), ref.astype(np.float32), rtol=0, atol=1e-7)
  # Odd widths follow the same rule (the last column is a sine).
  np.testing.assert_allclose(np.asarray(posemb.sincos_1d(5, 7)[0, :, 6]),
                             np.sin(np.arange(5) / 10000 ** (6 / 7)), atol=1e-7)


@pytest.mark.parametrize("variant, patch", [("B/16", (16, 16)), ("B/16x2", (2, 16, 16)),
                                            ("S/8x4", (4, 8, 8))])
def test_variant_strings_with_a_tubelet(variant, patch):
  assert variants.decode_variant(variant)["patch_size"] == patch


@pytest.mark.parametrize("variant", ["B/16x", "B/x2", "B/16x0", "B/16y2"])
def test_bad_tubelet_variants_name_the_form(variant):
  with pytest.raises(ConfigError, match="'B/16x2' for tubelets"):
    variants.decode_variant(variant)


@pytest.mark.parametrize("patch", [(2, 4, 4), (3, 4, 2), (1, 4, 4)])
def test_tubelet_embedding_is_a_3d_convolution_into_time_major_tokens(patch):
  t, h, w, c = 6, 8, 12, 3
  model = vit.Model(0, patch_size=patch, channels=c, pool_type="none", posemb="none", **TINY)
  clips = np.random.default_rng(0).normal(size=(2, t, h, w, c)).astype(np.float32)
  params = _randomised(model.init(jax.random.key(0), clips)["params"])
  _, aux = model.apply({"params": params}, clips)
  kernel = np.asarray(params["embedding"]["kernel"], np.float64)
  bias = np.asarray(params["embedding"]["bias"], np.float64)
  assert kernel.shape == patch + (c, TINY["width"])
  pt, ph, pw = patch
  gt, gh, gw = t // pt, h // ph, w // pw
  want = np.zeros((2, gt, gh, gw, TINY["width"]))
  for i in range(gt):  # each tubelet's pixels against the kernel, one by one
    for j in range(gh):
      for k in range(gw):
        block = clips[:, i * pt:(i + 1) * pt, j * ph:(j + 1) * ph, k * pw:(k + 1) * pw]
        want[:, i, j, k] = np.einsum("btyxc,tyxcd->bd", block, kernel) + bias
  np.testing.assert_allclose(np.asarray(aux["stem"]), want, atol=2e-5)
  # The tokens the blocks see are the stem in (time, row, column) order.
  state = aux["state"]
  assert state.grid == PatchGrid(patch, (gt, gh, gw)) and state.x.shape[1] == gt * gh * gw


@pytest.mark.parametrize("table", ["learn", "learn_factorised", "sincos1d"])
@pytest.mark.parametrize("class_token", [False, True])
def test_video_position_tables(table, class_token):
  """What the blocks receive from a zero patch embedding is the position table: one learned
  table over all patches, a spatial table plus a temporal one per time slice, or VideoMAE's
  1-D table; the class token gets none."""
  model = vit.Model(0, patch_size=(2, 4, 4), channels=1, depth=0, width=16, mlp_dim=32,
                    num_heads=2, pool_type="none", class_token=class_token, posemb=table)
  clips = np.zeros((1, 6, 8, 12, 1), np.float32)
  params = _randomised(model.init(jax.random.key(0), clips)["params"])
  params["embedding"] = jax.tree.map(jnp.zeros_like, params["embedding"])
  out, _ = model.apply({"params": params}, clips)
  gt, gh, gw, width = 3, 2, 3, 16
  if table == "learn":
    assert params["pos_embedding"].shape == (1, gt * gh * gw, width)
    want = np.asarray(params["pos_embedding"][0])
  elif table == "learn_factorised":
    space = np.asarray(params["pos_embedding"][0])
    time = np.asarray(params["pos_embedding_time"][0])
    assert space.shape == (gh * gw, width) and time.shape == (gt, width)
    want = np.stack([space + time[i] for i in range(gt)]).reshape(-1, width)
  else:
    want = np.asarray(posemb.sincos_1d(gt * gh * gw, width)[0])
  if class_token:
    want = np.concatenate([np.asarray(params["cls"][0]), want])
  norm = params["encoder_norm"]
  want = _layer_norm(want) * np.asarray(norm["scale"]) + np.asarray(norm["bias"])
  np.testing.assert_allclose(np.asarray(out[0]), want, atol=1e-4)


def test_the_temporal_table_starts_at_zero():
  model = vit.Model(0, patch_size=(2, 4, 4), channels=1, posemb="learn_factorised", **TINY)
  params = model.init(jax.random.key(0), np.zeros((1, 4, 8, 8, 1)))["params"]
  assert params["pos_embedding_time"].shape == (1, 2, TINY["width"])
  assert not np.any(np.asarray(params["pos_embedding_time"]))
  assert model.layer_decay_groups()["pos_embedding_time"] == "stem"


def test_video_sharding_rule_splits_the_embedding_output():
  def first_match(model, path):  # the rule the sharding code applies: the first that matches
    return next(spec for pattern, spec in model.sharding_rules() if re.search(pattern, path))

  assert first_match(vit.Model(10, variant="Ti/16x2"), "embedding/kernel") == (
      None, None, None, None, "fsdp")
  assert first_match(vit.Model(10, variant="Ti/16"), "embedding/kernel") == (
      None, None, None, "fsdp")


# ----------------------------------------------------------------------------- inflation
IMAGE_MODELS = {
    "class token": dict(pool_type="tok", posemb="learn"),
    "gap": dict(pool_type="gap", posemb="learn", fc_norm=True),
    "class token, prefix positions, registers": dict(pool_type="tok", posemb="learn",
                                                     posemb_prefix=True, num_registers=2),
    "MAE's sin-cos": dict(pool_type="tok", posemb="sincos2d_mae"),
    "map, no table": dict(pool_type="map", posemb="none", num_registers=1),
}


def _image_model(fields, seed=1):
  model = vit.Model(7, variant="Ti/8", channels=3, head_zeroinit=False, **{**TINY, **fields})
  images = np.random.default_rng(seed).normal(size=(3, 16, 24, 3)).astype(np.float32)
  params = _randomised(model.init(jax.random.key(seed), images)["params"])
  return model, params, images


STATIC_CLIP_CASES = (
    [(name, kernel, None) for name in IMAGE_MODELS for kernel in ("central", "average")]
    + [(name, "central", "learn_factorised") for name in ("class token", "gap")])


@pytest.mark.parametrize("name, kernel, table", STATIC_CLIP_CASES)
def test_a_static_clip_gives_the_image_models_logits(name, kernel, table):
  model, params, images = _image_model(IMAGE_MODELS[name])
  want, _ = model.apply({"params": params}, images)
  video, video_params = inflate(model, params, num_frames=6, tubelet=2, kernel=kernel,
                                image_size=(16, 24), posemb=table)
  assert tuple(video.patch_size) == (2, 8, 8)
  clips = np.repeat(images[:, None], 6, axis=1)
  got, aux = video.apply({"params": video_params}, clips)
  assert aux["state"].x.shape[1] == video.num_prefix + 3 * 2 * 3
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_vivits_plain_class_token_shares_attention_with_every_copy():
  """Without `prefix_per_slice` (scenic's inflation) the class token is one key among T'
  copies of each patch: a class-token model's static-clip logits then move, a gap model's
  without a class token do not."""
  for fields, moves in ((IMAGE_MODELS["class token"], True), (IMAGE_MODELS["gap"], False)):
    model, params, images = _image_model(fields)
    want, _ = model.apply({"params": params}, images)
    video, video_params = inflate(model, params, num_frames=4, image_size=(16, 24),
                                  prefix_per_slice=False)
    got, _ = video.apply({"params": video_params}, np.repeat(images[:, None], 4, axis=1))
    gap = float(np.abs(np.asarray(got) - np.asarray(want)).max())
    assert (gap > 1e-2) if moves else (gap < 1e-5), (fields, gap)


@pytest.mark.parametrize("tubelet", [1, 2, 3, 4])
def test_inflated_kernels(tubelet):
  kernel = np.random.default_rng(0).normal(size=(8, 8, 3, 5)).astype(np.float32)
  central = inflate_kernel(kernel, tubelet, "central")
  assert central.shape == (tubelet, 8, 8, 3, 5)
  for i in range(tubelet):
    np.testing.assert_array_equal(central[i], kernel if i == tubelet // 2 else 0)
  average = inflate_kernel(kernel, tubelet, "average")
  for i in range(tubelet):
    np.testing.assert_allclose(average[i], kernel / tubelet, rtol=1e-7)


def test_inflation_tiles_the_table_over_time_after_resizing_it():
  square = vit.Model(7, variant="Ti/8", channels=3, **TINY)
  params = _randomised(square.init(jax.random.key(0), np.zeros((1, 16, 16, 3)))["params"])
  video, out = inflate(square, params, num_frames=8, tubelet=2, image_size=(32, 24))
  grid = posemb.resize_posemb(params["pos_embedding"], (2, 2), (4, 3), method="big_vision")
  want = np.tile(np.asarray(grid), (1, 4, 1))
  np.testing.assert_allclose(out["pos_embedding"], want, atol=1e-6)
  assert out["pos_embedding"].shape == (1, 4 * 4 * 3, TINY["width"])
  for key in ("cls", "head", "encoder_norm", "block_00", "block_01"):
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), out[key], params[key]))
  np.testing.assert_array_equal(out["embedding"]["bias"], params["embedding"]["bias"])
  clips = np.zeros((2, 8, 32, 24, 3), np.float32)
  logits, _ = video.apply({"params": out}, clips)
  assert logits.shape == (2, 7) and np.all(np.isfinite(logits))


def test_inflated_model_trains_on_clips():
  """A few AdamW steps on a batch of clips whose label is the direction of a moving square:
  the loss falls (gradients reach the tubelet kernel and the tables)."""
  model, params, _ = _image_model(IMAGE_MODELS["class token"])
  video, vparams = inflate(model, params, num_frames=4, image_size=(16, 24),
                           posemb="learn_factorised")
  clips = np.zeros((8, 4, 16, 24, 3), np.float32)
  labels = np.arange(8) % 2
  for b in range(8):
    for t in range(4):
      x = 4 + (3 * t if labels[b] else 12 - 3 * t)
      clips[b, t, 6:10, x:x + 4] = 1.0
  opt = optax.adamw(3e-3)
  state = opt.init(vparams)

  @jax.jit
  def step(p, s):
    def loss_fn(p):
      logits, _ = video.apply({"params": p}, clips)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss, grads

  losses = []
  for _ in range(15):
    vparams, state, loss, grads = step(vparams, state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses
  for key in ("embedding", "pos_embedding_time"):
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads[key])), key


def test_bad_input_names_the_setting():
  model, params, images = _image_model(IMAGE_MODELS["class token"])
  with pytest.raises(ConfigError, match="num_frames=5 must be a positive multiple of tubelet=2"):
    inflate(model, params, num_frames=5, tubelet=2)
  with pytest.raises(ConfigError, match="kernel must be one of"):
    inflate(model, params, num_frames=4, kernel="middle")
  video, vparams = inflate(model, params, num_frames=4, image_size=(16, 24))
  with pytest.raises(ConfigError, match="already a video model"):
    inflate(video, vparams, num_frames=4)
  # Params of another patch size than the module's: inflation keeps the patch.
  other = vit.Model(7, patch_size=(4, 4), channels=3, **TINY)
  with pytest.raises(InputError, match="inflating keeps the patch size"):
    inflate(other, params, num_frames=4)
  with pytest.raises(ConfigError, match="inflates to posemb in"):
    inflate(model, params, num_frames=4, posemb="sincos1d")
  # 4-D batches into a video model and clips into an image model.
  with pytest.raises(InputError, match="video model .* takes clips .*an image batch"):
    video.apply({"params": vparams}, images)
  with pytest.raises(InputError, match="a batch of clips.*inflate"):
    model.apply({"params": params}, np.repeat(images[:, None], 4, axis=1))
  with pytest.raises(InputError, match="clips of 5 frames do not split into tubelets of 2"):
    video.apply({"params": vparams}, np.zeros((1, 5, 16, 24, 3), np.float32))
  with pytest.raises(InputError, match=r"does not divide the image size 4x18x24"):
    video.apply({"params": vparams}, np.zeros((1, 4, 18, 24, 3), np.float32))
  # A table the clips do not fit, and the 2-D tables a video model refuses.
  with pytest.raises(InputError, match="pos_embedding has shape .* need"):
    video.apply({"params": vparams}, np.zeros((1, 8, 16, 24, 3), np.float32))
  with pytest.raises(ConfigError, match="2-D table; a video model"):
    vit.Model(7, variant="Ti/8x2", posemb="sincos2d").init(jax.random.key(0),
                                                           np.zeros((1, 2, 8, 8, 3)))
  with pytest.raises(ConfigError, match="learn_factorised.*needs a video model"):
    vit.Model(7, variant="Ti/8", posemb="learn_factorised").init(jax.random.key(0),
                                                                 np.zeros((1, 8, 8, 3)))
