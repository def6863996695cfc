"""Imports and exports big_vision `.npz` ViT checkpoints (`Transformer/encoderblock_N/...`)."""
import collections
import logging
import os
import re
from typing import Any, Dict, Optional, Union

import flax.traverse_util as traverse_util
import ml_dtypes
import numpy as np

from vitoken.convert import common
from vitoken.models import layout, posemb as posemb_lib, variants, vit

_MHA = "MultiHeadDotProductAttention_0"
_MLP = "MlpBlock_0"


def _recover_dtype(a) -> np.ndarray:
  """As big_vision's `recover_dtype`: numpy saves bfloat16 as 2-byte void (`|V2`)."""
  a = np.asarray(a)
  if a.dtype.kind == "V" and a.itemsize == 2:
    a = a.view(ml_dtypes.bfloat16)
  return np.asarray(a, np.float32)


class _SubtreeError(ValueError):
  pass


# Where a training checkpoint keeps its params, and where a two-tower model (SigLIP, LiT,
# CLIP-style image_text) keeps its image tower beside `txt/` and the loss's `t`/`b`.
_WRAPPERS = ("params/", "opt/target/")
_IMAGE_TOWER = "img/"


def _top_prefixes(names):
  """The checkpoint's top-level folders, one level deeper under a training wrapper (where a
  two-tower's `img/` and `txt/` sit)."""
  tops = set()
  for n in names:
    wrapper = next((w for w in _WRAPPERS if n.startswith(w)), "")
    rest = n[len(wrapper):]
    if "/" in rest:
      tops.add(wrapper + rest.split("/", 1)[0] + "/")
  return sorted(tops)


def _select(names, prefix: Optional[str], where: str) -> Dict[str, str]:
  """Maps the ViT's parameter names to the checkpoint's names.

  `prefix` (from `path.npz:prefix`, as big_vision's two-tower `load` takes `path:img`)
  selects the keys under `prefix/`, also inside a training checkpoint's `params/` or
  `opt/target/`. Without one, a training checkpoint's wrapper is unwrapped, and a two-tower
  checkpoint's image tower (`img/`, e.g. SigLIP's `params/img/`) is picked.
  """
  names = list(names)
  if prefix is not None:
    prefix = prefix.strip("/") + "/"
    sel, root = {}, ""
    for root in ("",) + _WRAPPERS:
      sel = {n[len(root + prefix):]: n for n in names if n.startswith(root + prefix)}
      if sel:
        break
    if not sel:
      raise _SubtreeError(f"{where}: no keys under {prefix!r}; the checkpoint's "
                          f"prefixes are {_top_prefixes(names)}")
    logging.info("big_vision checkpoint %s: using the subtree %r", where, root + prefix)
    mapping = sel
  else:
    prefix = ""
    mapping = {n: n for n in names}
  if "embedding/kernel" not in mapping:
    for root in _WRAPPERS + (_IMAGE_TOWER,) + tuple(w + _IMAGE_TOWER for w in _WRAPPERS):
      if root + "embedding/kernel" in mapping:
        logging.info("big_vision checkpoint %s: using the params under %r", where,
                     prefix + root)
        return {k[len(root):]: v for k, v in mapping.items() if k.startswith(root)}
  return mapping


def _load(npz_path_or_dict) -> Dict[str, np.ndarray]:
  if isinstance(npz_path_or_dict, (str, os.PathLike)):
    path, prefix = os.fspath(npz_path_or_dict), None
    if not os.path.exists(path) and ":" in path:  # big_vision's two-tower `path.npz:img`
      head, tail = path.rsplit(":", 1)
      if os.path.isfile(head):
        path, prefix = head, tail
    if not os.path.exists(path):
      raise FileNotFoundError(f"big_vision checkpoint not found: {path}")
    try:
      with np.load(path, allow_pickle=False) as f:
        flat = {k: f[v] for k, v in _select(f.files, prefix, path).items()}
    except _SubtreeError:
      raise
    except Exception as e:  # zipfile/pickle errors say nothing about which file
      raise ValueError(f"cannot read {path} as an .npz checkpoint: {e}") from e
  elif hasattr(npz_path_or_dict, "items"):
    flat = dict(npz_path_or_dict)
    if any(hasattr(v, "items") for v in flat.values()):
      flat = traverse_util.flatten_dict(flat, sep="/")
    flat = {k: flat[v] for k, v in _select(flat, None, "dict").items()}
  else:
    raise ValueError(f"from_big_vision takes an .npz path or a dict, got {type(npz_path_or_dict).__name__}")
  return {k: _recover_dtype(v) for k, v in flat.items()}


