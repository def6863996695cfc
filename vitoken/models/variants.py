"""big_vision's ViT variant strings: "Ti", "S/16", "B/32", "g/14", ...; with a tubelet depth
for video, ViViT's "B/16x2" (16x16 pixels by 2 frames: patch_size (2, 16, 16))."""
from typing import Any, Dict, Optional

from vitoken.errors import ConfigError

# Reference: Table 2 of https://arxiv.org/abs/2106.04560 (Scaling Vision Transformers).
#          width, depth, mlp_dim, heads
_SIZES = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
}


def decode_variant(variant: Optional[str]) -> Dict[str, Any]:
  """"B/16" -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=(16, 16));
  "B/16x2" -> the same with patch_size=(2, 16, 16) (2 frames a tubelet)."""
  if variant is None:
    return {}
  if not isinstance(variant, str):
    raise ConfigError(f"the ViT variant (model.variant) must be a string like 'B/16', got "
                      f"{variant!r}")
  name, _, patch = variant.partition("/")
  if name not in _SIZES:
    raise ConfigError(f"unknown ViT variant {variant!r} (model.variant); sizes are "
                      f"{sorted(_SIZES)}, optionally with a patch size, e.g. 'B/16'")
  width, depth, mlp_dim, heads = _SIZES[name]
  out = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads)
  if patch:
    side, x, frames = patch.partition("x")
    if not side.isdigit() or int(side) <= 0 or (x and (not frames.isdigit() or int(frames) <= 0)):
      raise ConfigError(f"bad patch size in variant {variant!r} (model.variant): give e.g. "
                        "'B/16', or 'B/16x2' for tubelets of 2 frames")
    out["patch_size"] = ((int(frames),) if x else ()) + (int(side), int(side))
  return out


def heads_for_width(width: int) -> Optional[int]:
  """The head count of the standard variant with this width (None when there is none)."""
  for w, _, _, heads in _SIZES.values():
    if w == width:
      return heads
  return None
