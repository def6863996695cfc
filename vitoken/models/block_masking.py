"""BEiT's block-wise masking (Bao et al., ICLR 2022; microsoft/unilm `beit/masking_generator.py`).

Rectangles of patches are masked until a budget of patches is reached:
- each block draws a target area from U(min_patches, remaining budget) and an aspect ratio
  log-uniform in [min_aspect, 1 / min_aspect], then h = round(sqrt(area * aspect)),
  w = round(sqrt(area / aspect));
- it is accepted only if h < grid height and w < grid width (strictly) and it masks between 1
  and the remaining budget of new patches; a block gets up to 10 attempts;
- masking stops once the budget is reached or a block adds nothing.

The count of masked patches varies per example, but the mask is a fixed-shape boolean grid,
drawn on the host by the input pipeline from its per-example generator (so a resumed run draws
the same masks). Random draws come from `source.uniform(a, b)` and `source.randint(a, b)`
(inclusive) in the reference's order, so a `random.Random` reproduces it draw for draw.
"""
import math
from typing import Optional, Sequence, Union

import numpy as np

from vitoken.errors import ConfigError
from vitoken.models.patches import PatchGrid, spatial_grid

# BEiT's ImageNet setting: 75 of the 14 x 14 patches of a 224 px image with 16 px patches.
REFERENCE_BUDGET, REFERENCE_PATCHES = 75, 196
ATTEMPTS = 10


def default_budget(grid: Union[PatchGrid, Sequence[int]]) -> int:
  """BEiT's 75 of 196 patches (about 40%) scaled to a grid of another size."""
  gh, gw = spatial_grid(grid)
  return max(1, int(round(REFERENCE_BUDGET * gh * gw / REFERENCE_PATCHES)))


class GeneratorSource:
  """`uniform` / `randint` on a numpy Generator (the input pipeline's per-example source)."""

  def __init__(self, rng: np.random.Generator):
    self.rng = rng

  def uniform(self, a: float, b: float) -> float:
    return a + (b - a) * float(self.rng.random())

  def randint(self, a: int, b: int) -> int:
    return int(self.rng.integers(a, b + 1))


class BlockMasking:
  """`BlockMasking(grid)(source)` -> bool [gh, gw], True where a patch is masked; `grid` is a
  PatchGrid (of one frame), a (gh, gw) pair or one int for a square grid."""

  def __init__(self, grid, budget: Optional[int] = None, min_patches: int = 16,
               max_patches: Optional[int] = None, min_aspect: float = 0.3,
               max_aspect: Optional[float] = None):
    if isinstance(grid, PatchGrid):
      grid = spatial_grid(grid)
    grid = (grid, grid) if isinstance(grid, (int, np.integer)) else tuple(grid)
    if len(grid) != 2 or any(isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1
                             for g in grid):
      raise ConfigError(f"the mask grid must be (height, width) of positive ints, got {grid!r}")
    gh, gw = self.grid = tuple(int(g) for g in grid)
    budget = default_budget(self.grid) if budget is None else budget
    _check_count(budget, "mask_patches (the masking budget)")
    if budget > gh * gw:
      raise ConfigError(f"mask_patches {budget} is larger than the {gh}x{gw} grid of {gh * gw} "
                        "patches")
    _check_count(min_patches, "min_block_patches")
    if max_patches is not None:
      _check_count(max_patches, "max_block_patches")
    if (isinstance(min_aspect, bool) or not isinstance(min_aspect, (int, float))
        or not math.isfinite(min_aspect) or min_aspect <= 0):
      raise ConfigError(f"min_aspect must be a positive number, got {min_aspect!r}")
    max_aspect = max_aspect or 1 / min_aspect
    if max_aspect < min_aspect:
      raise ConfigError(f"max_aspect {max_aspect} is below min_aspect {min_aspect}")
    self.budget, self.min_patches = int(budget), int(min_patches)
    self.max_patches = self.budget if max_patches is None else int(max_patches)
    self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

  def _block(self, mask, room: int, source) -> int:
    """Masks one block of at most `room` new patches; returns how many it added."""
    gh, gw = self.grid
    for _ in range(ATTEMPTS):
      area = source.uniform(self.min_patches, room)
      aspect = math.exp(source.uniform(*self.log_aspect))
      h = int(round(math.sqrt(area * aspect)))
      w = int(round(math.sqrt(area / aspect)))
      added = 0
      if h < gh and w < gw:
        top, left = source.randint(0, gh - h), source.randint(0, gw - w)
        window = mask[top:top + h, left:left + w]
        new = h * w - int(window.sum())
        if 0 < new <= room:
          window[...] = True
          added = new
      if added:
        return added
    return 0

  def __call__(self, source) -> np.ndarray:
    mask = np.zeros(self.grid, dtype=bool)
    count = 0
    while count < self.budget:
      added = self._block(mask, min(self.budget - count, self.max_patches), source)
      if not added:
        break
      count += added
    return mask

  def batch(self, size: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [size, gh * gw], 1 where masked: one mask per example from `rng`."""
    source = GeneratorSource(rng)
    return np.stack([self(source).reshape(-1) for _ in range(size)]).astype(np.float32)


def _check_count(value, what: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ConfigError(f"{what} must be a positive int, got {value!r}")
