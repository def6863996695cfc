"""SimMIM (Xie et al., CVPR 2022), as microsoft/SimMIM defines it for a ViT encoder.

Masks are drawn at a coarse mask-patch size (32 px by default) and repeated over the model's
patches; a learned mask token replaces the masked patch embeddings (the `mask_token` reducer,
before the position embedding), the encoder sees every token, and a linear head per token
predicts its raw pixels. The loss is the L1 error over masked pixels, divided by (the masked
pixel count + 1e-5) and by the channel count, as the reference's `forward`.

    model = simmim.SimMIM(encoder={"variant": "B/16"})
    loss, pred, mask = model.apply({"params": params}, images_nhwc, noise=noise)
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitoken.models import mae
from vitoken.models.masking import check_mask_ratio, patchify, simmim_grids, simmim_mask

MASK_ENTRY = "mask_token"


def per_example_loss(images, pred, mask, patch):
  """([B] summed L1 over masked pixels and channels, [B] masked pixel counts)."""
  target = patchify(jnp.asarray(images, jnp.float32), patch)
  l1 = jnp.abs(pred.astype(jnp.float32) - target).sum(axis=-1)
  mask = mask.astype(jnp.float32)
  pixels_per_patch = target.shape[-1] // images.shape[-1]
  return (l1 * mask).sum(axis=1), mask.sum(axis=1) * pixels_per_patch


def loss(images, pred, mask, patch):
  """images [B, H, W, C], pred [B, L, p*p*C] (patchified order), mask [B, L] (1 = masked)."""
  total, pixels = per_example_loss(images, pred, mask, patch)
  return total.sum() / (pixels.sum() + 1e-5) / images.shape[-1]


def masked_patch_tokens(encoder, images, mask, train: bool, what: str):
  """The encoder's normalised patch tokens [B, L, D] with a learned token in place of the
  masked patches' embeddings (mask [B, L], 1 = masked); every position is encoded."""
  _, aux = encoder(images, train=train, inputs={"patch_mask": mask})
  mae.check_token_count(aux["encoded"], encoder.num_prefix + mask.shape[1], what)
  return aux["encoded"][:, encoder.num_prefix:]


class SimMIM(nn.Module):
  """`apply(variables, images, noise=None, mask=None, train=False)` -> (loss, pred, mask).

  `noise` [B, cells] (one value per mask cell) or `mask` [B, L] (per model patch) fix the
  masking; with neither, noise comes from the "masking" rng stream."""
  encoder: Any = None  # ViT fields, e.g. {"variant": "B/16"}
  mask_patch_size: int = 32
  mask_ratio: float = 0.6

  def encoder_config(self):
    return mae.encoder_fields(self.encoder, "SimMIM")

  def encoder_model(self, name: Optional[str] = None):
    return mae.pretraining_encoder(self.encoder_config(), {"method": "mask_token", "name": MASK_ENTRY},
                                   name)

  def rng_streams(self) -> frozenset:
    return frozenset({"masking"})

  def grids(self, image_hw):
    """(coarse mask grid, model patches per cell side) for images of `image_hw`."""
    return simmim_grids(image_hw, self.encoder_model().patch_size, self.mask_patch_size)

  @nn.compact
  def __call__(self, images, *, noise=None, mask=None, train: bool = False):
    encoder = self.encoder_model(name="encoder")
    if mask is None:
      coarse, scale = simmim_grids(images.shape[1:3], encoder.patch_size, self.mask_patch_size)
      if noise is None:
        noise = jax.random.uniform(self.make_rng("masking"), (images.shape[0], coarse[0] * coarse[1]))
      mask = simmim_mask(noise, check_mask_ratio(self.mask_ratio), coarse, scale)
    tokens = masked_patch_tokens(encoder, images, mask, train, "SimMIM")
    patch = tuple(encoder.patch_size)
    grid = encoder.patch_grid(images.shape[1:3])
    pred = nn.Dense(grid.patch_dim(encoder.channels), dtype=encoder.dtype,
                    param_dtype=encoder.param_dtype, name="decoder")(tokens).astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    return loss(images, pred, mask, patch), pred, mask
