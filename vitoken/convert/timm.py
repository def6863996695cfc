"""Imports timm `vit_*` VisionTransformer weights (a model or its state dict)."""
import re
from typing import Any, Dict, Optional

import numpy as np

from vitoken.convert import common
from vitoken.models import posemb as posemb_lib, variants

_POOL = {"token": "tok", "avg": "gap", "map": "map", "": "none"}
# Activation modules by class name (timm.layers.activations, open_clip's QuickGELU); "GELU"
# is read from its `approximate`.
_ACTIVATIONS = {"GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu"}


def _numpy(v) -> np.ndarray:
  if hasattr(v, "detach"):  # torch.Tensor, without importing torch here
    v = v.detach().cpu().float().numpy()
  return np.asarray(v, np.float32)


def _activation(act, where: str) -> str:
  """vitoken's `mlp_activation` name for a timm (or torch, or open_clip) activation module."""
  kind = type(act).__name__
  if kind == "GELU":  # torch's nn.GELU(approximate=...) or timm's own exact one
    return "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"
  if kind in _ACTIVATIONS:
    return _ACTIVATIONS[kind]
  raise ValueError(f"timm model's {where} activation is {kind}; vitoken's ViT supports "
                   f"{sorted(set(_ACTIVATIONS) | {'GELU'})} (mlp_activation "
                   "'gelu', 'gelu_tanh', 'quick_gelu')")


def _module_facts(model) -> Dict[str, Any]:
  """Architecture facts a state dict cannot tell (head count, MLP activation, pooling, image
  size)."""
  block = model.blocks[0]
  for unsupported in ("q_norm", "k_norm"):
    if type(getattr(block.attn, unsupported, None)).__name__ not in ("Identity", "NoneType"):
      raise ValueError(f"timm model uses attn.{unsupported} (QK-norm), which vitoken's ViT lacks")
  # vitoken has one activation for every MLP (blocks and the MAP head), as timm builds them.
  acts = {f"blocks.{i}.mlp": _activation(getattr(b.mlp, "act", None), f"blocks.{i}.mlp")
          for i, b in enumerate(model.blocks)}
  pool_mlp = getattr(getattr(model, "attn_pool", None), "mlp", None)
  if pool_mlp is not None:
    acts["attn_pool.mlp"] = _activation(getattr(pool_mlp, "act", None), "attn_pool.mlp")
  if len(set(acts.values())) > 1:
    raise ValueError(f"timm model mixes MLP activations, which vitoken's ViT cannot: {acts}")
  act = acts["blocks.0.mlp"]
  if model.global_pool not in _POOL:
    raise ValueError(f"timm global_pool={model.global_pool!r} is not supported; "
                     f"use one of {sorted(_POOL)}")
  facts = dict(
      num_heads=block.attn.num_heads,
      gelu_approximate=act == "gelu_tanh",
      layer_norm_eps=block.norm1.eps,
      pool_type=_POOL[model.global_pool],
      pool_include_prefix=bool(getattr(model, "pool_include_prefix", False)),
      posemb_prefix=not getattr(model, "no_embed_class", False),
  )
  if act == "quick_gelu":  # GELUs keep mlp_activation=None: the models built before it existed
    facts["mlp_activation"] = act
  img_size = getattr(model.patch_embed, "img_size", None)
  if img_size is not None:
    facts["image_size"] = tuple(img_size)
  return facts


