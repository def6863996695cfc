"""PatchGrid: sizes, patchify orders (MAE's in 2-D, time-major in 3-D) and their inverses."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitoken.models import mae, masking, vit
from vitoken.models.patches import PatchGrid, spatial_grid
from vitoken.models.reducers import base


def mae_patchify_nchw(imgs, ph, pw):
  """facebookresearch/mae `patchify` (NCHW einsum), generalised to non-square patches."""
  n, c, h, w = imgs.shape
  x = imgs.reshape(n, c, h // ph, ph, w // pw, pw)
  x = np.einsum("nchpwq->nhwpqc", x)
  return x.reshape(n, (h // ph) * (w // pw), ph * pw * c)


def video_patchify(videos, pt, ph, pw):
  """Independent reference of the 3-D order by loops: tokens (frame, row, column), each patch
  flattened (time, row, column, channel)."""
  b, t, h, w, c = videos.shape
  out = []
  for bi in range(b):
    tokens = []
    for i in range(t // pt):
      for j in range(h // ph):
        for k in range(w // pw):
          cube = videos[bi, i * pt:(i + 1) * pt, j * ph:(j + 1) * ph, k * pw:(k + 1) * pw]
          tokens.append(cube.reshape(-1))
    out.append(np.stack(tokens))
  return np.stack(out)


def _rand(shape, seed=0):
  return np.random.RandomState(seed).randn(*shape).astype(np.float32)


# ---- construction and sizes -------------------------------------------------------------
def test_2d_sizes():
  g = PatchGrid.of((32, 48), 8)
  assert g == PatchGrid((8, 8), (4, 6))
  assert g.ndim == 2 and g.hw == (4, 6) and g.frames == 1 and g.num_patches == 24
  assert g.size == g.image_size == (32, 48) and g.patch_dim(3) == 192
  assert PatchGrid.of((32, 48), (4, 8)).grid == (8, 6)
  assert hash(g) == hash(PatchGrid.of((32, 48), (8, 8)))  # a static pytree field


def test_3d_sizes():
  g = PatchGrid.of((8, 32, 48), (2, 8, 16))
  assert g.grid == (4, 4, 3) and g.hw == (4, 3) and g.frames == 4 and g.num_patches == 48
  assert g.size == (8, 32, 48) and g.patch_dim(3) == 2 * 8 * 16 * 3
  # A spatial patch (or one int) over a video is one frame deep.
  assert PatchGrid.of((5, 32, 48), (8, 16)).patch == (1, 8, 16)
  assert PatchGrid.of((5, 32, 48), 8) == PatchGrid((1, 8, 8), (5, 4, 6))


@pytest.mark.parametrize("size, patch, message", [
    ((30, 32), 8, "patch size 8x8 does not divide the image size 30x32"),
    ((32, 30), (8, 4), "patch size 8x4 does not divide the image size 32x30"),
    ((5, 32, 32), (2, 8, 8), "clips of 5 frames do not split into tubelets of 2 frames"),
    ((4, 32, 30), (2, 8, 8), "patch size 2x8x8 does not divide the image size 4x32x30"),
    ((32, 32), (2, 8, 8), "does not match the 2-D image size"),
    ((32,), 8, "image size must be"),
])
def test_sizes_the_patch_does_not_divide_are_errors(size, patch, message):
  with pytest.raises(ValueError, match=message):
    PatchGrid.of(size, patch)


def test_invalid_grids_are_errors():
  with pytest.raises(ValueError, match="2-D .* or 3-D"):
    PatchGrid((8, 8), (4, 4, 4))
  with pytest.raises(ValueError, match="patch size must be ints >= 1"):
    PatchGrid((0, 8), (4, 4))
  with pytest.raises(ValueError, match="2-D position embedding cannot cover a grid of 2 frames"):
    spatial_grid(PatchGrid((1, 4, 4), (2, 3, 3)))


def test_the_masking_helpers_keep_their_message():
  with pytest.raises(ValueError, match="patch size 8x8 does not divide the image size 30x32"):
    masking.patch_grid((30, 32), 8)
  assert masking.patch_grid((32, 48), 8) == (4, 6)
  with pytest.raises(ValueError, match=r"images must be \[batch, height, width, channels\]"):
    masking.patchify(jnp.zeros((2, 8, 8)), 4)


# ---- patchify / unpatchify --------------------------------------------------------------
@pytest.mark.parametrize("h, w, ph, pw, c", [(32, 32, 8, 8, 3), (24, 40, 8, 4, 2), (16, 16, 16, 16, 1)])
def test_2d_patchify_is_maes_order_bit_for_bit(h, w, ph, pw, c):
  images = _rand((2, h, w, c))
  want = mae_patchify_nchw(images.transpose(0, 3, 1, 2), ph, pw)
  grid = PatchGrid.of((h, w), (ph, pw))
  for x in (images, jnp.asarray(images)):
    got = np.asarray(grid.patchify(x))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(masking.patchify(x, (ph, pw))), want)
  assert mae.patchify is masking.patchify and mae.unpatchify is masking.unpatchify


@pytest.mark.parametrize("shape, patch", [((2, 32, 24, 3), (8, 4)), ((1, 4, 16, 8, 2), (2, 4, 8)),
                                          ((2, 3, 8, 8, 1), (1, 8, 8))])
def test_round_trips(shape, patch):
  x = _rand(shape, 1)
  grid = PatchGrid.of(shape[1:-1], patch)
  tokens = grid.patchify(jnp.asarray(x))
  assert tokens.shape == (shape[0], grid.num_patches, grid.patch_dim(shape[-1]))
  np.testing.assert_array_equal(np.asarray(grid.unpatchify(tokens, shape[-1])), x)
  np.testing.assert_array_equal(grid.unpatchify(grid.patchify(x), shape[-1]), x)  # numpy too
  if len(shape) == 4:
    np.testing.assert_array_equal(
        np.asarray(masking.unpatchify(masking.patchify(x, patch), patch, grid.grid, shape[-1])), x)


def test_3d_order_against_a_reference():
  videos = _rand((2, 6, 16, 24, 3), 2)
  grid = PatchGrid.of((6, 16, 24), (3, 8, 4))
  np.testing.assert_array_equal(np.asarray(grid.patchify(jnp.asarray(videos))),
                                video_patchify(videos, 3, 8, 4))


def test_3d_grid_of_one_frame_one_deep_matches_2d():
  images = _rand((2, 16, 24, 3), 3)
  flat, deep = PatchGrid.of((16, 24), (8, 4)), PatchGrid.of((1, 16, 24), (1, 8, 4))
  assert deep.num_patches == flat.num_patches and deep.hw == flat.hw and deep.frames == 1
  assert deep.patch_dim(3) == flat.patch_dim(3)
  tokens = flat.patchify(images)
  np.testing.assert_array_equal(deep.patchify(images[:, None]), tokens)
  np.testing.assert_array_equal(deep.unpatchify(tokens, 3)[:, 0], images)
  assert spatial_grid(deep) == spatial_grid(flat) == (2, 6)


def test_shape_errors():
  grid = PatchGrid.of((16, 16), 8)
  with pytest.raises(ValueError, match=r"images must be \[batch, height, width, channels\]"):
    grid.patchify(np.zeros((1, 2, 16, 16, 3)))
  with pytest.raises(ValueError, match="are not the 16x16 pixels of a 2x2 grid of 8x8 patches"):
    grid.patchify(np.zeros((1, 16, 24, 3)))
  with pytest.raises(ValueError, match=r"patches of shape \(1, 4, 100\) are not 2x2 patches of 8x8x3"):
    grid.unpatchify(np.zeros((1, 4, 100)), 3)
  video = PatchGrid.of((2, 16, 16), (2, 8, 8))
  with pytest.raises(ValueError, match=r"\[batch, time, height, width, channels\]"):
    video.patchify(np.zeros((1, 16, 16, 3)))


# ---- where the models use it ------------------------------------------------------------
def test_vit_grid_and_token_state():
  model = vit.Model(0, patch_size=(8, 4), width=16, depth=1, num_heads=2, pool_type="none")
  assert model.patch_grid((16, 24)) == PatchGrid((8, 4), (2, 6))
  images = jnp.zeros((1, 16, 24, 3))
  _, aux = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), images)[0])
  assert aux["state"].grid == PatchGrid((8, 4), (2, 6))
  with pytest.raises(ValueError, match="patch size 8x4 does not divide the image size 20x24"):
    model.patch_grid((20, 24))
  # A bare (gh, gw) still builds a state: a grid of 1-pixel patches.
  state = base.TokenState.create(jnp.zeros((1, 7, 4)), num_prefix=1, grid=(2, 3))
  assert state.grid == PatchGrid((1, 1), (2, 3)) and state.grid.num_patches == 6
