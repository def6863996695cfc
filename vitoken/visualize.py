"""Pictures of what token reduction did (which patches ended up in the same token) and of
masked-modeling reconstructions.

A `grid` is the model's patch grid: a `PatchGrid` (e.g. `TokenState.grid`, of one frame) or
its (gh, gw).
"""
import io
from typing import Sequence, Union

import numpy as np
from PIL import Image

from vitoken.models.patches import PatchGrid, spatial_grid

Grid = Union[PatchGrid, Sequence[int]]


def token_groups(source, num_prefix: int, grid: Grid) -> np.ndarray:
  """[gh, gw] map: the index of the token that holds each patch (one example's source [N, N0])."""
  source = np.asarray(source)
  return source[:, num_prefix:].argmax(axis=0).reshape(spatial_grid(grid))


def _rgb01(image) -> np.ndarray:
  """Any [H, W, C] image (uint8, [0, 1] or normalised to [-1, 1]) as float RGB in [0, 1]."""
  img = np.asarray(image, np.float32)
  if img.ndim != 3:
    raise ValueError(f"image must be [H, W, C], got shape {img.shape}")
  if img.max() > 1.5:
    img = img / 255.0
  elif img.min() < 0:
    img = (img + 1.0) / 2.0
  img = np.clip(img, 0, 1)
  return np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img


DROPPED, FUSED = -1, -2  # `token_fates` codes of patches that no kept token holds


def token_fates(num_prefix: int, grid: Grid, *, ids=None, source=None) -> np.ndarray:
  """[gh, gw] map of what became of each patch, for one example: the index of the token that
  holds it (merged patches share one), FUSED where only a fused or learned token holds it
  (EViT's fused token), DROPPED where no token does (pruned).

  `source` [N, N0] (TokenState.source, traced with `trace_source=True`) follows merges and
  fusions; `ids` [N] (TokenState.ids, or a pruning layer's recorded "ids") is enough for
  pruning alone: each kept id holds its own patch and every other patch counts as dropped.
  """
  gh, gw = spatial_grid(grid)
  if source is not None:
    source = np.asarray(source, np.float32)[:, num_prefix:]
    if ids is not None:
      learned = np.asarray(ids) < 0
    else:
      learned = np.zeros(source.shape[0], bool)
    real = np.where(learned[:, None], 0.0, source)
    owner = real.argmax(axis=0)
    fates = np.where(real.max(axis=0) > 0, owner, DROPPED)
    fused = (fates == DROPPED) & (np.where(learned[:, None], source, 0.0).max(axis=0) > 0)
    return np.where(fused, FUSED, fates).reshape(gh, gw)
  if ids is None:
    raise ValueError("token_fates needs the tokens' `ids` or their `source`")
  ids = np.asarray(ids)
  fates = np.full(gh * gw, DROPPED)
  kept = np.nonzero(ids >= num_prefix)[0]
  fates[ids[kept] - num_prefix] = kept
  return fates.reshape(gh, gw)


