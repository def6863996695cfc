"""The merged-groups picture."""
import numpy as np
from PIL import Image

from vitoken import visualize


def _source():
  """4 patches (2x2 grid) + a class token; patches 0 and 3 merged into token 1."""
  s = np.zeros((4, 5))
  s[0, 0] = 1          # class token
  s[1, [1, 4]] = 1     # patches 0 and 3
  s[2, 2] = 1
  s[3, 3] = 1
  return s


def test_groups_are_painted_with_their_mean_colour(tmp_path):
  image = np.zeros((8, 8, 3), np.uint8)
  image[:4, :4] = 200   # patch 0
  image[4:, 4:] = 100   # patch 3 (same group as patch 0)
  image[:4, 4:] = 50    # patch 1
  groups = visualize.token_groups(_source(), 1, (2, 2))
  np.testing.assert_array_equal(groups, [[1, 2], [3, 1]])
  painted = visualize.merge_groups_image(image, _source(), num_prefix=1, grid=(2, 2))
  assert painted.shape == (8, 8, 3) and painted.dtype == np.uint8
  np.testing.assert_array_equal(painted[0, 0], painted[7, 7])  # one group, one colour
  assert painted[0, 0, 0] == 150  # mean of 200 and 100 (interior pixel, no border)
  assert painted[0, 4, 0] > painted[1, 5, 0]  # the group boundary (patch 1 starts at x=4) is outlined
  path = visualize.save_merge_png(str(tmp_path / "m.png"), image, _source(), num_prefix=1, grid=(2, 2), scale=2)
  with Image.open(path) as pic:
    assert pic.size == ((8 + 4 + 8) * 2, 16) and pic.mode == "RGB"


def test_normalised_and_grayscale_images_are_accepted():
  image = np.linspace(-1, 1, 64).reshape(8, 8, 1)
  out = visualize.merge_groups_image(image, np.eye(4), num_prefix=0, grid=(2, 2))
  assert out.shape == (8, 8, 3) and out.min() >= 0
