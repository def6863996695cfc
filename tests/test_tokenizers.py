"""Visual tokenizers (vitoken.tokenizers) against independent numpy references written here:
contrast-normalised patches and nearest-centroid codes, the mini-batch k-means update
(scikit-learn's batched form), k-means++ D^2 sampling, codebook usage and perplexity, FSQ as
the appendix code of Mentzer et al. 2023 ("Finite Scalar Quantization"), the FSQ autoencoder
tokenizer, fitting into a workdir (summary, resume, loading, the CLI) for both kinds, and input
errors.

No expected value here is computed by vitoken itself.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import visual_tokenizer
from tests.test_train_loop import override
from vitoken import errors, tasks, tokenizers as fitting
from vitoken.data import pipeline
from vitoken.engine.metrics import read_jsonl
from vitoken.models.tokenizers import common, fsq, kmeans

F32 = np.float32


# ------------------------------------- numpy references -------------------------------------
def np_patchify(images, ph, pw):
  """[B, H, W, C] -> [B, L, ph*pw*C]: patches in row-major grid order, each flattened
  (row, column, channel), cut out one by one."""
  b, h, w, c = images.shape
  gh, gw = h // ph, w // pw
  out = np.empty((b, gh * gw, ph * pw * c), np.float64)
  for i in range(gh):
    for j in range(gw):
      out[:, i * gw + j] = np.asarray(images[:, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw, :],
                                      np.float64).reshape(b, -1)
  return out


def np_unpatchify(patches, ph, pw, gh, gw, c):
  b = patches.shape[0]
  out = np.empty((b, gh * ph, gw * pw, c), np.float64)
  for i in range(gh):
    for j in range(gw):
      out[:, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw, :] = \
          patches[:, i * gw + j].reshape(b, ph, pw, c)
  return out


def np_normalize(patches, eps):
  """Coates & Ng's contrast normalisation: less the patch mean, over sqrt(variance + eps)."""
  mean = patches.mean(axis=-1, keepdims=True)
  var = np.square(patches - mean).mean(axis=-1, keepdims=True)
  return (patches - mean) / np.sqrt(var + eps)


def np_sq_dist(x, c):
  return np.square(np.asarray(x, np.float64)[:, None, :] - np.asarray(c, np.float64)[None]).sum(-1)


def np_assign(x, c):
  """(nearest centroid of each row of x, gap between its nearest and second nearest distance)."""
  d = np_sq_dist(x, c)
  s = np.sort(d, axis=1)
  return d.argmin(axis=1), s[:, 1] - s[:, 0]


def np_minibatch_step(c, n, x):
  """Mini-batch k-means, scikit-learn's batched update, point by point as its formula says."""
  c, n, x = (np.asarray(a, np.float64) for a in (c, n, x))
  d = np_sq_dist(x, c)
  a = d.argmin(axis=1)
  c2, n2 = c.copy(), n.copy()
  for j in range(len(c)):
    members = x[a == j]
    if len(members):
      c2[j] = (n[j] * c[j] + members.sum(axis=0)) / (n[j] + len(members))
      n2[j] = n[j] + len(members)
  return c2, n2, d.min(axis=1).mean()


def np_usage(counts):
  counts = np.asarray(counts, np.float64)
  if counts.sum() == 0:
    return 0.0, 0.0
  used = counts[counts > 0]
  p = used / used.sum()
  return len(used) / len(counts), math.exp(-sum(q * math.log(q) for q in p))


def np_fsq(z, levels):
  """The paper's appendix FSQ in float64: (bound(z), zhat, codes)."""
  levels = np.asarray(levels, np.float64)
  eps = 1e-3
  half_l = (levels - 1) * (1 - eps) / 2
  offset = np.where(levels % 2 == 1, 0.0, 0.5)
  shift = np.tan(offset / half_l)
  bounded = np.tanh(np.asarray(z, np.float64) + shift) * half_l - offset
  half_width = levels // 2
  zhat = np.round(bounded) / half_width
  basis = np.concatenate(([1], np.cumprod(levels[:-1])))
  codes = ((zhat * half_width + half_width) * basis).sum(axis=-1)
  return bounded, zhat, np.round(codes).astype(np.int64)