def _infer_architecture(sd: Dict[str, np.ndarray], facts: Dict[str, Any]) -> Dict[str, Any]:
  if "patch_embed.proj.weight" not in sd:
    raise ValueError("not a timm VisionTransformer state dict: no patch_embed.proj.weight "
                     f"(keys start with {sorted(sd)[:5]})")
  width, channels, ph, pw = sd["patch_embed.proj.weight"].shape
  depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
  has_cls = "cls_token" in sd
  if "attn_pool.latent" in sd:
    pool = "map"
  elif has_cls and "fc_norm.weight" not in sd:
    pool = "tok"
  else:
    pool = "gap"
  arch = dict(
      width=width, depth=depth, channels=channels, patch_size=(ph, pw),
      mlp_dim=sd["blocks.0.mlp.fc1.weight"].shape[0],
      num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
      class_token=has_cls,
      num_registers=sd["reg_token"].shape[1] if "reg_token" in sd else 0,
      posemb="learn" if "pos_embed" in sd else "none",
      fc_norm="fc_norm.weight" in sd,
      pre_norm="norm_pre.weight" in sd,
      patch_bias="patch_embed.proj.bias" in sd,
      qkv_bias="blocks.0.attn.qkv.bias" in sd,
      layer_scale_init=1e-5 if "blocks.0.ls1.gamma" in sd else None,
      gelu_approximate=False, layer_norm_eps=1e-6, pool_type=pool, posemb_prefix=None,
      num_heads=variants.heads_for_width(width))
  arch.update({k: v for k, v in facts.items() if k != "image_size"})
  if arch["num_heads"] is None:
    raise ValueError(f"cannot tell the head count of a width-{width} ViT from a state dict; "
                     "pass num_heads= (or the timm model itself)")
  return arch


class StateDictReader:
  """Moves torch-layout weights into vitoken param paths, remembering which keys it used."""

  def __init__(self, sd: Dict[str, np.ndarray]):
    self.sd, self.used, self.out = sd, set(), {}

  def take(self, key):
    self.used.add(key)
    return self.sd[key]

  def linear(self, dst, src, kernel_shape=None, bias_shape=None):
    w = self.take(src + ".weight").T
    self.out[dst + "/kernel"] = w.reshape(kernel_shape) if kernel_shape else w
    if src + ".bias" in self.sd:
      b = self.take(src + ".bias")
      self.out[dst + "/bias"] = b.reshape(bias_shape) if bias_shape else b

  def norm(self, dst, src):
    self.out[dst + "/scale"], self.out[dst + "/bias"] = self.take(src + ".weight"), self.take(src + ".bias")

  def block(self, dst, src, width: int, heads: int):
    """One timm pre-norm `Block` (`src` like "blocks.3.") into vitoken's (`dst` "block_03/")."""
    d = width // heads
    self.norm(dst + "norm1", src + "norm1")
    self.norm(dst + "norm2", src + "norm2")
    self.linear(dst + "attn/qkv", src + "attn.qkv", (width, 3, heads, d), (3, heads, d))
    self.linear(dst + "attn/out", src + "attn.proj", (heads, d, width))
    self.linear(dst + "mlp/fc1", src + "mlp.fc1")
    self.linear(dst + "mlp/fc2", src + "mlp.fc2")
    for ls in ("ls1", "ls2"):
      if src + ls + ".gamma" in self.sd:
        self.out[dst + ls + "/gamma"] = self.take(src + ls + ".gamma")

  def patch_embedding(self, dst="embedding", src="patch_embed.proj"):
    self.out[dst + "/kernel"] = self.take(src + ".weight").transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if src + ".bias" in self.sd:
      self.out[dst + "/bias"] = self.take(src + ".bias")

  def check_all_used(self, what: str):
    left = sorted(set(self.sd) - self.used)
    if left:
      raise ValueError(f"{what} weights vitoken cannot place (unsupported architecture?): {left[:10]}"
                       + (f" and {len(left) - 10} more" if len(left) > 10 else ""))


def _convert(sd: Dict[str, np.ndarray], arch: Dict[str, Any]) -> Dict[str, np.ndarray]:
  c, h = arch["width"], arch["num_heads"]
  d = c // h
  r = StateDictReader(sd)
  out = r.out
  r.patch_embedding()
  if "cls_token" in sd:
    out["cls"] = r.take("cls_token")
  if "reg_token" in sd:
    out["registers"] = r.take("reg_token")
  if "pos_embed" in sd:
    out["pos_embedding"] = r.take("pos_embed")
  if arch["pre_norm"]:
    r.norm("norm_pre", "norm_pre")
  for i in range(arch["depth"]):
    r.block(f"block_{i:02d}/", f"blocks.{i}.", c, h)
  if "norm.weight" in sd:
    r.norm("encoder_norm", "norm")
  if "fc_norm.weight" in sd:
    r.norm("fc_norm", "fc_norm")
  if "attn_pool.latent" in sd:
    latent = r.take("attn_pool.latent")
    if latent.shape[1] != 1:
      raise ValueError(f"attention pooling with {latent.shape[1]} latents is not supported (only 1)")
    out["map_head/probe"] = latent
    r.linear("map_head/q", "attn_pool.q", (c, h, d), (h, d))
    r.linear("map_head/kv", "attn_pool.kv", (c, 2, h, d), (2, h, d))
    r.linear("map_head/out", "attn_pool.proj", (h, d, c))
    r.norm("map_head/norm", "attn_pool.norm")
    r.linear("map_head/mlp/fc1", "attn_pool.mlp.fc1")
    r.linear("map_head/mlp/fc2", "attn_pool.mlp.fc2")
  if "head.weight" in sd:
    r.linear("head", "head")
  r.check_all_used("timm")
  return out


