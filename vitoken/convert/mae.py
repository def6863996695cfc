"""Official MAE pretraining checkpoints (facebookresearch/mae, encoder + decoder) into vitoken.

    sd = torch.load("mae_visualize_vit_large.pth", map_location="cpu")["model"]
    module, params = from_mae(sd, norm_pix_loss=False)
    loss, pred, mask = module.apply({"params": params}, images_nhwc, noise=noise, mask_ratio=0.75)

Sizes (width, depth, patch, decoder width and depth) come from the weights; head counts are
not in a state dict, so the encoder's is the standard variant's for its width and the
decoder's is 16, as every published MAE model, unless given. The encoder's params then load
into a ViT for fine-tuning: `params["encoder"]`, see `finetune_model`.
"""
import re
from typing import Any, Dict, Optional

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from vitoken.convert import common
from vitoken.convert.timm import StateDictReader, _numpy
from vitoken.models import mae, posemb as posemb_lib, variants, vit

REQUIRED = ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "mask_token",
            "decoder_embed.weight", "decoder_pos_embed", "decoder_norm.weight",
            "decoder_pred.weight", "blocks.0.attn.qkv.weight", "decoder_blocks.0.attn.qkv.weight")


def _depth(sd, prefix: str) -> int:
  return 1 + max(int(m.group(1)) for k in sd if (m := re.match(prefix + r"\.(\d+)\.", k)))


def _check_fixed_posemb(table: np.ndarray, grid, width: int, what: str):
  """MAE's position tables are fixed sin-cos (class position zero); vitoken computes them, so
  a checkpoint whose table differs would silently change the model: refuse it."""
  expected = np.concatenate([np.zeros((1, 1, width)),
                             np.asarray(posemb_lib.sincos_2d_mae(grid, width))], axis=1)
  if table.shape != expected.shape:
    raise ValueError(f"{what} has shape {table.shape}; a {grid[0]}x{grid[1]} grid of width "
                     f"{width} needs {expected.shape}")
  err = float(np.abs(table - expected).max())
  if err > 1e-4:
    raise ValueError(f"{what} is not MAE's fixed 2-D sin-cos table (max difference {err:.3g}); "
                     "vitoken's MAE uses the fixed table")


