"""Vision Transformer (pre-norm) with a token-reduction hook at every block.

Numerically the same network as timm's `VisionTransformer` and big_vision's `vit.py`, chosen by
fields (class token or pooling, position-embedding layout, GELU form, ...) that the weight
converters in `vitoken.convert` set. Call as `logits, aux = model.apply(variables, images)`.
"""
import re
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitoken import settings as settings_lib
from vitoken.errors import ConfigError, InputError
from vitoken.models import attention as attention_lib, layers, posemb as posemb_lib, variants
from vitoken.models.patches import PatchGrid
from vitoken.models.reducers import base as rbase

POOL_TYPES = ("tok", "gap", "map", "none")
POSEMB_TYPES = ("learn", "learn_factorised", "sincos2d", "sincos2d_mae", "sincos1d", "none")


def stochastic_depth_rates(rate: float, depth: int):
  """The linear rule: layer i drops its residual branches with rate * i / (depth - 1)."""
  return [rate * i / max(depth - 1, 1) for i in range(depth)]


def _block_name(layer: int) -> str:
  return f"block_{layer:02d}"


def _auto_name(name: str) -> bool:
  """Flax's automatic submodule names (Dropout_0, ...), which an entry name must not shadow."""
  return re.fullmatch(r"[A-Z][A-Za-z0-9]*_\d+", name) is not None


# The ViT's top-level parameters outside the blocks, by layer-wise lr decay group: the stem
# decays as a layer before the first block, the head as one after the last.
STEM_NAMES = ("embedding", "cls", "registers", "pos_embedding", "pos_embedding_time", "norm_pre")
HEAD_NAMES = ("encoder_norm", "fc_norm", "map_head", "pre_logits", "head")
LAYER_DECAY_GROUPS = {**{n: "stem" for n in STEM_NAMES}, **{n: "head" for n in HEAD_NAMES}}

# Names the block and the ViT give their own submodules, parameters and carried arrays; a
# reducer entry may not take them.
BLOCK_NAMES = ("attn", "norm1", "norm2", "mlp", "ls1", "ls2", rbase.BLOCK_OWNER)
TOP_NAMES = STEM_NAMES + HEAD_NAMES + ("blocks",)

# How the ViT's parameters are partitioned over the (data, fsdp, tensor) mesh: (regex searched
# in the parameter path, partition spec), first match wins; everything else is replicated.
SHARDING_RULES: Tuple[Tuple[str, Tuple], ...] = (
    (r"attn/qkv/kernel$", ("fsdp", None, "tensor", None)),  # [C, 3, H, D]
    (r"attn/qkv/bias$", (None, "tensor", None)),
    (r"attn/out/kernel$", ("tensor", None, "fsdp")),  # [H, D, C]
    (r"map_head/q/kernel$", ("fsdp", "tensor", None)),  # [C, H, D]
    (r"map_head/kv/kernel$", ("fsdp", None, "tensor", None)),
    (r"map_head/out/kernel$", ("tensor", None, "fsdp")),
    (r"mlp/fc1/kernel$", ("fsdp", "tensor")),
    (r"mlp/fc1/bias$", ("tensor",)),
    (r"mlp/fc2/kernel$", ("tensor", "fsdp")),
    (r"head/kernel$", ("fsdp", None)),
    (r"embedding/kernel$", (None, None, None, "fsdp")),
    (r".*", ()),  # everything else replicated
)


