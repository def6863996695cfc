"""Vision Transformer (pre-norm) with a token-reduction hook at every block.

Numerically the same network as timm's `VisionTransformer` and big_vision's `vit.py`, chosen by
fields (class token or pooling, position-embedding layout, GELU form, ...) that the weight
converters in `vitoken.convert` set. Call as `logits, aux = model.apply(variables, images)`.
"""
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitoken.models import attention as attention_lib
from vitoken.models import layers, posemb as posemb_lib, variants
from vitoken.models.reducers import base as rbase

POOL_TYPES = ("tok", "gap", "map", "none")
POSEMB_TYPES = ("learn", "sincos2d", "none")


def stochastic_depth_rates(rate: float, depth: int):
  """The linear rule: layer i drops its residual branches with rate * i / (depth - 1)."""
  return [rate * i / max(depth - 1, 1) for i in range(depth)]


def _block_name(layer: int) -> str:
  return f"block_{layer:02d}"


class EncoderBlock(nn.Module):
  """Pre-norm block: x + attn(ln(x)), then x + mlp(ln(x)), with this layer's reducers."""
  num_heads: int
  mlp_dim: int
  layer: int = 0
  reducers: Tuple[rbase.PlannedReducer, ...] = ()
  proportional_attention: bool = False
  dropout: float = 0.0
  drop_path_rate: float = 0.0
  layer_scale_init: Optional[float] = None
  qkv_bias: bool = True
  gelu_approximate: bool = False
  layer_norm_eps: float = 1e-6
  attention_impl: Optional[str] = None
  return_attention: bool = False
  deterministic: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, state: rbase.TokenState, drop_rate=None):
    """`drop_rate` overrides `drop_path_rate` (a traced per-layer value under nn.scan)."""
    rate = self.drop_path_rate if drop_rate is None else drop_rate
    built = [p.build(self.layer, name=f"{p.cls.method_name()}_{j}")
             for j, p in enumerate(self.reducers)]
    needs = frozenset().union(*(r.needs for r in built))
    out: Dict[str, Any] = {"losses": {}, "reduction": {}}
    norm = lambda name: nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)

    def residual(x, y, scale_name):
      if self.layer_scale_init is not None:
        y = layers.LayerScale(self.layer_scale_init, self.param_dtype, name=scale_name)(y)
      return x + layers.drop_path(self, y, rate, deterministic=self.deterministic)

    def run(stage, state, info):
      for reducer in built:
        if reducer.stage == stage:
          state, aux = reducer(state, info, train=not self.deterministic)
          out["losses"].update({f"{reducer.name}/{k}": v for k, v in aux.pop("losses", {}).items()})
          if aux:
            out["reduction"][reducer.name] = aux
      return state

    state = run(rbase.PRE_BLOCK, state, rbase.BlockInfo(layer=self.layer))

    bias = None
    if self.proportional_attention:
      bias = jnp.log(state.size)[:, None, None, :]
    y, attn = attention_lib.SelfAttention(
        self.num_heads, qkv_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype,
        implementation=self.attention_impl, name="attn")(
            norm("norm1")(state.x), bias=bias, key_mask=state.mask,
            need_keys_mean=rbase.KEYS_MEAN in needs, need_cls_attn=rbase.CLS_ATTN in needs,
            return_probs=self.return_attention)
    y = nn.Dropout(self.dropout)(y, self.deterministic)
    state = state.replace(x=residual(state.x, y, "ls1"))
    if self.return_attention:
      out["attention"] = attn["probs"]

    info = rbase.BlockInfo(layer=self.layer, keys_mean=attn.get("keys_mean"),
                              cls_attn=attn.get("cls_attn"))
    state = run(rbase.POST_ATTN, state, info)

    y = layers.MlpBlock(self.mlp_dim, self.dropout, self.gelu_approximate, self.dtype,
                        self.param_dtype, name="mlp")(norm("norm2")(state.x),
                                                      deterministic=self.deterministic)
    state = state.replace(x=residual(state.x, y, "ls2"))
    state = run(rbase.POST_BLOCK, state, info)
    out["tokens"] = state.x
    return state, out


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens, then an MLP."""
  num_heads: int
  mlp_dim: int
  gelu_approximate: bool = False
  layer_norm_eps: float = 1e-6
  attention_impl: Optional[str] = None
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, key_mask=None):
    b, _, width = x.shape
    head_dim = width // self.num_heads
    init = dict(kernel_init=nn.initializers.xavier_uniform(), dtype=self.dtype,
                param_dtype=self.param_dtype)
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, width), self.param_dtype)
    probe = jnp.broadcast_to(probe.astype(x.dtype), (b, 1, width))
    q = nn.DenseGeneral((self.num_heads, head_dim), name="q", **init)(probe)
    kv = nn.DenseGeneral((2, self.num_heads, head_dim), name="kv", **init)(x)
    y = attention_lib.fused_attention(q, kv[:, :, 0], kv[:, :, 1], key_mask=key_mask,
                                      implementation=self.attention_impl)
    y = nn.DenseGeneral(width, axis=(-2, -1), name="out", **init)(y)
    z = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="norm")(y)
    y = y + layers.MlpBlock(self.mlp_dim, gelu_approximate=self.gelu_approximate, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="mlp")(z, deterministic=True)
    return y[:, 0]


class VisionTransformer(nn.Module):
  """ViT classifier. `apply(variables, images [B, H, W, C], train=False) -> (logits, aux)`.

  aux holds: "stem" (patch grid), "blocks" ({block_NN: tokens} or stacked [depth, ...] when
  scanned), "encoded", "pre_logits", "state" (the final TokenState), "losses" (auxiliary
  losses from reducers, summed by the trainer), "reduction" (reducer records) and, with
  `return_attention`, "attention" (per-layer [B, H, N, N] probabilities).
  """
  num_classes: int = 1000  # 0: no head; the logits are the pooled features
  patch_size: Sequence[int] = (16, 16)
  width: int = 768
  depth: int = 12
  mlp_dim: Optional[int] = None  # default 4 * width
  num_heads: int = 12
  channels: int = 3
  posemb: str = "learn"  # "learn" | "sincos2d" | "none"
  posemb_prefix: bool = False  # class/register tokens have positions too (timm's classic ViT)
  pool_type: str = "tok"  # "tok" (class token) | "gap" | "map" | "none" (all tokens)
  class_token: Optional[bool] = None  # default: pool_type == "tok"
  num_registers: int = 0
  pool_include_prefix: bool = False  # gap/map over class/register tokens too
  fc_norm: bool = False  # LayerNorm after pooling instead of before (timm's avg-pool models)
  pre_norm: bool = False  # LayerNorm before the blocks (CLIP)
  patch_bias: bool = True
  qkv_bias: bool = True
  layer_scale_init: Optional[float] = None
  gelu_approximate: bool = False
  layer_norm_eps: float = 1e-6
  rep_size: Optional[int] = None  # tanh pre-logits layer of some i21k checkpoints
  dropout: float = 0.0
  drop_path_rate: float = 0.0  # stochastic depth, linear in depth from 0
  head_zeroinit: bool = True
  dtype: Any = None  # compute dtype, e.g. jnp.bfloat16
  param_dtype: Any = jnp.float32
  attention_impl: Optional[str] = None  # None/"auto", "xla", "cudnn"
  scan: bool = False  # nn.scan over layers (params stacked under encoder/blocks)
  remat_policy: Optional[str] = None  # a jax.checkpoint_policies name, e.g. "nothing_saveable"
  token_reduction: Any = None  # {"method": ..., **settings}, a list of them, or None
  return_attention: bool = False

  @property
  def num_prefix(self) -> int:
    has_cls = self.pool_type == "tok" if self.class_token is None else self.class_token
    return int(has_cls) + self.num_registers

  def plan(self) -> rbase.ReductionPlan:
    return rbase.build_plan(self.token_reduction, self.depth)

  def _check_config(self):
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f"pool_type must be one of {POOL_TYPES}, got {self.pool_type!r}")
    if self.posemb not in POSEMB_TYPES:
      raise ValueError(f"posemb must be one of {POSEMB_TYPES}, got {self.posemb!r}")
    if self.pool_type == "tok" and self.class_token is False:
      raise ValueError("pool_type='tok' reads the class token, but class_token=False")
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    if self.remat_policy not in (None, "none") and not hasattr(jax.checkpoint_policies, self.remat_policy):
      raise ValueError(f"unknown remat_policy {self.remat_policy!r}; use a name from "
                       "jax.checkpoint_policies, e.g. 'nothing_saveable'")
    attention_lib.check_implementation(self.attention_impl)

  def _check_images(self, images) -> Tuple[int, int]:
    if images.ndim != 4:
      raise ValueError(f"images must be [batch, height, width, channels], got shape {tuple(images.shape)}")
    if images.shape[-1] != self.channels:
      hint = " (it looks like NCHW; vitoken takes NHWC)" if images.shape[1] == self.channels else ""
      raise ValueError(f"images have {images.shape[-1]} channels, the model takes {self.channels}: "
                       f"shape {tuple(images.shape)}{hint}")
    (h, w), (ph, pw) = images.shape[1:3], tuple(self.patch_size)
    if h % ph or w % pw:
      raise ValueError(f"patch size {ph}x{pw} does not divide the image size {h}x{w}")
    return h // ph, w // pw

  def _embed(self, images, grid):
    x = nn.Conv(self.width, tuple(self.patch_size), strides=tuple(self.patch_size), padding="VALID",
                use_bias=self.patch_bias, dtype=self.dtype, param_dtype=self.param_dtype, name="embedding")(images)
    b = x.shape[0]
    stem = x
    x = x.reshape(b, grid[0] * grid[1], self.width)

    prefix = []
    if self.num_prefix > self.num_registers:
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width), self.param_dtype)
      prefix.append(cls)
    if self.num_registers:
      prefix.append(self.param("registers", nn.initializers.normal(1e-6),
                               (1, self.num_registers, self.width), self.param_dtype))
    prefix = [jnp.broadcast_to(p.astype(x.dtype), (b,) + p.shape[1:]) for p in prefix]

    if self.posemb == "learn":
      n_pos = grid[0] * grid[1] + (self.num_prefix if self.posemb_prefix else 0)
      expected = (1, n_pos, self.width)
      if self.has_variable("params", "pos_embedding"):
        have = tuple(self.get_variable("params", "pos_embedding").shape)
        if have != expected:
          raise ValueError(
              f"pos_embedding has shape {have} but images of {grid[0]}x{grid[1]} patches need "
              f"{expected}; resize it with vitoken.models.posemb.resize_posemb (the converters "
              "take image_size=...)")
      pos = self.param("pos_embedding", nn.initializers.normal(self.width ** -0.5), expected,
                       self.param_dtype).astype(x.dtype)
    elif self.posemb == "sincos2d":
      pos = posemb_lib.sincos_2d(grid, self.width, dtype=x.dtype)
      if self.posemb_prefix:
        pos = jnp.concatenate([jnp.zeros((1, self.num_prefix, self.width), x.dtype), pos], axis=1)
    else:
      pos = None

    if pos is not None and not self.posemb_prefix:
      x = x + pos
    x = jnp.concatenate(prefix + [x], axis=1)
    if pos is not None and self.posemb_prefix:
      x = x + pos
    return x, stem

  def _encode(self, state, plan, train):
    block_kw = dict(
        num_heads=self.num_heads, mlp_dim=self.mlp_dim or 4 * self.width,
        proportional_attention=plan.proportional_attention, dropout=self.dropout,
        layer_scale_init=self.layer_scale_init, qkv_bias=self.qkv_bias,
        gelu_approximate=self.gelu_approximate, layer_norm_eps=self.layer_norm_eps,
        attention_impl=self.attention_impl, return_attention=self.return_attention,
        deterministic=not train, dtype=self.dtype, param_dtype=self.param_dtype)
    block_cls = EncoderBlock
    if self.remat_policy not in (None, "none"):
      block_cls = nn.remat(block_cls, policy=getattr(jax.checkpoint_policies, self.remat_policy),
                           prevent_cse=not self.scan)
    rates = stochastic_depth_rates(self.drop_path_rate, self.depth)

    if self.scan:
      if not plan.scannable:
        raise ValueError("scan=True needs the same shape-preserving reducers at every layer; "
                         "this token_reduction changes the token count, use scan=False")
      blocks = nn.scan(block_cls, variable_axes={"params": 0},
                       split_rngs={"params": True, "dropout": True, "reduction": True},
                       in_axes=0, length=self.depth)
      return blocks(reducers=plan.at(0), name="blocks", **block_kw)(
          state, jnp.asarray(rates, jnp.float32))

    outs = {}
    for i in range(self.depth):
      state, outs[_block_name(i)] = block_cls(
          layer=i, reducers=plan.at(i), drop_path_rate=rates[i], name=_block_name(i),
          **block_kw)(state)
    return state, outs

  def _pool(self, x, state):
    p = 0 if self.pool_include_prefix else state.num_prefix
    tokens = x[:, p:]
    mask = None if state.mask is None else state.mask[:, p:]
    if self.pool_type == "tok":
      return x[:, 0]
    if self.pool_type == "gap":
      # Each token stands for `size` patches (merging), so the mean over the original patches
      # is size-weighted, as the ToMe reference does for average-pooled (MAE) models.
      w = state.size[:, p:]
      if mask is not None:
        w = w * mask
      w = w.astype(tokens.dtype)[..., None]
      return (tokens * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1e-6)
    if self.pool_type == "map":
      return MAPHead(self.num_heads, self.mlp_dim or 4 * self.width, self.gelu_approximate,
                     self.layer_norm_eps, self.attention_impl, self.dtype, self.param_dtype,
                     name="map_head")(tokens, mask)
    return x  # "none"

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    self._check_config()
    plan = self.plan()
    grid = self._check_images(images)
    images = jnp.asarray(images, self.dtype or jnp.float32)

    x, stem = self._embed(images, grid)
    x = nn.Dropout(self.dropout)(x, not train)
    if self.pre_norm:
      x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="norm_pre")(x)
    state = rbase.TokenState.create(x, num_prefix=self.num_prefix, grid=grid,
                                       track_source=plan.track_source)
    state, outs = self._encode(state, plan, train)

    aux: Dict[str, Any] = {"stem": stem}
    if self.scan:
      aux["blocks"] = outs["tokens"]
      aux["losses"], aux["reduction"] = outs["losses"], outs["reduction"]
      if self.return_attention:
        aux["attention"] = outs["attention"]
    else:
      aux["blocks"] = {k: o["tokens"] for k, o in outs.items()}
      aux["losses"] = {f"{k}/{n}": v for k, o in outs.items() for n, v in o["losses"].items()}
      aux["reduction"] = {f"{k}/{n}": v for k, o in outs.items() for n, v in o["reduction"].items()}
      if self.return_attention:
        aux["attention"] = {k: o["attention"] for k, o in outs.items()}

    x = state.x
    if not self.fc_norm:
      x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="encoder_norm")(x)
    aux["encoded"] = x
    aux["state"] = state
    x = self._pool(x, state)
    if self.fc_norm:
      x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="fc_norm")(x)
    if self.rep_size:
      x = jnp.tanh(nn.Dense(self.rep_size, dtype=self.dtype, param_dtype=self.param_dtype,
                            name="pre_logits")(x))
    aux["pre_logits"] = x
    if self.num_classes:
      kw = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head",
                   **kw)(x)
    return x.astype(jnp.float32), aux


def Model(num_classes: int = 1000, *, variant: Optional[str] = None, **kw) -> VisionTransformer:  # pylint: disable=invalid-name
  """big_vision-style factory: `Model(10, variant="S/16", pool_type="gap")`."""
  fields = {**variants.decode_variant(variant), **kw}
  unknown = sorted(set(fields) - set(VisionTransformer.__dataclass_fields__) - {"parent", "name"})
  if unknown:
    raise ValueError(f"unknown ViT option(s) {unknown}")
  return VisionTransformer(num_classes=num_classes, **fields)