def _pixel_groups(groups, h: int, w: int) -> np.ndarray:
  gh, gw = groups.shape
  if h % gh or w % gw:
    raise ValueError(f"image {h}x{w} is not a whole number of {gh}x{gw} patches")
  return np.kron(groups, np.ones((h // gh, w // gw), dtype=groups.dtype))


def _outlined(out, pixel_groups) -> np.ndarray:
  """Light outlines between groups; uint8 [H, W, 3]."""
  edge = np.zeros(pixel_groups.shape, bool)
  edge[:, 1:] |= pixel_groups[:, 1:] != pixel_groups[:, :-1]
  edge[1:, :] |= pixel_groups[1:, :] != pixel_groups[:-1, :]
  out[edge] = out[edge] * 0.3 + 0.7
  return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def merge_groups_image(image, source, *, num_prefix: int, grid: Grid) -> np.ndarray:
  """Paints every group of merged patches with its mean colour, outlined, as ToMe's figures do.

  image: [H, W, C] (uint8, or float in [0, 1] / [-1, 1]); source: [N, N0] for this example.
  Returns uint8 [H, W, 3].
  """
  img = _rgb01(image)
  pixel_groups = _pixel_groups(token_groups(source, num_prefix, grid), *img.shape[:2])
  out = np.zeros_like(img)
  for g in np.unique(pixel_groups):
    sel = pixel_groups == g
    out[sel] = img[sel].mean(axis=0)
  return _outlined(out, pixel_groups)


def _paint_fates(img, fates) -> np.ndarray:
  """Single patches as they are, merged groups in their mean colour, dropped patches dimmed
  and fused ones dimmed in blue, outlined."""
  pixel_groups = _pixel_groups(fates, *img.shape[:2])
  out = img.copy()
  values, counts = np.unique(fates, return_counts=True)
  for g, count in zip(values, counts):
    sel = pixel_groups == g
    if g == DROPPED:
      out[sel] = img[sel] * 0.25
    elif g == FUSED:
      out[sel] = img[sel] * 0.25 + np.array([0.0, 0.1, 0.45], np.float32)
    elif count > 1:
      out[sel] = img[sel].mean(axis=0)
  return _outlined(out, pixel_groups)


def survivors_image(image, *, num_prefix: int, grid: Grid, ids=None, source=None
                    ) -> np.ndarray:
  """Which patches survive token reduction, over the image (see `token_fates`): kept patches
  as they are, merged groups in their mean colour, pruned patches dimmed, fused ones dimmed in
  blue. image: [H, W, C]; ids [N] and/or source [N, N0] for this example. uint8 [H, W, 3]."""
  return _paint_fates(_rgb01(image), token_fates(num_prefix, grid, ids=ids, source=source))


def save_survivors_png(path: str, image, *, num_prefix: int, grid: Grid, ids=None,
                       source=None, scale: int = 1) -> str:
  """Writes the original image and its surviving tokens side by side as a PNG."""
  painted = survivors_image(image, num_prefix=num_prefix, grid=grid, ids=ids, source=source)
  return _save_side_by_side(path, image, painted, scale)


def save_merge_png(path: str, image, source, *, num_prefix: int, grid: Grid,
                   scale: int = 1) -> str:
  """Writes the original image and its merged groups side by side as a PNG."""
  painted = merge_groups_image(image, source, num_prefix=num_prefix, grid=grid)
  return _save_side_by_side(path, image, painted, scale)


def _save_side_by_side(path, image, painted, scale):
  original = (_rgb01(image) * 255).round().astype(np.uint8)
  both = np.concatenate([original, np.full((original.shape[0], 4, 3), 255, np.uint8), painted], axis=1)
  with open(path, "wb") as f:
    f.write(png_bytes(both, scale=scale))
  return path


def reconstruction_grid(original, masked, reconstruction, pixel_mask, *, gap: int = 2) -> np.ndarray:
  """uint8 [rows, cols, 3] picture: one row per example of (original, masked input,
  reconstruction, reconstruction with the visible patches pasted back, as MAE's demo shows).
  All [B, H, W, C] in the model's input scale; pixel_mask [B, H, W, C] is 1 where a patch was
  masked, shown grey in the second column. Each row is scaled to [0, 1] by its original's
  range, so the columns share one colour scale."""
  original, masked = np.asarray(original, np.float32), np.asarray(masked, np.float32)
  reconstruction, pixel_mask = np.asarray(reconstruction, np.float32), np.asarray(pixel_mask, np.float32)
  if not original.shape == masked.shape == reconstruction.shape == pixel_mask.shape or original.ndim != 4:
    raise ValueError("reconstruction_grid needs four [B, H, W, C] arrays of one shape, got "
                     f"{[a.shape for a in (original, masked, reconstruction, pixel_mask)]}")
  rows = []
  for orig, mask, rec in zip(original, pixel_mask, reconstruction):
    lo, hi = float(orig.min()), float(orig.max())
    scale = lambda a: np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)  # noqa: E731
    cells = [scale(orig), np.where(mask > 0, 0.5, scale(orig)), scale(rec),
             scale(np.where(mask > 0, rec, orig))]
    cells = [np.repeat(c, 3, axis=-1) if c.shape[-1] == 1 else c[..., :3] for c in cells]
    sep = np.ones((orig.shape[0], gap, 3), np.float32)
    rows.append(np.concatenate([part for c in cells for part in (c, sep)][:-1], axis=1))
  sep = np.ones((gap, rows[0].shape[1], 3), np.float32)
  picture = np.concatenate([part for row in rows for part in (row, sep)][:-1], axis=0)
  return (picture * 255).round().astype(np.uint8)


def clip_reconstruction_grid(original, pixel_mask, reconstruction, *, gap: int = 2) -> np.ndarray:
  """uint8 picture of clips [B, T, H, W, C]: per clip three rows of its T frames, left to right:
  the original, the masked input (masked tubelets grey) and the reconstruction with the visible
  tubelets pasted back. Each clip is scaled to [0, 1] by its original's range."""
  original = np.asarray(original, np.float32)
  pixel_mask = np.asarray(pixel_mask, np.float32)
  reconstruction = np.asarray(reconstruction, np.float32)
  if not original.shape == pixel_mask.shape == reconstruction.shape or original.ndim != 5:
    raise ValueError("clip_reconstruction_grid needs three [B, T, H, W, C] arrays of one shape, "
                     f"got {[a.shape for a in (original, pixel_mask, reconstruction)]}")
  def stack(parts, axis, width):
    shape = list(parts[0].shape)
    shape[axis] = width
    sep = np.ones(shape, np.float32)
    return np.concatenate([p for part in parts for p in (part, sep)][:-1], axis=axis)

  clips = []
  for clip, mask, rec in zip(original, pixel_mask, reconstruction):
    lo, hi = float(clip.min()), float(clip.max())
    scale = lambda a: np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)  # noqa: E731
    rows = []
    for row in (scale(clip), np.where(mask > 0, 0.5, scale(clip)),
                scale(np.where(mask > 0, rec, clip))):
      row = np.repeat(row, 3, axis=-1) if row.shape[-1] == 1 else row[..., :3]
      rows.append(stack(list(row), 1, gap))  # frames left to right
    clips.append(stack(rows, 0, gap))
  return (stack(clips, 0, 3 * gap) * 255).round().astype(np.uint8)


def png_bytes(picture: np.ndarray, *, scale: int = 1) -> bytes:
  """A uint8 [H, W, 3] picture as PNG bytes (nearest-neighbour upscaled by `scale`)."""
  pic = Image.fromarray(np.asarray(picture, np.uint8))
  if scale > 1:
    pic = pic.resize((pic.width * scale, pic.height * scale), Image.NEAREST)
  buffer = io.BytesIO()
  pic.save(buffer, format="PNG")
  return buffer.getvalue()