def _unstack_scanned(flat):
  """Newer big_vision checkpoints stack all layers under `Transformer/encoderblock/`."""
  prefix = "Transformer/encoderblock/"
  stacked = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  if not stacked:
    return flat
  flat = {k: v for k, v in flat.items() if not k.startswith(prefix)}
  depths = {k: (v.shape[0] if v.ndim else None) for k, v in stacked.items()}
  counts = collections.Counter(depths.values())
  depth = counts.most_common(1)[0][0]
  odd = {prefix + k: d for k, d in depths.items() if d != depth}
  if odd:
    raise ValueError(f"scanned checkpoint: most arrays stack {depth} layers, but {odd}")
  for i in range(depth):
    for k, v in stacked.items():
      flat[f"Transformer/encoderblock_{i}/{k}"] = v[i]
  return flat


def _fix_old_layouts(flat, grid=None):
  """Older checkpoints: posemb inside Transformer/, and a class-token position fused into it.

  `grid`, when known, is the patch grid of the requested image size: a hint, since the
  checkpoint may have been trained at another.
  """
  for old in ("Transformer/posembed_input/pos_embedding", "Transformer/pos_embedding"):
    if old in flat:
      flat["pos_embedding"] = flat.pop(old)
  pe = flat.get("pos_embedding")
  if pe is not None and "cls" in flat:
    n = pe.shape[1] - 1
    if grid and pe.shape[1] == grid[0] * grid[1]:
      fused = False  # exactly the grid of the requested size: the new layout
    else:
      fused = (grid and n == grid[0] * grid[1]) or int(round(np.sqrt(n))) ** 2 == n
    if fused:
      # Old vit.py concatenated [cls] before adding posemb; fold that entry into cls.
      flat["pos_embedding"] = pe[:, 1:]
      if "cls" in flat:
        flat["cls"] = flat["cls"] + pe[:, :1]
  return flat


def _attention(flat, src, dst, out, cross=False):
  for part in ("kernel", "bias"):
    shapes = {f"{src}/{n}/{part}": flat[f"{src}/{n}/{part}"].shape for n in ("query", "key", "value")}
    if len(set(shapes.values())) != 1:
      raise ValueError(f"checkpoint attention arrays disagree in shape: {shapes}")
  q, k, v = (flat.pop(f"{src}/{n}/kernel") for n in ("query", "key", "value"))
  qb, kb, vb = (flat.pop(f"{src}/{n}/bias") for n in ("query", "key", "value"))
  if cross:
    out[f"{dst}/q/kernel"], out[f"{dst}/q/bias"] = q, qb
    out[f"{dst}/kv/kernel"], out[f"{dst}/kv/bias"] = np.stack([k, v], 1), np.stack([kb, vb], 0)
  else:
    out[f"{dst}/qkv/kernel"], out[f"{dst}/qkv/bias"] = np.stack([q, k, v], 1), np.stack([qb, kb, vb], 0)
  out[f"{dst}/out/kernel"] = flat.pop(f"{src}/out/kernel")
  out[f"{dst}/out/bias"] = flat.pop(f"{src}/out/bias")


def _move(flat, src, dst, out, names=("kernel", "bias")):
  for n in names:
    out[f"{dst}/{n}"] = flat.pop(f"{src}/{n}")


def _norm(flat, src, dst, out):
  _move(flat, src, dst, out, ("scale", "bias"))


def _mlp(flat, src, dst, out):
  _move(flat, f"{src}/Dense_0", f"{dst}/fc1", out)
  _move(flat, f"{src}/Dense_1", f"{dst}/fc2", out)