class EncoderBlock(nn.Module):
  """Pre-norm block: x + attn(ln(x)), then x + mlp(ln(x)), with this layer's reducers."""
  num_heads: int
  mlp_dim: int
  layer: Optional[int] = 0  # None inside a scanned encoder (the index arrives traced)
  reducers: Tuple[rbase.PlannedReducer, ...] = ()
  context: Optional[rbase.ModelContext] = None
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
  phase: Optional[float] = None  # the schedule phase the reducers see (`BlockInfo.phase`)
  prefix_key_bias: float = 0.0  # added to the class/register tokens' key logits
  mlp_activation: Optional[str] = None  # `layers.MLP_ACTIVATIONS`; None: GELU per gelu_approximate

  @nn.compact
  def __call__(self, state: rbase.TokenState, drop_rate=None, layer_index=None, run=None):
    """`drop_rate` overrides `drop_path_rate` and `layer_index` the layer (traced values under
    nn.scan); `run` holds the training progress and extra inputs that reach the reducers."""
    rate = self.drop_path_rate if drop_rate is None else drop_rate
    layer = self.layer if layer_index is None else layer_index
    run = run or {}
    built = [p.build(self.layer, self.context) for p in self.reducers]
    needs = frozenset().union(*(r.needs for r in built))
    # The block's per-token information rides in the state (moved by every gather and merge)
    # when more than one reducer call follows the attention, so each reads it fresh.
    after_attn = sum(s in (rbase.POST_ATTN, rbase.POST_BLOCK) for r in built for s in r.stages)
    carry_info = bool(needs) and after_attn > 1
    out: Dict[str, Any] = {"losses": {}, "reduction": {}}
    norm = lambda name: nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)

    def residual(x, y, scale_name):
      if self.layer_scale_init is not None:
        y = layers.LayerScale(self.layer_scale_init, self.param_dtype, name=scale_name)(y)
      return x + layers.drop_path(self, y, rate, deterministic=self.deterministic)

    def stage_info(stage, state, attn):
      fields = {}
      for need in needs:
        if stage == rbase.PRE_BLOCK:
          continue
        if carry_info:
          if state.has(rbase.BLOCK_OWNER, need):
            fields[need] = state.get(rbase.BLOCK_OWNER, need)
        else:
          fields[need] = attn.get(need)
      return rbase.BlockInfo(layer=layer, stage=stage, step=run.get("step"),
                             progress=run.get("progress", 1.0), phase=self.phase,
                             inputs=run.get("inputs", {}), **fields)

    def run_stage(stage, state, attn=None):
      for reducer in built:
        if stage not in reducer.stages:
          continue
        info = stage_info(stage, state, attn or {})
        missing = [n for n in reducer.needs if stage != rbase.PRE_BLOCK and getattr(info, n) is None]
        if missing:
          raise ConfigError(f"{reducer.where}: {reducer.name} needs {missing}, but an earlier "
                            "reducer at this stage replaced the tokens without carrying them")
        state, aux = rbase.run_reducer(reducer, state, info, train=not self.deterministic)
        # A multi-stage method's losses and records are keyed by stage too, so none of one
        # stage overwrites another's.
        key = reducer.name if len(reducer.stages) == 1 else f"{reducer.name}/{stage}"
        out["losses"].update({f"{key}/{k}": v for k, v in aux.pop("losses", {}).items()})
        if aux:
          out["reduction"][key] = aux
      return state

    state = run_stage(rbase.PRE_BLOCK, state)

    bias = None
    if self.proportional_attention:
      bias = jnp.log(state.size)[:, None, None, :]
    # The class/register tokens stand for one copy per time slice only in the clip's own
    # sequence; once frames run as sequences (TempMe), each holds real copies.
    own_prefix = state.sequences == 1 and (self.context is None
                                           or state.num_prefix == self.context.num_prefix)
    if self.prefix_key_bias and state.num_prefix and own_prefix:
      prefix = jnp.arange(state.x.shape[1]) < state.num_prefix
      prefix_bias = jnp.where(prefix, self.prefix_key_bias, 0.0)[None, None, None, :]
      bias = prefix_bias if bias is None else bias + prefix_bias
    y, attn = attention_lib.SelfAttention(
        self.num_heads, qkv_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype,
        implementation=self.attention_impl, name="attn")(
            norm("norm1")(state.x), bias=bias, key_mask=state.mask, policy=state.policy,
            need_keys_mean=rbase.KEYS_MEAN in needs, need_cls_attn=rbase.CLS_ATTN in needs,
            return_probs=self.return_attention)
    y = nn.Dropout(self.dropout)(y, self.deterministic)
    state = state.replace(x=residual(state.x, y, "ls1"))
    if self.return_attention:
      out["attention"] = attn["probs"]
    if carry_info:
      for need in needs:
        state = state.put(rbase.BLOCK_OWNER, need, attn[need], per_token=True,
                          merge=rbase.BLOCK_MERGE[need])

    state = run_stage(rbase.POST_ATTN, state, attn)

    y = layers.MlpBlock(self.mlp_dim, self.dropout, self.gelu_approximate, self.dtype,
                        self.param_dtype, self.mlp_activation, name="mlp")(
                            norm("norm2")(state.x), deterministic=self.deterministic)
    state = state.replace(x=residual(state.x, y, "ls2"))
    state = run_stage(rbase.POST_BLOCK, state, attn)
    if carry_info:
      for need in needs:
        if state.has(rbase.BLOCK_OWNER, need):
          _, state = state.pop(rbase.BLOCK_OWNER, need)
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
  mlp_activation: Optional[str] = None  # as VisionTransformer.mlp_activation

  @nn.compact
  def __call__(self, x, key_mask=None, return_probs: bool = False):
    """x [B, N, C] -> pooled [B, C]; with `return_probs`, (pooled, probs [B, heads, N]): the
    probe's softmax attention over the N tokens (key_mask respected)."""
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
    probs = None
    if return_probs:
      # The fused kernel does not expose its softmax; one probe row is cheap to recompute, and
      # the pooled output stays the fused one (bit-identical with or without the probabilities).
      mask4 = None if key_mask is None else key_mask[:, None, None, :]
      probs = attention_lib.attention_probs(q, kv[:, :, 0], key_mask=mask4)[:, :, 0]
    y = nn.DenseGeneral(width, axis=(-2, -1), name="out", **init)(y)
    z = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="norm")(y)
    y = y + layers.MlpBlock(self.mlp_dim, gelu_approximate=self.gelu_approximate, dtype=self.dtype,
                            param_dtype=self.param_dtype, activation=self.mlp_activation,
                            name="mlp")(z, deterministic=True)
    return (y[:, 0], probs) if return_probs else y[:, 0]


