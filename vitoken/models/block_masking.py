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

On clips (the `violet` task) the blocks are cuboids of the [gt, gh, gw] token grid (time
slices x rows x columns, tokens time-major):
- `SpaceTimeBlockMasking`: BEiT's rules with a temporal extent. Each cuboid draws a target
  volume from U(min_patches, remaining budget), a frame count from randint(min_frames,
  max_frames), an aspect ratio as BEiT; its face has area volume / frames, h and w as BEiT
  (strictly inside the spatial grid), then a first slice randint(0, gt - frames), a top and a
  left; it is accepted when it masks between 1 and the remaining budget of new tokens (up to
  10 attempts), and masking stops at the budget or when a cuboid adds nothing.
- `VioletBlockMasking`: VIOLET's blockwise masking (tsujuifu/pytorch_violet
  `main_pretrain.py`, `Agent_Pretrain.masking`): gt cuboids, each of t = randint(1, gt - 1)
  slices (1 when gt = 1), h = randint(1, gh * 2 // 3 - 1) rows and w = randint(1, gw * 2 // 3
  - 1) columns (numpy's exclusive bounds written inclusive), then its corner t1, top, left;
  their union is masked, with no budget.
"""
import math
from typing import Optional, Sequence, Tuple, Union

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


class _BlocksToBudget:
  """Draws blocks (`_block`, a subclass's shape rule) until `budget` positions of `grid` are
  masked or a block adds none (BEiT's loop)."""
  grid: Tuple[int, ...]
  budget: int
  max_patches: int

  def _block(self, mask, room: int, source) -> int:
    raise NotImplementedError

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
    """float32 [size, positions] (time-major for clips), 1 where masked: one mask per example
    from `rng`."""
    source = GeneratorSource(rng)
    return np.stack([self(source).reshape(-1) for _ in range(size)]).astype(np.float32)


class BlockMasking(_BlocksToBudget):
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



def _check_count(value, what: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ConfigError(f"{what} must be a positive int, got {value!r}")


def clip_budget(grid: Sequence[int], mask_ratio: Optional[float] = None) -> int:
  """Masked tokens of a [gt, gh, gw] clip grid: round(mask_ratio * tokens), by default BEiT's
  share (75 of 196) of the tokens."""
  tokens = math.prod(grid)
  share = REFERENCE_BUDGET / REFERENCE_PATCHES if mask_ratio is None else mask_ratio
  return max(1, int(round(share * tokens)))


def _check_clip_grid(grid) -> Tuple[int, int, int]:
  grid = tuple(grid.grid) if isinstance(grid, PatchGrid) else tuple(grid)
  if len(grid) != 3 or any(isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1
                           for g in grid):
    raise ConfigError(f"the space-time mask grid must be (time slices, height, width) of positive "
                      f"ints, got {grid!r}")
  return tuple(int(g) for g in grid)


class SpaceTimeBlockMasking(_BlocksToBudget):
  """`SpaceTimeBlockMasking(grid)(source)` -> bool [gt, gh, gw], True where a token is masked:
  BEiT's blocks as cuboids over time (module docstring). `budget` counts tokens of the clip."""

  def __init__(self, grid, budget: Optional[int] = None, min_patches: int = 16,
               max_patches: Optional[int] = None, min_aspect: float = 0.3,
               min_frames: int = 1, max_frames: Optional[int] = None):
    self.grid = _check_clip_grid(grid)
    gt = self.grid[0]
    # BEiT's spatial rules (aspect, counts), checked by its own generator over the whole grid.
    spatial = BlockMasking(self.grid[1:], 1, min_patches, None, min_aspect)
    budget = clip_budget(self.grid) if budget is None else budget
    _check_count(budget, "mask_patches (the masking budget)")
    tokens = math.prod(self.grid)
    if budget > tokens:
      raise ConfigError(f"the masking budget of {budget} tokens is more than the "
                        f"{'x'.join(map(str, self.grid))} clip grid's {tokens}")
    if max_patches is not None:
      _check_count(max_patches, "max_block_patches")
    _check_count(min_frames, "min_block_frames")
    max_frames = gt if max_frames is None else max_frames
    _check_count(max_frames, "max_block_frames")
    if max_frames > gt:
      raise ConfigError(f"max_block_frames {max_frames} is more than the {gt} time slices of the "
                        "token grid")
    if min_frames > max_frames:
      raise ConfigError(f"min_block_frames {min_frames} is more than max_block_frames {max_frames}")
    self.budget, self.min_patches = int(budget), spatial.min_patches
    self.max_patches = self.budget if max_patches is None else int(max_patches)
    self.frames = (int(min_frames), int(max_frames))
    self.log_aspect = spatial.log_aspect

  def _block(self, mask, room: int, source) -> int:
    """Masks one cuboid of at most `room` new tokens; returns how many it added."""
    gt, gh, gw = self.grid
    for _ in range(ATTEMPTS):
      volume = source.uniform(self.min_patches, room)
      frames = source.randint(*self.frames)
      aspect = math.exp(source.uniform(*self.log_aspect))
      area = volume / frames
      h = int(round(math.sqrt(area * aspect)))
      w = int(round(math.sqrt(area / aspect)))
      if h < gh and w < gw:
        first = source.randint(0, gt - frames)
        top, left = source.randint(0, gh - h), source.randint(0, gw - w)
        window = mask[first:first + frames, top:top + h, left:left + w]
        new = frames * h * w - int(window.sum())
        if 0 < new <= room:
          window[...] = True
          return new
    return 0



class VioletBlockMasking(SpaceTimeBlockMasking):
  """VIOLET's blockwise masking (module docstring): gt random cuboids, no budget."""

  def __init__(self, grid):
    self.grid = _check_clip_grid(grid)
    gt, gh, gw = self.grid
    if gh * 2 // 3 < 2 or gw * 2 // 3 < 2:
      raise ConfigError(f"VIOLET's blockwise masking draws block sides from [1, 2/3 of the grid); "
                        f"a {gh}x{gw} token grid leaves none (it needs at least 3x3)")

  def __call__(self, source) -> np.ndarray:
    gt, gh, gw = self.grid
    mask = np.zeros(self.grid, dtype=bool)
    for _ in range(gt):
      t = source.randint(1, gt - 1) if gt > 1 else 1
      h, w = source.randint(1, gh * 2 // 3 - 1), source.randint(1, gw * 2 // 3 - 1)
      t1, top, left = (source.randint(0, gt - t), source.randint(0, gh - h),
                       source.randint(0, gw - w))
      mask[t1:t1 + t, top:top + h, left:left + w] = True
    return mask