def from_big_vision(npz_path_or_dict: Union[str, os.PathLike, Dict[str, Any]],
                    variant: Optional[str] = None, *,
                    image_size: Optional[common.ImageSize] = None,
                    posemb_resize: str = "big_vision", **overrides):
  """Builds the vitoken ViT for a big_vision checkpoint and converts its weights.

  Args:
    npz_path_or_dict: path of a big_vision `.npz`, or its (flat '/'-joined or nested) dict. A
      two-tower checkpoint (SigLIP, LiT) loads its image tower, found under `img/` (also
      inside `params/`), or the subtree that `path.npz:img` names.
    variant: e.g. "B/16"; sets the head count (which a checkpoint does not record). Width,
      depth, MLP size and patch size are read from the weights.
    image_size: resolution to run at; the learned position embedding is resized to it.
    posemb_resize: "big_vision" (scipy.ndimage.zoom, order 1, as big_vision's
      resample_posemb) or a jax.image.resize method (timm's way).
    **overrides: ViT fields, e.g. token_reduction={...}, dtype=jnp.bfloat16, scan=True;
      num_classes=0 leaves out the checkpoint's head (features only).

  Returns:
    (module, params).
  """
  flat = _unstack_scanned(_load(npz_path_or_dict))
  if overrides.get("num_classes") == 0 and "head/kernel" in flat:
    # Features only: the head (a two-tower's projection into the joint embedding space, or a
    # classifier) is left out; the pooled features are the model's output.
    logging.info("big_vision checkpoint: num_classes=0 leaves out its head %s",
                 flat["head/kernel"].shape)
    flat = {k: v for k, v in flat.items() if not k.startswith("head/")}
  if "embedding/kernel" not in flat:
    raise ValueError("not a big_vision ViT checkpoint: no embedding/kernel "
                     f"(keys start with {sorted(flat)[:5]})")
  ph, pw, channels, width = flat["embedding/kernel"].shape
  size_hint = None if image_size is None else common.pair(image_size)
  flat = _fix_old_layouts(flat, size_hint and (size_hint[0] // ph, size_hint[1] // pw))
  depth = 1 + max((int(m.group(1)) for k in flat
                   if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))), default=-1)
  decoded = variants.decode_variant(variant)
  num_heads = overrides.pop("num_heads", decoded.get("num_heads") or variants.heads_for_width(width))
  if num_heads is None:
    raise ValueError(f"pass variant= or num_heads= for a width-{width} checkpoint")
  for key, have in (("width", width), ("patch_size", (ph, pw))):
    if decoded.get(key, have) != have:
      raise ValueError(f"variant {variant!r} has {key} {decoded[key]} but the checkpoint has {have}")
  pool = "map" if "MAPHead_0/probe" in flat else "tok" if "cls" in flat else "gap"
  arch = dict(
      width=width, depth=depth, channels=channels, patch_size=(ph, pw), num_heads=num_heads,
      mlp_dim=flat["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"].shape[1] if depth else None,
      num_classes=flat["head/kernel"].shape[1] if "head/kernel" in flat else 0,
      pool_type=pool, class_token="cls" in flat,
      posemb="learn" if "pos_embedding" in flat else "sincos2d",
      posemb_prefix=False, gelu_approximate=True, layer_norm_eps=1e-6,
      rep_size=flat["pre_logits/kernel"].shape[1] if "pre_logits/kernel" in flat else None)

  out: Dict[str, np.ndarray] = {}
  _move(flat, "embedding", "embedding", out)
  for name, dst in (("cls", "cls"), ("pos_embedding", "pos_embedding"), ("MAPHead_0/probe", "map_head/probe")):
    if name in flat:
      out[dst] = flat.pop(name)
  try:
    for i in range(depth):
      s, t = f"Transformer/encoderblock_{i}", f"block_{i:02d}"
      _norm(flat, f"{s}/LayerNorm_0", f"{t}/norm1", out)
      _norm(flat, f"{s}/LayerNorm_1", f"{t}/norm2", out)
      _attention(flat, f"{s}/{_MHA}", f"{t}/attn", out)
      _mlp(flat, f"{s}/{_MLP}", f"{t}/mlp", out)
    _norm(flat, "Transformer/encoder_norm", "encoder_norm", out)
    if pool == "map":
      _attention(flat, f"MAPHead_0/{_MHA}", "map_head", out, cross=True)
      _norm(flat, "MAPHead_0/LayerNorm_0", "map_head/norm", out)
      _mlp(flat, f"MAPHead_0/{_MLP}", "map_head/mlp", out)
    for name in ("pre_logits", "head"):
      if f"{name}/kernel" in flat:
        _move(flat, name, name, out)
  except KeyError as e:
    raise ValueError(f"big_vision checkpoint is missing {e.args[0]}") from None
  if flat:
    raise ValueError(f"big_vision weights vitoken cannot place: {sorted(flat)[:10]}")

  source_grid = (common.grid_from_posemb(out["pos_embedding"].shape[1], 0, size_hint, (ph, pw))[0]
                 if "pos_embedding" in out else None)
  if image_size is None:
    target = (source_grid[0] * ph, source_grid[1] * pw) if source_grid else (224, 224)
  else:
    target = common.pair(image_size)
  if source_grid and (target[0] // ph, target[1] // pw) != source_grid:
    out["pos_embedding"] = np.asarray(posemb_lib.resize_posemb(
        out["pos_embedding"], source_grid, (target[0] // ph, target[1] // pw), method=posemb_resize))

  module = common.build_model(arch, overrides)
  return module, common.finalize(module, out, target)


def to_big_vision(module: vit.VisionTransformer, params) -> Dict[str, np.ndarray]:
  """Exports params of a big_vision-compatible ViT (class token or gap/map, no registers,
  no layer scale, no prefix positions) as a flat '/'-named dict for `np.savez`."""
  if module.num_registers or module.layer_scale_init is not None or module.posemb_prefix \
      or module.fc_norm or module.pre_norm or not module.qkv_bias \
      or module.posemb == "sincos2d_mae" or module.mlp_activation == "quick_gelu":
    raise ValueError("this ViT has parts big_vision's vit.py lacks (registers, layer scale, "
                     "fc_norm, pre_norm, prefix positions, no qkv bias, QuickGELU, or MAE's "
                     "sin-cos table, which big_vision would replace by its own)")
  tree = layout.to_unscanned(params) if module.scan else params
  flat = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}
  out: Dict[str, np.ndarray] = {}

  def attention(src, dst, cross=False):
    if cross:
      q, qb = flat.pop(f"{src}/q/kernel"), flat.pop(f"{src}/q/bias")
      kv, kvb = flat.pop(f"{src}/kv/kernel"), flat.pop(f"{src}/kv/bias")
      kernels, biases = (q, kv[:, 0], kv[:, 1]), (qb, kvb[0], kvb[1])
    else:
      qkv, qkvb = flat.pop(f"{src}/qkv/kernel"), flat.pop(f"{src}/qkv/bias")
      kernels, biases = (qkv[:, 0], qkv[:, 1], qkv[:, 2]), (qkvb[0], qkvb[1], qkvb[2])
    for n, kern, b in zip(("query", "key", "value"), kernels, biases):
      out[f"{dst}/{n}/kernel"], out[f"{dst}/{n}/bias"] = kern, b
    _move(flat, f"{src}/out", f"{dst}/out", out)

  def mlp(src, dst):
    _move(flat, f"{src}/fc1", f"{dst}/Dense_0", out)
    _move(flat, f"{src}/fc2", f"{dst}/Dense_1", out)

  _move(flat, "embedding", "embedding", out)
  for src, dst in (("cls", "cls"), ("pos_embedding", "pos_embedding"), ("map_head/probe", "MAPHead_0/probe")):
    if src in flat:
      out[dst] = flat.pop(src)
  for i in range(module.depth):
    s, t = f"block_{i:02d}", f"Transformer/encoderblock_{i}"
    _norm(flat, f"{s}/norm1", f"{t}/LayerNorm_0", out)
    _norm(flat, f"{s}/norm2", f"{t}/LayerNorm_1", out)
    attention(f"{s}/attn", f"{t}/{_MHA}")
    mlp(f"{s}/mlp", f"{t}/{_MLP}")
  _norm(flat, "encoder_norm", "Transformer/encoder_norm", out)
  if "map_head/q/kernel" in flat:
    attention("map_head", f"MAPHead_0/{_MHA}", cross=True)
    _norm(flat, "map_head/norm", "MAPHead_0/LayerNorm_0", out)
    mlp("map_head/mlp", f"MAPHead_0/{_MLP}")
  for name in ("pre_logits", "head"):
    if f"{name}/kernel" in flat:
      _move(flat, name, name, out)
  assert not flat, f"unexported params: {sorted(flat)}"
  return out