def _mean_direction(tokens):
  """The pooled class token of a clip whose frames each kept their own (TempMe): the mean of
  their unit-normalised embeddings, as TempMe's video feature (its cosine similarity discards
  the length), at the class tokens' mean length, so that a head trained on one class token
  reads it at the same scale (one token, or identical ones, give that token back)."""
  t = tokens.astype(jnp.float32)
  norm = jnp.linalg.norm(t, axis=-1, keepdims=True)
  direction = (t / jnp.maximum(norm, 1e-6)).mean(axis=1)
  return (direction * norm.mean(axis=1)).astype(tokens.dtype)


class VisionTransformer(nn.Module):
  """ViT classifier. `apply(variables, images [B, H, W, C], train=False) -> (logits, aux)`; with a
  3-element `patch_size` (t, p, p) a video ViT (ViViT's model 1: joint space-time attention)
  over clips [B, T, H, W, C], embedded by a 3-D convolution into time-major tokens.

  aux holds: "stem" (patch grid), "blocks" ({block_NN: tokens} or stacked [depth, ...] when
  scanned), "encoded", "pre_logits", "state" (the final TokenState), "losses" (auxiliary
  losses from reducers, summed by the trainer), "reduction" (reducer records), with
  pool_type "map" "map_attention" (the MAP probe's attention [B, N_pooled] over the tokens it
  pools, averaged over heads: the patch tokens, or all with `pool_include_prefix`) and, with
  `return_attention`, "attention" (per-layer [B, H, N, N] probabilities).
  """
  num_classes: int = 1000  # 0: no head; the logits are the pooled features
  patch_size: Sequence[int] = (16, 16)
  width: int = 768
  depth: int = 12
  mlp_dim: Optional[int] = None  # default 4 * width
  num_heads: int = 12
  channels: int = 3
  # "learn" (one table over all patches) | "learn_factorised" (video: a spatial table plus a
  # zero-initialised temporal one, TimeSformer's) | "sincos2d" (big_vision's) | "sincos2d_mae"
  # (MAE's) | "sincos1d" (VideoMAE's table over all patches) | "none"
  posemb: str = "learn"
  posemb_prefix: bool = False  # class/register tokens have positions too (timm's classic ViT)
  pool_type: str = "tok"  # "tok" (class token) | "gap" | "map" | "none" (all tokens)
  class_token: Optional[bool] = None  # default: pool_type == "tok"
  num_registers: int = 0
  # Video: the class/register tokens attend as one copy per time slice (their key logits get
  # + log T'), so that a clip of one repeated image runs exactly as the image model did;
  # vitoken.convert.inflate sets it. False: ViViT's plain class token.
  prefix_per_slice: bool = False
  pool_include_prefix: bool = False  # gap/map over class/register tokens too
  fc_norm: bool = False  # LayerNorm after pooling instead of before (timm's avg-pool models)
  pre_norm: bool = False  # LayerNorm before the blocks (CLIP)
  patch_bias: bool = True
  qkv_bias: bool = True
  layer_scale_init: Optional[float] = None
  gelu_approximate: bool = False
  # The MLP nonlinearity (blocks and MAP head): None keeps GELU (tanh form iff
  # gelu_approximate); "gelu" (exact), "gelu_tanh", "quick_gelu" (OpenAI CLIP's x*sigmoid(1.702x)).
  mlp_activation: Optional[str] = None
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

  def context(self) -> rbase.ModelContext:
    """What reducers need to know of the model to build layers that fit it."""
    return rbase.ModelContext(
        width=self.width, num_heads=self.num_heads, mlp_dim=self.mlp_dim or 4 * self.width,
        depth=self.depth, layer_norm_eps=self.layer_norm_eps,
        gelu_approximate=self.gelu_approximate,
        attention_impl=attention_lib.check_implementation(self.attention_impl),
        dtype=self.dtype, param_dtype=self.param_dtype, num_prefix=self.num_prefix,
        class_token=self.num_prefix > self.num_registers, mlp_activation=self.mlp_activation)

  def rng_streams(self) -> frozenset:
    """The rng streams `apply` needs besides "dropout" (those the reducers declare)."""
    return self.plan().rng_streams

  def layer_decay_groups(self) -> Dict[str, str]:
    """{top-level parameter name: "stem" | "head"} for everything outside the blocks."""
    groups = dict(LAYER_DECAY_GROUPS)
    groups.update(self.plan().layer_decay_groups())
    return groups

  def sharding_rules(self) -> Tuple[Tuple[str, Tuple], ...]:
    """Partition rules, first match wins: the configured reducers' own, then the ViT's
    (`SHARDING_RULES`, which ends by replicating everything else)."""
    # The patch embedding's kernel is [*patch, C_in, width]: a video model's has one more axis.
    embedding = (None,) * (len(self.patch_size) + 1) + ("fsdp",)
    own = tuple((p, embedding if p == r"embedding/kernel$" else spec) for p, spec in SHARDING_RULES)
    return tuple(self.plan().sharding_rules()) + own

  def patch_grid(self, image_size: Sequence[int]) -> PatchGrid:
    """The patch grid of images of `image_size` (H, W), or of clips of (T, H, W) for a video
    model (3-element `patch_size`); an error when the patches do not divide it."""
    return PatchGrid.of(tuple(image_size), tuple(self.patch_size))

  def adapt_loaded(self, key: str, value, target_shape, *, image_size: Sequence[int],
                   method: str = "bilinear") -> np.ndarray:
    """A loaded parameter fitted to this model for images of `image_size` (H, W): a learned
    `pos_embedding` of another shape is resized from its square grid to this model's grid
    (`posemb.resize_posemb`, `method` as there); any other value is returned as it is."""
    value = np.asarray(value)
    if key != "pos_embedding" or value.shape == tuple(target_shape):
      return value
    num_prefix = self.num_prefix if self.posemb_prefix else 0
    old_n = value.shape[1] - num_prefix
    side = int(round(np.sqrt(old_n)))
    if side * side != old_n:
      raise InputError(f"pos_embedding {value.shape}: not a square grid, cannot resize")
    return np.asarray(posemb_lib.resize_posemb(value, (side, side), self.patch_grid(image_size).hw,
                                               num_prefix=num_prefix, method=method))

  def _check_config(self) -> rbase.ReductionPlan:
    if self.pool_type not in POOL_TYPES:
      raise ConfigError(f"pool_type must be one of {POOL_TYPES}, got {self.pool_type!r}")
    if self.posemb not in POSEMB_TYPES:
      raise ConfigError(f"posemb must be one of {POSEMB_TYPES}, got {self.posemb!r}")
    if self.pool_type == "tok" and self.class_token is False:
      raise ConfigError("pool_type='tok' reads the class token, but class_token=False")
    if len(self.patch_size) not in (2, 3):
      raise ConfigError(f"patch_size is (height, width) for images or (frames, height, width) "
                        f"for video, got {tuple(self.patch_size)}")
    video = len(self.patch_size) == 3
    if self.posemb in ("sincos2d", "sincos2d_mae") and video:
      raise ConfigError(f"posemb={self.posemb!r} is a 2-D table; a video model (patch_size "
                        f"{tuple(self.patch_size)}) takes 'learn', 'learn_factorised', 'sincos1d' "
                        "or 'none'")
    if self.posemb == "learn_factorised" and not video:
      raise ConfigError("posemb='learn_factorised' adds a temporal table: it needs a video "
                        "model (a 3-element patch_size like (2, 16, 16))")
    if self.width % self.num_heads:
      raise ConfigError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    layers.check_mlp_activation(self.mlp_activation, self.gelu_approximate)
    if self.remat_policy not in (None, "none") and not hasattr(jax.checkpoint_policies, self.remat_policy):
      raise ConfigError(f"unknown remat_policy {self.remat_policy!r}; use a name from "
                        "jax.checkpoint_policies, e.g. 'nothing_saveable'")
    attention_lib.check_implementation(self.attention_impl)
    plan = self.plan()
    for p in plan.embed:
      if p.name in TOP_NAMES or re.fullmatch(r"block_\d+", p.name) or _auto_name(p.name):
        raise ConfigError(f"token_reduction entry name {p.name!r} is taken by the ViT; give it "
                          "another `name`")
    for p in (p for layer in plan.per_layer for p in layer):
      if p.name in BLOCK_NAMES or _auto_name(p.name):
        raise ConfigError(f"token_reduction entry name {p.name!r} is taken by the block; give it "
                          "another `name`")
    return plan

  def _check_images(self, images) -> PatchGrid:
    video = len(self.patch_size) == 3
    if images.ndim != (5 if video else 4):
      if video:
        raise InputError(f"this video model (patch_size {tuple(self.patch_size)}) takes clips "
                         "[batch, time, height, width, channels], got shape "
                         f"{tuple(images.shape)}" + (": an image batch? Make clips of one frame "
                         "repeated, or use the image model" if images.ndim == 4 else ""))
      raise InputError("images must be [batch, height, width, channels], got shape "
                       f"{tuple(images.shape)}" + (": a batch of clips? This image model has a "
                       "2-D patch_size; inflate it to video with vitoken.convert.inflate"
                       if images.ndim == 5 else ""))
    if images.shape[-1] != self.channels:
      hint = ""
      if images.shape[1] == self.channels:
        hint = (" (it looks like NCTHW; vitoken takes clips as NTHWC)" if video
                else " (it looks like NCHW; vitoken takes NHWC)")
      raise InputError(f"images have {images.shape[-1]} channels, the model takes {self.channels}: "
                       f"shape {tuple(images.shape)}{hint}")
    return self.patch_grid(images.shape[1:-1])

  def _embed(self, images, grid: PatchGrid, plan, run, train, phase=None):
    """Patch embedding, class/register tokens, embedding-level reducers, then positions."""
    x = nn.Conv(self.width, tuple(self.patch_size), strides=tuple(self.patch_size), padding="VALID",
                use_bias=self.patch_bias, dtype=self.dtype, param_dtype=self.param_dtype, name="embedding")(images)
    b = x.shape[0]
    stem = x
    x = x.reshape(b, grid.num_patches, self.width)

    prefix = []
    if self.num_prefix > self.num_registers:
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width), self.param_dtype)
      prefix.append(cls)
    if self.num_registers:
      prefix.append(self.param("registers", nn.initializers.normal(1e-6),
                               (1, self.num_registers, self.width), self.param_dtype))
    prefix = [jnp.broadcast_to(p.astype(x.dtype), (b,) + p.shape[1:]) for p in prefix]
    state = rbase.TokenState.create(jnp.concatenate(prefix + [x], axis=1),
                                    num_prefix=self.num_prefix, grid=grid,
                                    track_source=plan.track_source)
    losses, records = {}, {}
    context = self.context()
    for planned in plan.embed:
      reducer = planned.build(rbase.EMBED_LAYER, context)
      info = rbase.BlockInfo(layer=rbase.EMBED_LAYER, stage=rbase.PRE_POSEMB, step=run.get("step"),
                             progress=run.get("progress", 1.0), phase=phase,
                             inputs=run.get("inputs", {}))
      state, aux = rbase.run_reducer(reducer, state, info, train=train)
      losses.update({f"{planned.name}/{k}": v for k, v in aux.pop("losses", {}).items()})
      if aux:
        records[planned.name] = aux

    pos = self._posemb(grid, x.dtype)  # [1, num_prefix + patches, C]: zeros where none
    if pos is not None:
      if plan.embed:
        # Reducers may have dropped, reordered or added tokens: each takes its own position,
        # learned tokens none.
        ids = state.ids
        taken = rbase.take_tokens(jnp.broadcast_to(pos, (b,) + pos.shape[1:]), jnp.maximum(ids, 0))
        pos = jnp.where((ids >= 0)[..., None], taken, jnp.zeros((), pos.dtype))
      state = state.replace(x=state.x + pos)
    return state, stem, losses, records

  def _learned_table(self, name: str, n_pos: int, what: str, init):
    expected = (1, n_pos, self.width)
    if self.has_variable("params", name):
      have = tuple(self.get_variable("params", name).shape)
      if have != expected:
        raise InputError(
            f"{name} has shape {have} but {what} need {expected}; resize it with "
            "vitoken.models.posemb.resize_posemb (the converters take image_size=...; "
            "vitoken.convert.inflate takes num_frames=...)")
    return self.param(name, init, expected, self.param_dtype)

  def _posemb(self, grid: PatchGrid, dtype):
    n_patches = grid.num_patches
    n_prefix = self.num_prefix if self.posemb_prefix else 0
    patches = ("clips" if grid.ndim == 3 else "images") + " of " + "x".join(map(str, grid.grid)) + " patches"
    if self.posemb == "learn":
      pos = self._learned_table("pos_embedding", n_prefix + n_patches, patches,
                                nn.initializers.normal(self.width ** -0.5)).astype(dtype)
    elif self.posemb == "learn_factorised":
      # TimeSformer: a spatial table (laid out as an image model's, so that inflation copies
      # it) plus a temporal one that starts at zero, added per time slice.
      h, w = grid.hw
      space = self._learned_table("pos_embedding", n_prefix + h * w, f"frames of {h}x{w} patches",
                                  nn.initializers.normal(self.width ** -0.5))
      time = self._learned_table("pos_embedding_time", grid.frames, f"{grid.frames} time slices",
                                 nn.initializers.zeros)
      patch_pos = (time[0][:, None, :] + space[0, n_prefix:][None]).reshape(1, n_patches, -1)
      pos = jnp.concatenate([space[:, :n_prefix], patch_pos], axis=1).astype(dtype)
    elif self.posemb == "sincos1d":
      pos = posemb_lib.sincos_1d(n_patches, self.width, dtype=dtype)
      if self.posemb_prefix:
        pos = jnp.concatenate([jnp.zeros((1, self.num_prefix, self.width), dtype), pos], axis=1)
    elif self.posemb in ("sincos2d", "sincos2d_mae"):
      table = posemb_lib.sincos_2d if self.posemb == "sincos2d" else posemb_lib.sincos_2d_mae
      pos = table(grid, self.width, dtype=dtype)
      if self.posemb_prefix:
        pos = jnp.concatenate([jnp.zeros((1, self.num_prefix, self.width), dtype), pos], axis=1)
    else:
      return None
    if not self.posemb_prefix and self.num_prefix:
      # Class/register tokens get no position (adding zero leaves them bit-identical).
      pos = jnp.concatenate([jnp.zeros((1, self.num_prefix, self.width), dtype), pos], axis=1)
    return pos

  def _encode(self, state, plan, train, run, phase=None):
    block_kw = dict(phase=phase,
        prefix_key_bias=float(np.log(state.grid.frames)) if self.prefix_per_slice else 0.0,
        context=self.context(), num_heads=self.num_heads, mlp_dim=self.mlp_dim or 4 * self.width,
        dropout=self.dropout,
        layer_scale_init=self.layer_scale_init, qkv_bias=self.qkv_bias,
        gelu_approximate=self.gelu_approximate, mlp_activation=self.mlp_activation,
        layer_norm_eps=self.layer_norm_eps,
        attention_impl=self.attention_impl, return_attention=self.return_attention,
        deterministic=not train, dtype=self.dtype, param_dtype=self.param_dtype)
    block_cls = EncoderBlock
    if self.remat_policy not in (None, "none"):
      block_cls = nn.remat(block_cls, policy=getattr(jax.checkpoint_policies, self.remat_policy),
                           prevent_cse=not self.scan)
    rates = stochastic_depth_rates(self.drop_path_rate, self.depth)

    if self.scan:
      if not plan.scannable:
        raise ConfigError("scan=True needs the same shape-preserving reducers at every layer; "
                          "this token_reduction changes the token count, use scan=False")
      split = {"params": True, "dropout": True, **{s: True for s in plan.rng_streams}}
      blocks = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs=split,
                       in_axes=(0, 0, nn.broadcast), length=self.depth)
      # Every scanned layer runs the same reducers, so sizes are all 1 until the first acts.
      return blocks(layer=None, reducers=plan.at(0), name="blocks",
                    proportional_attention=plan.proportional_attention, **block_kw)(
          state, jnp.asarray(rates, jnp.float32), jnp.arange(self.depth, dtype=jnp.int32), run)

    outs = {}
    for i in range(self.depth):
      state, outs[_block_name(i)] = block_cls(
          layer=i, reducers=plan.at(i), proportional_attention=plan.proportional_at(i),
          drop_path_rate=rates[i], name=_block_name(i), **block_kw)(state, None, None, run)
    return state, outs

  def _pool(self, x, state, aux):
    """The pooled features; what the pooling itself reveals (MAP's attention) goes into aux."""
    p = 0 if self.pool_include_prefix else state.num_prefix
    tokens = x[:, p:]
    mask = None if state.mask is None else state.mask[:, p:]
    if self.pool_type == "tok":
      if state.num_prefix > self.num_prefix:
        return _mean_direction(x[:, :state.num_prefix])
      return x[:, 0]
    if self.pool_type == "gap":
      # Each token stands for `size` patches (merging), so the mean over the original patches
      # is size-weighted, as the ToMe reference does for average-pooled (MAE) models.
      w = state.size[:, p:]
      if mask is not None:
        w = w * mask
      if state.policy is not None:
        w = w * state.policy[:, p:]
      w = w.astype(tokens.dtype)[..., None]
      return (tokens * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1e-6)
    if self.pool_type == "map":
      pooled, probs = MAPHead(self.num_heads, self.mlp_dim or 4 * self.width, self.gelu_approximate,
                              self.layer_norm_eps, self.attention_impl, self.dtype,
                              self.param_dtype, self.mlp_activation, name="map_head")(
                                  tokens, mask, return_probs=True)
      aux["map_attention"] = probs.mean(axis=1)
      return pooled
    return x  # "none"

  @nn.compact
  def __call__(self, images, *, train: bool = False, step=None, progress=None,
               phase: Optional[float] = None, inputs=None):
    """`step` (the optimizer step) and `progress` (fraction of training done, 1.0 when not
    given) reach every reducer's `BlockInfo` for schedules, and so does `phase`: a static
    Python float, the start of the current schedule phase as a fraction of training (one of
    `plan().phase_starts()`, or 0.0), for reducers whose token counts follow a schedule (each
    phase is its own compiled program); None (evaluation, or a training call outside the
    trainer) gives their final settings. `inputs` carries extra batch fields (masks, codes)
    to the reducers as `info.inputs`."""
    plan = self._check_config()
    grid = self._check_images(images)
    phase = None if phase is None else float(phase)
    images = jnp.asarray(images, self.dtype or jnp.float32)
    run = {"progress": jnp.asarray(1.0 if progress is None else progress, jnp.float32),
           "inputs": dict(inputs or {})}
    if step is not None:
      run["step"] = jnp.asarray(step, jnp.int32)

    state, stem, losses, records = self._embed(images, grid, plan, run, train, phase)
    x = nn.Dropout(self.dropout)(state.x, not train)
    if self.pre_norm:
      x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="norm_pre")(x)
    state, outs = self._encode(state.replace(x=x), plan, train, run, phase)

    aux: Dict[str, Any] = {"stem": stem}
    if self.scan:
      aux["blocks"] = outs["tokens"]
      # Scanned reducers' losses come out stacked over layers: each is a sum over layers.
      aux["losses"] = {**losses, **{f"blocks/{n}": v.sum(axis=0) for n, v in outs["losses"].items()}}
      aux["reduction"] = {**records, **{f"blocks/{n}": v for n, v in outs["reduction"].items()}}
      if self.return_attention:
        aux["attention"] = outs["attention"]
    else:
      aux["blocks"] = {k: o["tokens"] for k, o in outs.items()}
      aux["losses"] = {**losses, **{f"{k}/{n}": v for k, o in outs.items()
                                    for n, v in o["losses"].items()}}
      aux["reduction"] = {**records, **{f"{k}/{n}": v for k, o in outs.items()
                                        for n, v in o["reduction"].items()}}
      if self.return_attention:
        aux["attention"] = {k: o["attention"] for k, o in outs.items()}

    # A reducer that ran frames as sequences of their own (TempMe) leaves several per example:
    # one sequence again, every class token in front.
    state = state.join_sequences()
    x = state.x
    if not self.fc_norm:
      x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="encoder_norm")(x)
    aux["encoded"] = x
    aux["state"] = state
    x = self._pool(x, state, aux)
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
  settings_lib.check_keys(fields, option_names(), "ViT option")
  return VisionTransformer(num_classes=num_classes, **fields)


def option_names() -> Tuple[str, ...]:
  """Every field a config's `model` section may set."""
  return tuple(sorted(set(VisionTransformer.__dataclass_fields__) - {"parent", "name"}))