def from_mae(state_dict, norm_pix_loss: bool = False, *, num_heads: Optional[int] = None,
             decoder_heads: int = 16, mask_ratio: float = 0.75, **encoder_overrides):
  """(module, params) for an official MAE pretraining checkpoint (encoder and decoder).

  `state_dict`: the checkpoint's "model" dict (torch tensors or arrays), or the whole
  checkpoint holding it. `encoder_overrides`: ViT fields for how the encoder runs (dtype,
  attention_impl, ...). Apply as `module.apply({"params": params}, images, noise=..., mask_ratio=...)`.
  """
  if hasattr(state_dict, "state_dict"):
    state_dict = state_dict.state_dict()
  if not hasattr(state_dict, "items"):
    raise ValueError(f"from_mae takes a state dict, got {type(state_dict).__name__}")
  if "model" in state_dict and hasattr(state_dict["model"], "items"):
    state_dict = state_dict["model"]
  sd = {k: _numpy(v) for k, v in state_dict.items()}
  missing = [k for k in REQUIRED if k not in sd]
  if missing:
    encoder_only = "patch_embed.proj.weight" in sd and all(k.startswith(("decoder", "mask_token"))
                                                            for k in missing)
    hint = (" (an encoder-only checkpoint such as mae_pretrain_vit_*.pth: load it with "
            "from_timm for fine-tuning; from_mae needs the decoder, as in mae_visualize_vit_*.pth)"
            if encoder_only else "")
    raise ValueError(f"not an MAE pretraining state dict: missing {missing}{hint}")

  width, channels, ph, pw = sd["patch_embed.proj.weight"].shape
  num_heads = num_heads or variants.heads_for_width(width)
  if num_heads is None:
    raise ValueError(f"cannot tell the head count of a width-{width} encoder; pass num_heads=")
  decoder_width = sd["decoder_embed.weight"].shape[0]
  length = sd["pos_embed"].shape[1] - 1
  side = int(round(np.sqrt(length)))
  if side * side != length:
    raise ValueError(f"pos_embed has {length} patch positions, not a square grid")
  grid = (side, side)
  if sd["decoder_pred.weight"].shape[0] != ph * pw * channels:
    raise ValueError(f"decoder_pred predicts {sd['decoder_pred.weight'].shape[0]} values per "
                     f"patch, but a {ph}x{pw}x{channels} patch has {ph * pw * channels}")
  _check_fixed_posemb(sd["pos_embed"], grid, width, "pos_embed")
  _check_fixed_posemb(sd["decoder_pos_embed"], grid, decoder_width, "decoder_pos_embed")

  depth, decoder_depth = _depth(sd, "blocks"), _depth(sd, "decoder_blocks")
  encoder = dict(width=width, depth=depth, num_heads=num_heads, channels=channels,
                 patch_size=(ph, pw), mlp_dim=sd["blocks.0.mlp.fc1.weight"].shape[0],
                 qkv_bias="blocks.0.attn.qkv.bias" in sd, class_token=True,
                 posemb="sincos2d_mae", layer_norm_eps=1e-6, gelu_approximate=False)
  common.check_overrides(encoder, encoder_overrides)
  encoder.update(encoder_overrides)
  module = mae.MaskedAutoencoder(
      encoder=encoder, decoder_width=decoder_width, decoder_depth=decoder_depth,
      decoder_heads=decoder_heads, decoder_mlp_dim=sd["decoder_blocks.0.mlp.fc1.weight"].shape[0],
      mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss)

  r = StateDictReader(sd)
  r.take("pos_embed"), r.take("decoder_pos_embed")  # fixed tables, checked above
  r.patch_embedding("encoder/embedding")
  r.out["encoder/cls"] = r.take("cls_token")
  for i in range(depth):
    r.block(f"encoder/block_{i:02d}/", f"blocks.{i}.", width, num_heads)
  r.norm("encoder/encoder_norm", "norm")
  r.out["decoder/mask_token"] = r.take("mask_token")
  r.linear("decoder/embed", "decoder_embed")
  for i in range(decoder_depth):
    r.block(f"decoder/block_{i:02d}/", f"decoder_blocks.{i}.", decoder_width, decoder_heads)
  r.norm("decoder/norm", "decoder_norm")
  r.linear("decoder/pred", "decoder_pred")
  r.check_all_used("MAE")

  image = (grid[0] * ph, grid[1] * pw)
  images = jax.ShapeDtypeStruct((1, *image, channels), jnp.float32)
  expected = jax.eval_shape(lambda x: module.init({"params": jax.random.key(0),
                                                  "masking": jax.random.key(1)}, x), images)["params"]
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(expected, sep="/").items()}
  common.check_shapes(want, {k: tuple(v.shape) for k, v in r.out.items()})
  dtype = module.encoder_model().param_dtype
  params = traverse_util.unflatten_dict({k: jnp.asarray(v, dtype) for k, v in r.out.items()}, sep="/")
  return module, params


def finetune_model(module: mae.MaskedAutoencoder, num_classes: int, **fields) -> vit.VisionTransformer:
  """The ViT that fine-tunes `module`'s encoder as MAE does: global average pooling over the
  patch tokens, then a LayerNorm (`fc_norm`) and a fresh head; load `params["encoder"]`
  (its `encoder_norm` is unused, as in MAE's fine-tuning)."""
  encoder = {k: v for k, v in module.encoder_config().items()
             if k not in ("num_classes", "pool_type", "fc_norm", "token_reduction")}
  return vit.Model(num_classes, **{**encoder, "pool_type": "gap", "fc_norm": True, **fields})


def encoder_params(params: Dict[str, Any], model: vit.VisionTransformer, image_size) -> Dict[str, Any]:
  """`params["encoder"]` laid out for `model` (from `finetune_model`): the pretraining
  `encoder_norm` dropped, a fresh `fc_norm` (ones, zeros) and a zero head added."""
  images = jax.ShapeDtypeStruct((1, *common.pair(image_size), model.channels), jnp.float32)
  expected = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  flat = traverse_util.flatten_dict(dict(params["encoder"]), sep="/")
  out = {}
  for key, shape in traverse_util.flatten_dict(expected, sep="/").items():
    if key in flat:
      out[key] = jnp.asarray(flat[key])
    elif key.startswith(("fc_norm/", "head/")):
      out[key] = jnp.ones(shape.shape, shape.dtype) if key == "fc_norm/scale" else jnp.zeros(shape.shape, shape.dtype)
    else:
      raise ValueError(f"the MAE encoder has no {key}; is the fine-tune model built by finetune_model?")
  return traverse_util.unflatten_dict(out, sep="/")
