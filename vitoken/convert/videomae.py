"""MCG-NJU/VideoMAE checkpoints into vitoken: pretraining models (encoder + decoder) and
fine-tuned classifiers.

    sd = torch.load("checkpoint.pth", map_location="cpu")["model"]
    module, params = from_videomae(sd, image_size=224, num_frames=16)
    loss, pred, mask = module.apply({"params": params}, clips, noise=noise)   # pretraining
    logits, aux = module.apply({"params": params}, clips)                     # fine-tuned

Sizes (width, depth, tubelet, patch, MLP, decoder width and depth, layer scale) come from the
weights; the clip size does not (the fixed 1-D tables cover every token), so `image_size` and
`num_frames` are given, and head counts are the standard ones for the width (the decoder's:
64-dimensional heads, as VideoMAE's S, B and L) unless given. VideoMAE's attention has a query
and a value bias and no key bias: the key bias is zero here, which changes nothing (a key
bias adds the same logit to every key of a query).
"""
import re
from typing import Optional, Sequence, Tuple

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from vitoken.convert import common
from vitoken.convert.timm import StateDictReader, _numpy
from vitoken.errors import InputError
from vitoken.models import posemb as posemb_lib, variants, videomae, vit
from vitoken.models.patches import PatchGrid

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _depth(sd, prefix: str) -> int:
  found = [int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))]
  if not found:
    raise InputError(f"no blocks under {prefix!r} in the state dict")
  return 1 + max(found)


def _unwrap(state_dict):
  if hasattr(state_dict, "state_dict"):
    state_dict = state_dict.state_dict()
  if not hasattr(state_dict, "items"):
    raise InputError(f"from_videomae takes a state dict, got {type(state_dict).__name__}")
  for key in ("model", "module"):
    if key in state_dict and hasattr(state_dict[key], "items"):
      return state_dict[key]
  return state_dict


def _blocks(r: StateDictReader, dst: str, src: str, depth: int, width: int, heads: int) -> bool:
  """VideoMAE's blocks into vitoken's; True when they have layer scale (gamma_1, gamma_2)."""
  scaled = f"{src}0.gamma_1" in r.sd
  for i in range(depth):
    s, d = f"{src}{i}.", f"{dst}block_{i:02d}/"
    if s + "attn.q_bias" in r.sd:  # q and v biases; the key's is zero, as the reference's
      q, v = r.take(s + "attn.q_bias"), r.take(s + "attn.v_bias")
      r.sd[s + "attn.qkv.bias"] = np.concatenate([q, np.zeros_like(v), v])
    r.block(d, s, width, heads)
    r.used.add(s + "attn.qkv.bias")
    if scaled:
      r.out[d + "ls1/gamma"], r.out[d + "ls2/gamma"] = r.take(s + "gamma_1"), r.take(s + "gamma_2")
  return scaled


def _check_fixed_table(sd, key: str, length: int, width: int):
  """A checkpoint trained with learnable positions would silently change: refuse it."""
  if key not in sd:
    return
  table = np.asarray(sd[key], np.float64).reshape(-1, width)
  expected = np.asarray(posemb_lib.sincos_1d(length, width)[0])
  if table.shape != expected.shape or float(np.abs(table - expected).max()) > 1e-4:
    raise InputError(f"{key} {sd[key].shape} is not VideoMAE's fixed 1-D sin-cos table over "
                     f"{length} tokens (learnable positions are not supported)")