def np_fsq_grad(z, levels):
  """d/dz of bound(z) / half_width (the straight-through gradient of quantize)."""
  levels = np.asarray(levels, np.float64)
  half_l = (levels - 1) * (1 - 1e-3) / 2
  shift = np.tan(np.where(levels % 2 == 1, 0.0, 0.5) / half_l)
  return (1 - np.tanh(np.asarray(z, np.float64) + shift) ** 2) * half_l / (levels // 2)


def np_quantized_from_codes(codes, levels):
  levels = np.asarray(levels, np.int64)
  basis = np.concatenate(([1], np.cumprod(levels[:-1])))
  digits = (np.asarray(codes, np.int64)[..., None] // basis) % levels
  return (digits - levels // 2) / (levels // 2)


def near_rounding_boundary(bounded, tol=1e-4):
  """Rows where some channel is within `tol` of a .5 (float32 may round it either way)."""
  frac = bounded - np.floor(bounded)
  return (np.abs(frac - 0.5) < tol).any(axis=-1)


# ------------------------------------- k-means: codes ---------------------------------------
@pytest.mark.parametrize("channels,eps", [(1, 0.1), (3, 0.5)])
def test_encode_is_the_nearest_centroid_of_contrast_normalized_patches(channels, eps):
  rng = np.random.RandomState(channels)
  # 24x16 images in 8 px patches: an uneven 3x2 grid, so rows and columns cannot be swapped.
  images = (rng.rand(3, 24, 16, channels) * 2 - 0.5).astype(F32)
  dim = 64 * channels
  want_patches = np_normalize(np_patchify(images, 8, 8), eps)
  flat = want_patches.reshape(-1, dim)
  centroids = np.concatenate([flat[[0, 5, 9, 13]] + 0.3 * rng.randn(4, dim),
                              rng.randn(3, dim)]).astype(F32)
  want, gap = np_assign(flat, centroids)
  assert gap.min() > 1e-2 and len(set(want)) >= 4  # no near-ties; several codes in play
  tok = kmeans.KMeansTokenizer((8, 8), 7, eps=eps)

  np.testing.assert_allclose(tok.patches(jnp.asarray(images)), want_patches, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(common.normalized_patches(images, 8, eps), want_patches, atol=1e-4,
                             rtol=1e-4)
  codes = tok.encode({"centroids": jnp.asarray(centroids)}, jnp.asarray(images))
  assert codes.dtype == jnp.int32 and codes.shape == (3, 6)
  np.testing.assert_array_equal(np.asarray(codes), want.reshape(3, 6))
  np.testing.assert_array_equal(np.asarray(kmeans.assign(jnp.asarray(flat, jnp.float32),
                                                         jnp.asarray(centroids))), want)
  np.testing.assert_allclose(
      kmeans.sq_distances(jnp.asarray(flat, jnp.float32), jnp.asarray(centroids)),
      np_sq_dist(flat, centroids), rtol=1e-4, atol=1e-2)


def test_decode_with_each_patch_as_its_own_centroid_gives_back_the_images():
  """A centroid is a patch's normalised shape; decode puts back its mean and contrast."""
  rng = np.random.RandomState(7)
  images = rng.rand(2, 24, 16, 3).astype(F32)
  centroids = np_normalize(np_patchify(images, 8, 8), 0.1).reshape(12, -1).astype(F32)
  tok = kmeans.KMeansTokenizer((8, 8), 12)
  params = {"centroids": jnp.asarray(centroids)}
  codes = tok.encode(params, jnp.asarray(images))
  np.testing.assert_array_equal(np.asarray(codes), np.arange(12).reshape(2, 6))
  out = tok.decode(params, codes, jnp.asarray(images))
  assert out.shape == images.shape
  np.testing.assert_allclose(out, images, atol=1e-5)


# ------------------------------------ k-means: fitting --------------------------------------
def test_minibatch_step_equals_the_numpy_update():
  rng = np.random.RandomState(0)
  x = rng.randn(40, 5).astype(F32)
  c = rng.randn(6, 5).astype(F32)
  c[3], c[5] = 100.0, -100.0  # far away: they get no point and must stay where they are
  n = np.array([3.0, 0.0, 5.0, 2.0, 7.0, 0.0], F32)  # counted before, or never
  a, gap = np_assign(x, c)
  assert gap.min() > 1e-3
  assert (a == 3).sum() == (a == 5).sum() == 0 and (a == 1).sum() > 0  # a fresh one gets points
  step = jax.jit(kmeans.minibatch_step)
  c_np, n_np = c, n
  c_jx, n_jx = jnp.asarray(c), jnp.asarray(n)
  for _ in range(2):  # the second step starts from the first one's counts
    c_np, n_np, inertia_np = np_minibatch_step(c_np, n_np, x)
    c_jx, n_jx, inertia = step(c_jx, n_jx, jnp.asarray(x))
    np.testing.assert_allclose(c_jx, c_np, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(n_jx, n_np)
    np.testing.assert_allclose(float(inertia), inertia_np, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(c_jx)[[3, 5]], c[[3, 5]])
    x = x + 0.2 * rng.randn(*x.shape).astype(F32)
  assert float(n_jx.sum()) == n.sum() + 80


def test_tokenizer_update_equals_numpy_on_image_patches():
  rng = np.random.RandomState(3)
  images = rng.rand(2, 16, 24, 1).astype(F32)
  points = np_normalize(np_patchify(images, 8, 8), 0.1).reshape(-1, 64)
  centroids = (rng.randn(4, 64)).astype(F32)
  counts = np.array([1.0, 0.0, 2.0, 0.0], F32)
  tok = kmeans.KMeansTokenizer((8, 8), 4)
  params, inertia = tok.update({"centroids": jnp.asarray(centroids), "counts": jnp.asarray(counts)},
                               jnp.asarray(images))
  c_np, n_np, inertia_np = np_minibatch_step(centroids, counts, points)
  np.testing.assert_allclose(params["centroids"], c_np, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(params["counts"], n_np)
  np.testing.assert_allclose(float(inertia), inertia_np, rtol=1e-5)


def test_minibatch_kmeans_recovers_the_centres_of_separated_blobs():
  """Distribution level: k-means++ then mini-batches drawn from 4 Gaussian blobs (sigma 0.5,
  6 apart) end at the blob centres, and the inertia at 2 sigma^2 (the blobs' own spread)."""
  rng = np.random.RandomState(1)
  centres = np.array([[0, 0], [6, 0], [0, 6], [6, 6]], np.float64) + [1.5, -2.0]
  sigma = 0.5

  def batch(m=64):
    return (centres[rng.randint(0, 4, m)] + sigma * rng.randn(m, 2)).astype(F32)

  c = kmeans.kmeans_plus_plus(jax.random.key(0), jnp.asarray(batch()), 4)
  n = jnp.zeros((4,), jnp.float32)
  step = jax.jit(kmeans.minibatch_step)
  inertias = []
  for _ in range(100):
    c, n, inertia = step(c, n, jnp.asarray(batch()))
    inertias.append(float(inertia))
  c = np.asarray(c, np.float64)
  match = np_sq_dist(centres, c).argmin(axis=1)
  assert sorted(match) == [0, 1, 2, 3]
  np.testing.assert_allclose(c[match], centres, atol=0.06)
  assert float(n.sum()) == 6400
  assert abs(np.mean(inertias[-50:]) - 2 * sigma ** 2) < 0.08


def test_kmeans_plus_plus_picks_input_points_one_from_each_cluster():
  rng = np.random.RandomState(2)
  centres = 20 * rng.randn(5, 3)
  labels = rng.permutation(np.repeat(np.arange(5), 12))
  pts = (centres[labels] + 0.05 * rng.randn(60, 3)).astype(F32)
  pick = jax.jit(jax.vmap(lambda key: kmeans.kmeans_plus_plus(key, jnp.asarray(pts), 5)))
  out = np.asarray(pick(jax.random.split(jax.random.key(0), 32)))
  assert out.shape == (32, 5, 3)
  one_each, firsts = 0, set()
  for rows in out:
    # Every row is one of the input points, exactly.
    hit = (rows[:, None, :] == pts[None]).all(-1)
    assert hit.any(axis=1).all()
    clusters = labels[hit.argmax(axis=1)]
    one_each += len(set(clusters)) == 5
    firsts.add(clusters[0])
  assert one_each >= 30, one_each
  assert len(firsts) >= 3  # the first pick is uniform, not always the same cluster


def test_kmeans_plus_plus_samples_in_proportion_to_squared_distance():
  """Points 0, 1, 2 on a line: after a first pick of 0 the second is 1 with probability
  1/5 and 2 with 4/5; after 2, 1 w.p. 1/5 and 0 w.p. 4/5; after 1, 0 or 2 evenly."""
  pts = jnp.asarray([[0.0], [1.0], [2.0]])
  pick = jax.jit(jax.vmap(lambda key: kmeans.kmeans_plus_plus(key, pts, 2)))
  out = np.asarray(pick(jax.random.split(jax.random.key(1), 3000)))[..., 0]
  first, second = out[:, 0], out[:, 1]
  assert np.isin(out, [0.0, 1.0, 2.0]).all() and (first != second).all()
  for f, p_far in ((0.0, 0.8), (2.0, 0.8), (1.0, 0.5)):
    sel = first == f
    assert abs(sel.mean() - 1 / 3) < 0.04  # uniform first pick
    far = {0.0: 2.0, 2.0: 0.0, 1.0: 2.0}[f]
    freq = (second[sel] == far).mean()
    assert abs(freq - p_far) < 4 * math.sqrt(p_far * (1 - p_far) / sel.sum()), (f, freq)


@pytest.mark.parametrize("distinct", [1, 2])
def test_kmeans_plus_plus_with_fewer_distinct_points_than_k_gives_no_nan(distinct):
  pts = np.repeat(np.arange(distinct, dtype=F32)[:, None] * [1.0, -2.0], 3, axis=0).astype(F32)
  out = np.asarray(kmeans.kmeans_plus_plus(jax.random.key(3), jnp.asarray(pts), 5))
  assert out.shape == (5, 2) and np.isfinite(out).all()
  assert (out[:, None, :] == pts[None]).all(-1).any(axis=1).all()
  assert len({tuple(r) for r in out}) == distinct


# ---------------------------------------- usage ---------------------------------------------
@pytest.mark.parametrize("counts,usage,perplexity", [
    ([5, 5, 0, 5, 0, 0, 5, 0], 0.5, 4.0),
    ([0, 0, 0, 9], 0.25, 1.0),
    ([2, 2, 2, 2], 1.0, 4.0),
    ([3, 1, 0, 6, 2, 0.5], None, None),
])
def test_usage_and_perplexity_equal_numpy(counts, usage, perplexity):
  want_usage, want_ppl = np_usage(counts)
  if usage is not None:
    assert (want_usage, want_ppl) == pytest.approx((usage, perplexity))
  got = common.usage(np.asarray(counts, F32))
  assert got["codebook_usage"] == pytest.approx(want_usage, rel=1e-9)
  assert got["perplexity"] == pytest.approx(want_ppl, rel=1e-6)


def test_usage_of_no_counts_is_zero():
  assert common.usage(np.zeros(8)) == {"codebook_usage": 0.0, "perplexity": 0.0}


def test_code_counts_leave_out_weightless_rows():
  codes = np.array([[0, 3, 3], [1, 1, 7], [2, 2, 2], [3, 0, 0]], np.int32)
  weight = np.array([1.0, 1.0, 0.0, 0.5], F32)
  want = np.zeros(8)
  for row, w in zip(codes, weight):
    for code in row:
      want[code] += w
  got = common.code_counts(jnp.asarray(codes), jnp.asarray(weight), 8)
  assert got.shape == (8,)
  np.testing.assert_allclose(got, want)


def test_kmeans_task_eval_leaves_out_padding_rows():
  """The kmeans_tokenizer task's eval sums: per-example mean squared distance of a patch to its
  centroid and the code histogram, over the rows the mask keeps only."""
  config = visual_tokenizer.get_config("kind=kmeans")
  override(config, **{"task.codebook_size": 5})
  task = tasks.build(config, pipeline.DataInfo(0, (16, 24, 1), 0, 0))
  rng = np.random.RandomState(4)
  images = rng.rand(3, 16, 24, 1).astype(F32)
  centroids = rng.randn(5, 64).astype(F32)
  mask = np.array([True, False, True])
  points = np_normalize(np_patchify(images, 8, 8), 0.1)  # [3, 6, 64]
  a, gap = np_assign(points.reshape(-1, 64), centroids)
  assert gap.min() > 1e-3
  a = a.reshape(3, 6)
  dist = np_sq_dist(points.reshape(-1, 64), centroids).min(axis=1).reshape(3, 6).mean(axis=1)
  sums = task.eval_sums({"centroids": jnp.asarray(centroids)}, {},
                        {"image": jnp.asarray(images), "mask": jnp.asarray(mask)}, None)
  np.testing.assert_allclose(sums["loss_sum"], dist[mask].sum(), rtol=1e-5)
  assert float(sums["count"]) == 2
  np.testing.assert_allclose(sums["code_counts"], np.bincount(a[mask].ravel(), minlength=5))
  out = task.eval_summary(jax.device_get(sums))
  want_usage, want_ppl = np_usage(np.bincount(a[mask].ravel(), minlength=5))
  assert out["codebook_usage"] == pytest.approx(want_usage)
  assert out["perplexity"] == pytest.approx(want_ppl, rel=1e-6)
  assert out["loss"] == pytest.approx(dist[mask].mean(), rel=1e-5)


# ------------------------------------------ FSQ ---------------------------------------------
LEVELS = [(8, 5, 5, 5), (7, 5, 5, 5, 5), (2, 3), (4, 6)]


@pytest.mark.parametrize("levels", LEVELS, ids=lambda l: "x".join(map(str, l)))
def test_fsq_equals_the_paper_reference(levels):
  rng = np.random.RandomState(sum(levels))
  d = len(levels)
  z = np.concatenate([2 * rng.randn(3000, d), rng.choice([-60.0, -8.0, 8.0, 60.0], (40, d)),
                      1e4 * np.sign(rng.randn(8, d))]).astype(F32)
  bounded, zhat, codes = np_fsq(z, levels)
  keep = ~near_rounding_boundary(bounded)
  assert keep.mean() > 0.99
  np.testing.assert_allclose(fsq.bound(jnp.asarray(z), levels), bounded, rtol=2e-6, atol=2e-6)
  got_zhat = np.asarray(fsq.quantize(jnp.asarray(z), levels))
  np.testing.assert_allclose(got_zhat[keep], zhat[keep], atol=1e-6)
  got_codes = fsq.codes_from_quantized(jnp.asarray(got_zhat), levels)
  assert got_codes.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got_codes)[keep], codes[keep])
  np.testing.assert_allclose(fsq.quantized_from_codes(jnp.asarray(codes, jnp.int32), levels),
                             zhat, atol=1e-6)
  # Straight-through: the gradient of quantize is that of the bound, over the half width.
  grad = jax.grad(lambda v: fsq.quantize(v, levels).sum())(jnp.asarray(z))
  np.testing.assert_allclose(grad, np_fsq_grad(z, levels), rtol=1e-4, atol=1e-6)
  half_width = jnp.asarray([l // 2 for l in levels], jnp.float32)
  want_grad = jax.grad(lambda v: (fsq.bound(v, levels) / half_width).sum())(jnp.asarray(z))
  np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("levels", LEVELS, ids=lambda l: "x".join(map(str, l)))
def test_fsq_codes_cover_the_codebook_and_invert(levels):
  n = int(np.prod(levels))
  # A dense grid of z: each channel in steps of 2/L over [-3, 3] (no level skipped: the bound's
  # slope is at most (L-1)/2).
  axes = [np.linspace(-3, 3, 3 * l + 1) for l in levels]
  z = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(levels)).astype(F32)
  codes = np.asarray(fsq.codes_from_quantized(fsq.quantize(jnp.asarray(z), levels), levels))
  assert set(codes.tolist()) == set(range(n))
  bounded, _, want = np_fsq(z, levels)
  keep = ~near_rounding_boundary(bounded)
  np.testing.assert_array_equal(codes[keep], want[keep])
  # codes -> quantized -> codes is the identity, and quantized values are the paper's.
  every = jnp.arange(n, dtype=jnp.int32)
  zhat = fsq.quantized_from_codes(every, levels)
  np.testing.assert_allclose(zhat, np_quantized_from_codes(np.arange(n), levels), atol=1e-7)
  np.testing.assert_array_equal(np.asarray(fsq.codes_from_quantized(zhat, levels)), np.arange(n))


TINY_ENCODER = dict(patch_size=(8, 8), width=16, depth=1, num_heads=2, mlp_dim=32, channels=1)


def test_fsq_autoencoder_tokenizer_codes_decode_and_error():
  model = fsq.FSQAutoencoder(encoder=TINY_ENCODER, levels=(3, 3), decoder_depth=1)
  tok = fsq.FSQTokenizer(model)
  assert tok.codebook_size == 9 and tok.patch_size == (8, 8)
  images = jnp.asarray(np.random.RandomState(5).randn(2, 16, 16, 1).astype(F32))

  @jax.jit
  def run(key, images):  # one compile for everything below
    params = model.init(key, images)["params"]
    pred, codes = model.apply({"params": params}, images)
    enc = tok.encode(params, images)
    latents = model.apply({"params": params}, images,
                          method=lambda m, x: m.project_in(m.vit(x)[1]["encoded"]))
    decoded = tok.decode(params, enc, images)
    error, codes2 = tok.reconstruction_error(params, images)
    return pred, codes, enc, latents, decoded, error, codes2

  pred, codes, enc, latents, decoded, error, codes2 = jax.device_get(run(jax.random.key(0), images))
  assert pred.shape == (2, 4, 64)
  assert enc.dtype == np.int32 and enc.shape == (2, 4)
  assert ((enc >= 0) & (enc < 9)).all()
  np.testing.assert_array_equal(enc, codes)
  np.testing.assert_array_equal(codes2, enc)
  # The codes are the paper's FSQ of the encoder's projected latents.
  assert latents.shape == (2, 4, 2)
  bounded, _, want = np_fsq(latents, (3, 3))
  assert not near_rounding_boundary(bounded).any()
  np.testing.assert_array_equal(enc, want)
  # Decoding the codes gives the autoencoder's own output, as images.
  assert decoded.shape == images.shape
  np.testing.assert_allclose(decoded, np_unpatchify(np.asarray(pred, np.float64), 8, 8, 2, 2, 1),
                             rtol=1e-4, atol=1e-5)
  want_error = np.square(np.asarray(pred, np.float64)
                         - np_patchify(np.asarray(images), 8, 8)).mean(axis=(1, 2))
  np.testing.assert_allclose(error, want_error, rtol=1e-5)


# --------------------------------- fitting and loading --------------------------------------
CODEBOOK = 16


def km_config(**overrides):
  """configs/visual_tokenizer.py:kind=kmeans,runlocal (12 steps of 32) with 16 codes."""
  c = visual_tokenizer.get_config("kind=kmeans,runlocal")
  c.progress_bar = False
  c.checkpoint.async_save = False
  return override(c, **{"task.codebook_size": CODEBOOK, **overrides})


def eval_images(config):
  """The eval split as numpy: (images [N, H, W, C], mask [N])."""
  images, masks = [], []
  for batch in pipeline.eval_iterator(config.data, global_batch_size=config.batch_size,
                                      labels=False, seed=config.seed):
    images.append(np.asarray(batch["image"]))
    masks.append(np.asarray(batch["mask"], bool))
  return np.concatenate(images), np.concatenate(masks)


@pytest.fixture(scope="module")
def kmeans_run(tmp_path_factory):
  """(workdir, summary) of a 12-step k-means fit, run once."""
  workdir = tmp_path_factory.mktemp("kmeans")
  return str(workdir), fitting.fit(km_config(), str(workdir))


def test_kmeans_fit_summary_and_load_agree_with_numpy(kmeans_run):
  workdir, summary = kmeans_run
  with open(os.path.join(workdir, "summary.json")) as f:
    saved = json.load(f)
  assert saved["eval"] == pytest.approx(summary["eval"])
  assert (saved["task"], saved["final_step"], saved["start_step"], saved["steps_run"]) == \
      ("kmeans_tokenizer", 12, 0, 12)
  evals = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [12]
  assert evals[0]["perplexity"] == pytest.approx(summary["eval"]["perplexity"])

  tok, params = fitting.load(workdir)
  assert isinstance(tok, kmeans.KMeansTokenizer)
  assert (tok.codebook_size, tuple(tok.patch_size), tok.eps) == (CODEBOOK, (8, 8), 0.1)
  centroids = np.asarray(params["centroids"], np.float64)
  assert centroids.shape == (CODEBOOK, 64) and np.isfinite(centroids).all()
  # Every patch of every mini-batch was counted once: 12 steps x 32 images x 64 patches.
  assert float(np.sum(params["counts"])) == 12 * 32 * 64

  # The eval split, coded in numpy with the loaded centroids, gives the summary's metrics.
  config = km_config()
  images, mask = eval_images(config)
  assert mask.sum() == summary["eval"]["examples"] == 256
  points = np_normalize(np_patchify(images[mask], 8, 8), 0.1)
  flat = points.reshape(-1, 64)
  want, gap = np_assign(flat, centroids)
  dist = np_sq_dist(flat, centroids).min(axis=1)
  clear = gap > 1e-3 * (1 + dist)
  assert clear.mean() > 0.95
  codes = np.asarray(jax.jit(tok.encode)(params, jnp.asarray(images[mask]))).reshape(-1)
  np.testing.assert_array_equal(codes[clear], want[clear])
  usage, ppl = np_usage(np.bincount(want, minlength=CODEBOOK))
  assert summary["eval"]["codebook_usage"] == pytest.approx(usage, abs=1e-9)
  assert summary["eval"]["perplexity"] == pytest.approx(ppl, rel=1e-3)
  assert summary["eval"]["loss"] == pytest.approx(dist.mean(), rel=1e-4)


def test_kmeans_fit_of_a_finished_workdir_returns_its_summary(kmeans_run):
  workdir, summary = kmeans_run
  again = fitting.fit(km_config(), workdir)
  assert again["wall_time_s"] == summary["wall_time_s"]
  assert again["eval"] == pytest.approx(summary["eval"])
  evals = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "eval"]
  assert len(evals) == 1


def test_cli_on_a_finished_workdir_prints_its_summary(kmeans_run):
  """`python -m vitoken.tokenizers` with the fixture's config: nothing left to fit, so it
  reports the saved summary."""
  workdir, summary = kmeans_run
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root)
  env.setdefault("JAX_PLATFORMS", "cpu")
  out = subprocess.run([sys.executable, "-m", "vitoken.tokenizers",
                        "--config=configs/visual_tokenizer.py:kind=kmeans,runlocal",
                        f"--config.task.codebook_size={CODEBOOK}", "--config.progress_bar=False",
                        f"--workdir={workdir}"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=120, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  e = summary["eval"]
  assert (f"tokenizer kmeans_tokenizer: codebook usage {e['codebook_usage']:.1%}, perplexity "
          f"{e['perplexity']:.1f}, eval error {e['loss']:.4f}") in out.stdout


def test_kmeans_fit_resumes_where_it_stopped(kmeans_run, tmp_path):
  """6 steps then 12 in the same workdir: the second fit runs steps 7..12 only, on the data
  the uninterrupted fit saw there, so it ends at the same centroids."""
  full_dir, _ = kmeans_run
  first = fitting.fit(km_config(total_steps=6), str(tmp_path))
  assert (first["start_step"], first["final_step"], first["steps_run"]) == (0, 6, 6)
  second = fitting.fit(km_config(), str(tmp_path))
  assert (second["start_step"], second["final_step"], second["steps_run"]) == (6, 12, 6)
  train_steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"]
  assert train_steps == [2, 4, 6, 8, 10, 12]
  _, resumed = fitting.load(str(tmp_path))
  _, full = fitting.load(full_dir)
  np.testing.assert_allclose(resumed["counts"], full["counts"])
  np.testing.assert_allclose(resumed["centroids"], full["centroids"], rtol=1e-5, atol=1e-6)


def test_fsq_fit_and_load_give_the_trained_codes(tmp_path):
  """A 4-step FSQ training (depth-1 encoder and decoder, levels 3x3) through the trainer; the
  loaded tokenizer's codes over the eval split give the run's own usage and perplexity."""
  c = visual_tokenizer.get_config("kind=fsq,runlocal")
  c.progress_bar = False
  override(c, **{"checkpoint.async_save": False, "total_steps": 4, "eval_every_steps": 0,
                 "checkpoint.every_steps": 4, "model.depth": 1, "task.decoder_depth": 1,
                 "task.levels": (3, 3)})
  summary = fitting.fit(c, str(tmp_path))
  assert (summary["task"], summary["final_step"]) == ("fsq_tokenizer", 4)
  tok, params = fitting.load(str(tmp_path))
  assert isinstance(tok, fsq.FSQTokenizer)
  assert (tok.codebook_size, tuple(tok.patch_size)) == (9, (8, 8))
  images, mask = eval_images(c)
  encode = jax.jit(tok.encode)
  codes = np.concatenate([np.asarray(encode(params, jnp.asarray(images[i:i + 128])))
                          for i in range(0, len(images), 128)])[mask]
  assert codes.shape == (256, 64) and codes.dtype == np.int32
  assert ((codes >= 0) & (codes < 9)).all()
  np.testing.assert_array_equal(np.asarray(encode(params, jnp.asarray(images[:128]))), codes[:128])
  usage, ppl = np_usage(np.bincount(codes.ravel(), minlength=9))
  assert summary["eval"]["codebook_usage"] == pytest.approx(usage, abs=1e-9)
  assert summary["eval"]["perplexity"] == pytest.approx(ppl, rel=1e-3)


# ----------------------------------------- errors -------------------------------------------
@pytest.mark.parametrize("size", [1, 0, True, 2.5])
def test_codebook_size_below_two_is_an_error(size):
  with pytest.raises(ValueError, match=r"codebook_size must be an int >= 2.*got"):
    kmeans.KMeansTokenizer((8, 8), size)


def test_kmeans_task_with_a_codebook_of_one_is_an_error():
  config = override(visual_tokenizer.get_config("kind=kmeans"), **{"task.codebook_size": 1})
  with pytest.raises(ValueError, match=r"codebook_size must be an int >= 2.*got 1"):
    tasks.build(config, pipeline.DataInfo(0, (64, 64, 1), 0, 0))


@pytest.mark.parametrize("levels", [(), (8, 1, 5), (0, 4), [], (3, 2.0)])
def test_fsq_levels_below_two_or_empty_are_an_error(levels):
  with pytest.raises(ValueError, match="FSQ levels must be a non-empty list of ints >= 2"):
    fsq.check_levels(levels)
  config = override(visual_tokenizer.get_config("kind=fsq"), **{"task.levels": levels})
  with pytest.raises(ValueError, match="FSQ levels must be a non-empty list of ints >= 2"):
    tasks.build(config, pipeline.DataInfo(0, (64, 64, 1), 0, 0))


def test_patch_size_mismatch_is_an_error_naming_both():
  with pytest.raises(ValueError,
                     match=r"at /runs/tok codes 8x8 patches but the model's patches are 16x16"):
    common.check_patch(8, (16, 16), "/runs/tok")
  with pytest.raises(ValueError, match=r"codes 8x4 patches but the model's patches are 8x8"):
    common.check_patch((8, 4), 8, "x")
  common.check_patch((8, 8), 8, "x")  # the same size, however written


def test_load_of_a_missing_path_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    fitting.load(str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="needs a `path`"):
    fitting.load("")


def test_load_of_a_workdir_that_is_not_a_tokenizer_is_an_error(kmeans_run, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(errors.CheckpointError, match=r"no checkpoint in \S+/empty: it holds no "
                                                   "finished checkpoint"):
    fitting.load(str(empty))
  # A finished run of another task: the k-means workdir with its saved config renamed.
  other = tmp_path / "classifier"
  shutil.copytree(kmeans_run[0], other)
  metas = [os.path.join(d, "meta", "metadata") for d in (other / "checkpoints").iterdir()]
  for meta in metas:
    with open(meta) as f:
      record = json.load(f)
    record["config"]["task"] = {"name": "classification"}
    with open(meta, "w") as f:
      json.dump(record, f)
  with pytest.raises(ValueError, match=r"holds a 'classification' run, not a tokenizer"):
    fitting.load(str(other))


def test_fit_of_a_config_that_is_not_a_tokenizer_is_an_error(tmp_path):
  c = km_config(**{"task": {"name": "classification"}})
  with pytest.raises(ValueError, match=r"'classification' is not a tokenizer"):
    fitting.fit(c, str(tmp_path))


def test_kmeans_init_with_fewer_patches_than_codes_is_an_error():
  tok = kmeans.KMeansTokenizer((8, 8), 8)
  with pytest.raises(ValueError, match=r"at least codebook_size=8 patches.*has 4"):
    tok.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