def from_timm(model_or_state_dict, *, image_size: Optional[common.ImageSize] = None,
              num_heads: Optional[int] = None, posemb_resize: str = "bicubic", **overrides):
  """Builds the vitoken ViT equal to a timm `vit_*` model and converts its weights.

  Args:
    model_or_state_dict: a timm VisionTransformer, or its state dict (torch tensors or arrays).
    image_size: resolution to run at; learned position embeddings are resized when it differs
      from the checkpoint's.
    num_heads: needed only for a state dict of non-standard width.
      A state dict does not tell the MLP activation either: it is taken as exact GELU; pass
      mlp_activation="quick_gelu" for OpenAI CLIP weights (a model is read for itself).
    posemb_resize: jax.image.resize method for that resize.
    **overrides: ViT fields, e.g. token_reduction={...}, dtype=jnp.bfloat16, scan=True;
      num_classes=0 leaves out the head (features only).

  Returns:
    (module, params); `module.apply({"params": params}, images_nhwc)` is deterministic inference.
  """
  if hasattr(model_or_state_dict, "state_dict"):
    facts, sd = _module_facts(model_or_state_dict), model_or_state_dict.state_dict()
  elif hasattr(model_or_state_dict, "items"):
    facts, sd = {}, model_or_state_dict
  else:
    raise ValueError(f"from_timm takes a timm model or a state dict, got {type(model_or_state_dict).__name__}")
  sd = {k: _numpy(v) for k, v in sd.items()}
  if overrides.get("num_classes") == 0:
    # Features only, as timm's num_classes=0: the head is left out, the pooled features remain.
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
  if num_heads is not None:
    facts["num_heads"] = num_heads
  arch = _infer_architecture(sd, facts)
  params = _convert(sd, arch)

  source_size = facts.get("image_size")
  if "pos_embedding" in params:
    num_prefix = int(arch["class_token"]) + arch["num_registers"]
    hint = source_size or (common.pair(image_size) if image_size is not None else None)
    grid, prefix_pos = common.grid_from_posemb(params["pos_embedding"].shape[1], num_prefix,
                                               hint, arch["patch_size"])
    if arch["posemb_prefix"] is None or num_prefix == 0:
      arch["posemb_prefix"] = prefix_pos
    elif arch["posemb_prefix"] != prefix_pos:
      raise ValueError(f"pos_embed of length {params['pos_embedding'].shape[1]} does not fit "
                       f"the model's {grid[0]}x{grid[1]} patch grid")
    source_size = (grid[0] * arch["patch_size"][0], grid[1] * arch["patch_size"][1])
  elif source_size is None:
    source_size = image_size or (224, 224)
  arch["posemb_prefix"] = bool(arch["posemb_prefix"])
  target = common.pair(image_size) if image_size is not None else tuple(source_size)
  if target != tuple(source_size) and "pos_embedding" in params:
    p = arch["patch_size"]
    params["pos_embedding"] = np.asarray(posemb_lib.resize_posemb(
        params["pos_embedding"], (source_size[0] // p[0], source_size[1] // p[1]),
        (target[0] // p[0], target[1] // p[1]),
        num_prefix=num_prefix if arch["posemb_prefix"] else 0, method=posemb_resize))

  module = common.build_model(arch, overrides)
  return module, common.finalize(module, params, target)