def from_videomae(state_dict, *, image_size, num_frames: int, num_heads: Optional[int] = None,
                  decoder_heads: Optional[int] = None, norm_target: bool = True,
                  input_mean: Sequence[float] = IMAGENET_MEAN,
                  input_std: Sequence[float] = IMAGENET_STD, mask_ratio: float = 0.9,
                  **encoder_overrides) -> Tuple[object, dict]:
  """(module, params): a `videomae.VideoMAE` for a pretraining checkpoint (keys `encoder.*`,
  `decoder.*`), else a video ViT classifier (VideoMAE's fine-tuned models: mean pooling, then
  `fc_norm` and the head). `input_mean` / `input_std`: the clips' normalisation, from which the
  pretraining targets return to pixels (the reference's ImageNet statistics)."""
  sd = {k: _numpy(v) for k, v in _unwrap(state_dict).items()}
  pretrain = any(k.startswith("encoder.") for k in sd) and any(k.startswith("decoder.") for k in sd)
  prefix = "encoder." if pretrain else ""
  required = [prefix + "patch_embed.proj.weight", prefix + "blocks.0.attn.qkv.weight"]
  required += (["encoder.norm.weight", "encoder_to_decoder.weight", "mask_token",
                "decoder.blocks.0.attn.qkv.weight", "decoder.norm.weight", "decoder.head.weight"]
               if pretrain else ["fc_norm.weight", "head.weight"])
  missing = [k for k in required if k not in sd]
  if missing:
    hint = ""
    if not pretrain and "norm.weight" in sd and "fc_norm.weight" not in sd:
      hint = (" (a model without mean pooling, which reads its first patch token: vitoken "
              "supports VideoMAE's mean-pooled classifiers)")
    raise InputError(f"not a VideoMAE {'pretraining' if pretrain else 'fine-tuned'} state "
                     f"dict: missing {missing}{hint}")

  kernel = sd[prefix + "patch_embed.proj.weight"]
  if kernel.ndim != 5:
    raise InputError(f"patch_embed.proj.weight {kernel.shape} is not a 3-D (tubelet) kernel")
  width, channels, tubelet, ph, pw = kernel.shape
  size = common.pair(image_size)
  grid = PatchGrid.of((int(num_frames),) + tuple(size), (tubelet, ph, pw))
  num_heads = num_heads or variants.heads_for_width(width)
  if num_heads is None:
    raise InputError(f"cannot tell the head count of a width-{width} encoder; pass num_heads=")
  depth = _depth(sd, prefix + "blocks.")
  encoder = dict(width=width, depth=depth, num_heads=num_heads, channels=channels,
                 patch_size=(tubelet, ph, pw), mlp_dim=sd[prefix + "blocks.0.mlp.fc1.weight"].shape[0],
                 qkv_bias=prefix + "blocks.0.attn.q_bias" in sd, class_token=False,
                 posemb="sincos1d", layer_norm_eps=1e-6, gelu_approximate=False)
  if prefix + "blocks.0.gamma_1" in sd:
    encoder["layer_scale_init"] = 1.0  # the values come from the checkpoint
  _check_fixed_table(sd, prefix + "pos_embed", grid.num_patches, width)
  common.check_overrides(encoder, encoder_overrides)
  encoder.update(encoder_overrides)

  r = StateDictReader(sd)
  r.used.add(prefix + "pos_embed")
  kernel_out = r.take(prefix + "patch_embed.proj.weight").transpose(2, 3, 4, 1, 0)  # OITHW -> THWIO
  if pretrain:
    decoder_width = sd["encoder_to_decoder.weight"].shape[0]
    decoder_heads = decoder_heads or max(1, decoder_width // 64)
    decoder_depth = _depth(sd, "decoder.blocks.")
    pixels = sd["decoder.head.weight"].shape[0]
    if pixels != grid.patch_dim(channels):
      raise InputError(f"decoder.head predicts {pixels} values per tubelet, but a "
                       f"{tubelet}x{ph}x{pw}x{channels} tubelet has {grid.patch_dim(channels)}")
    module = videomae.VideoMAE(
        encoder=encoder, decoder_width=decoder_width, decoder_depth=decoder_depth,
        decoder_heads=decoder_heads,
        decoder_mlp_dim=sd["decoder.blocks.0.mlp.fc1.weight"].shape[0], mask_ratio=mask_ratio,
        norm_target=norm_target, input_mean=tuple(input_mean), input_std=tuple(input_std))
    r.out["encoder/embedding/kernel"] = kernel_out
    r.out["encoder/embedding/bias"] = r.take("encoder.patch_embed.proj.bias")
    _blocks(r, "encoder/", "encoder.blocks.", depth, width, num_heads)
    r.norm("encoder/encoder_norm", "encoder.norm")
    r.out["decoder/embed/kernel"] = r.take("encoder_to_decoder.weight").T
    r.out["decoder/mask_token"] = r.take("mask_token")
    if "decoder.blocks.0.gamma_1" in sd:
      raise InputError("a VideoMAE decoder with layer scale is not supported")
    _blocks(r, "decoder/", "decoder.blocks.", decoder_depth, decoder_width, decoder_heads)
    r.norm("decoder/norm", "decoder.norm")
    r.linear("decoder/pred", "decoder.head")
    init_rngs = {"params": jax.random.key(0), "masking": jax.random.key(1)}
    param_dtype = module.encoder_model().param_dtype
  else:
    num_classes = sd["head.weight"].shape[0]
    module = vit.Model(num_classes, pool_type="gap", fc_norm=True, **encoder)
    r.out["embedding/kernel"] = kernel_out
    r.out["embedding/bias"] = r.take("patch_embed.proj.bias")
    _blocks(r, "", "blocks.", depth, width, num_heads)
    r.norm("fc_norm", "fc_norm")
    r.linear("head", "head")
    init_rngs = jax.random.key(0)
    param_dtype = module.param_dtype
  r.check_all_used("VideoMAE")

  clips = jax.ShapeDtypeStruct((1, *grid.size, channels), jnp.float32)
  expected = jax.eval_shape(lambda x: module.init(init_rngs, x), clips)["params"]
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(expected, sep="/").items()}
  common.check_shapes(want, {k: tuple(v.shape) for k, v in r.out.items()})
  params = traverse_util.unflatten_dict({k: jnp.asarray(v, param_dtype) for k, v in r.out.items()},
                                        sep="/")
  return module, params
