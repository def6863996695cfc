"""A k-means visual tokenizer: one code per patch, the nearest of `codebook_size` centroids of
contrast-normalised patches (`common.normalized_patches`).

Fitting is mini-batch k-means (Sculley, WWW 2010, in scikit-learn's batched form) streamed
over the training set: centroids start by k-means++ (Arthur & Vassilvitskii, 2007) on the
patches of the first batch; every batch then assigns its patches to their nearest centroid
and moves each centroid to the running mean of every patch ever assigned to it:
    c <- (n_c * c + sum of the batch's patches in c) / (n_c + m_c),   n_c <- n_c + m_c.
`python -m vitoken.tokenizers --config=configs/visual_tokenizer.py:kind=kmeans --workdir=DIR`
fits one and saves {"centroids", "counts"} as an orbax checkpoint with its config.
"""
import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vitoken.errors import ConfigError
from vitoken.models.patches import PatchGrid
from vitoken.models.tokenizers import common


def sq_distances(points, centroids):
  """[N, K] squared distances (the ||x||^2 term included, so values are exact distances)."""
  return (jnp.sum(points * points, axis=-1, keepdims=True) - 2 * points @ centroids.T
          + jnp.sum(centroids * centroids, axis=-1)[None, :])


def assign(points, centroids):
  """int32 [...]: the nearest centroid of each point ([..., D] against [K, D])."""
  flat = points.reshape(-1, points.shape[-1])
  return jnp.argmin(sq_distances(flat, centroids), axis=-1).astype(jnp.int32).reshape(points.shape[:-1])


def kmeans_plus_plus(key, points, k: int):
  """k centroids from `points` [N, D]: the first uniformly, each next one with probability
  proportional to its squared distance from the nearest centroid chosen so far."""
  n = points.shape[0]
  key, first_key = jax.random.split(key)
  first = points[jax.random.randint(first_key, (), 0, n)]
  centroids = jnp.zeros((k, points.shape[1]), points.dtype).at[0].set(first)
  nearest = jnp.sum(jnp.square(points - first), axis=-1)

  def body(i, carry):
    centroids, nearest, key = carry
    key, sub = jax.random.split(key)
    # All-zero distances (fewer distinct points than k) fall back to a uniform draw.
    logits = jnp.where(nearest.sum() > 0, jnp.log(jnp.maximum(nearest, 0.0) + 1e-30), 0.0)
    c = points[jax.random.categorical(sub, logits)]
    return (centroids.at[i].set(c), jnp.minimum(nearest, jnp.sum(jnp.square(points - c), axis=-1)),
            key)

  centroids, _, _ = jax.lax.fori_loop(1, k, body, (centroids, nearest, key))
  return centroids


def minibatch_step(centroids, counts, points):
  """One mini-batch k-means update: (centroids, counts, mean squared distance before it)."""
  d = sq_distances(points, centroids)
  codes = jnp.argmin(d, axis=-1)
  k = centroids.shape[0]
  sums = jax.ops.segment_sum(points, codes, num_segments=k)
  batch_counts = jax.ops.segment_sum(jnp.ones_like(codes, jnp.float32), codes, num_segments=k)
  new_counts = counts + batch_counts
  moved = (centroids * counts[:, None] + sums) / jnp.maximum(new_counts, 1.0)[:, None]
  centroids = jnp.where((batch_counts > 0)[:, None], moved, centroids)
  return centroids, new_counts, jnp.mean(jnp.min(d, axis=-1))


@dataclasses.dataclass(frozen=True)
class KMeansTokenizer:
  """`encode(params, images)` -> int32 [B, L] codes; params = {"centroids": [K, D], ...}."""
  patch_size: Tuple[int, int]
  codebook_size: int
  eps: float = 0.1
  kind = "kmeans"

  def __post_init__(self):
    common.check_codebook_size(self.codebook_size)
    if (not isinstance(self.eps, (int, float, np.floating)) or isinstance(self.eps, bool)
        or not np.isfinite(self.eps) or self.eps <= 0):
      raise ConfigError(f"eps must be a positive number, got {self.eps!r}")

  def patches(self, images):
    return common.normalized_patches(images, self.patch_size, self.eps)

  def encode(self, params, images):
    return assign(self.patches(images), params["centroids"].astype(jnp.float32))

  def decode(self, params, codes, images):
    """Pixels [B, H, W, C]: each patch's centroid at the patch's own mean and contrast (a
    centroid holds only the normalised shape)."""
    mean, var = common.patch_stats(images, self.patch_size)
    shapes = params["centroids"].astype(jnp.float32)[codes]
    grid = PatchGrid.of(images.shape[1:3], self.patch_size)
    return grid.unpatchify(shapes * jnp.sqrt(var + self.eps) + mean, images.shape[-1])

  def init(self, key, images):
    """Params for fitting: k-means++ centroids from the patches of `images`."""
    points = self.patches(images).reshape(-1, self.patch_dim(images.shape[-1]))
    if points.shape[0] < self.codebook_size:
      raise ConfigError(f"k-means++ needs at least codebook_size={self.codebook_size} patches to "
                        f"start from; the first batch has {points.shape[0]}: raise batch_size")
    return {"centroids": kmeans_plus_plus(key, points, self.codebook_size),
            "counts": jnp.zeros((self.codebook_size,), jnp.float32)}

  def patch_dim(self, channels: int) -> int:
    return self.patch_size[0] * self.patch_size[1] * channels

  def update(self, params, images):
    """One mini-batch k-means step on the patches of `images`: (params, mean sq distance)."""
    points = self.patches(images).reshape(-1, self.patch_dim(images.shape[-1]))
    centroids, counts, inertia = minibatch_step(params["centroids"], params["counts"], points)
    return {"centroids": centroids, "counts": counts}, inertia
