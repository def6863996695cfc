"""LookupViT (Koner et al., "LookupViT: Compressing visual information to a limited number of
tokens", ECCV 2024, arXiv 2407.12753) as a reducer placed at every block of a ViT.

Two token sets. The N patch tokens (after position embeddings) are the *lookup* tokens; a few
*compressed* tokens come from resizing the patch grid down (e.g. 14x14 -> 7x7). Each block:

    x_p = x_p + MHBC_l->p(LN(x_p), LN(x_l))     compressed tokens gather from the lookup tokens;
                                                logits A = q(x_p) k(x_l)^T / sqrt(d), [B,H,M,N]
    x_p = x_p + MHSA(LN(x_p)); x_p = x_p + MLP(LN(x_p))       the ViT's own block, on M tokens
    x_l = x_l + MHBC_p->l(LN(x_p), A)           lookup tokens read the compressed ones with the
                                                *same* logits A, transposed: one QK^T per block
    x_l = x_l + MLP_low(LN(x_l))                a low-width MLP (hidden = mlp_ratio * width)

and classification reads the compressed tokens (the ViT's pooling after the last block). The
compressed self-attention and MLP are the ViT's blocks, so a timm/big_vision checkpoint's patch
embedding, position embedding and blocks load as they are (the cross-attention starts from its
initialisers).

Choices where the paper leaves a detail open (see also docs/token_learners.md):
- compressed tokens are a bilinear, antialiased resize of the lookup grid (a fixed linear map,
  `resize_matrix`), so their positions are the resized position embeddings; any grid up to
  the patch grid runs with the same parameters, which is how one trained model trades compute
  for accuracy at inference (`grid=` at evaluation), and `train_grids` trains at several grids
  (one drawn per step from the "lookup" rng stream);
- the reverse direction normalises the shared logits over the compressed tokens (softmax of
  A^T over M), so each lookup token takes a convex mix of the compressed tokens; the reverse
  direction has its own value and output projections, and the forward its own q, k, v, out;
- class/register tokens belong to the compressed set (they attend to the lookup tokens and
  are read by them); the lookup set holds patch tokens only;
- the lookup MLP uses the ViT's GELU and hidden width `mlp_ratio` x width (default 0.5, i.e.
  1/8 of a standard 4x MLP); the cross-attention uses the ViT's head count;
- after the last LookupViT block the lookup tokens are dropped, so that block skips the
  reverse cross-attention and lookup MLP (they cannot change the output);
- no dropout or stochastic depth on the lookup branches.
"""
import functools
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitoken import settings as settings_lib
from vitoken.errors import ConfigError
from vitoken.models import attention as attention_lib, layers as layers_lib
from vitoken.models.reducers import base

RNG_STREAM = "lookup"  # draws the training grid when `train_grids` lists several


def parse_grid(grid: Any, what: str = "grid") -> Tuple[int, int]:
  if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
    grid = (int(grid), int(grid))
  if (not isinstance(grid, (tuple, list)) or len(grid) != 2
      or not all(settings_lib.is_count(g) for g in grid)):
    raise ConfigError(f"lookup {what} must be a positive int or a pair (rows, cols), got {grid!r}")
  return (int(grid[0]), int(grid[1]))


def check_grid(compressed: Tuple[int, int], patches: Tuple[int, int], what: str = "grid"):
  """A compressed grid must fit inside the patch grid and keep roughly its aspect ratio."""
  (m1, m2), (h, w) = compressed, patches
  if m1 > h or m2 > w:
    raise ConfigError(f"lookup {what} {m1}x{m2} is larger than the {h}x{w} patch grid; the "
                      "compressed tokens resize the patch grid down")
  ratio = (m1 / h) / (m2 / w)
  if not 0.5 <= ratio <= 2.0:
    raise ConfigError(f"lookup {what} {m1}x{m2} does not scale the {h}x{w} patch grid evenly "
                      f"(row scale {m1}/{h}, column scale {m2}/{w}); keep its aspect ratio")


@functools.lru_cache(maxsize=64)
def resize_matrix(patches: Tuple[int, int], compressed: Tuple[int, int]) -> np.ndarray:
  """[M, N] weights of the bilinear antialiased resize from the patch grid to the compressed one
  (rows sum to 1): compressed = R @ lookup."""
  h, w = patches
  with jax.ensure_compile_time_eval():  # a constant, also when first asked for under jit
    eye = jnp.eye(h * w, dtype=jnp.float32).reshape(h, w, h * w)
    out = jax.image.resize(eye, tuple(compressed) + (h * w,), method="bilinear", antialias=True)
    out = np.asarray(out.reshape(-1, h * w))
  out.setflags(write=False)
  return out


class BidirectionalCrossAttention(nn.Module):
  """Multi-head bidirectional cross-attention: one logits array serves both directions."""
  width: int
  num_heads: int
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def setup(self):
    if self.width % self.num_heads:
      raise ConfigError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    kw = dict(kernel_init=nn.initializers.xavier_uniform(), dtype=self.dtype,
              param_dtype=self.param_dtype)
    heads = lambda: nn.DenseGeneral((self.num_heads, self.width // self.num_heads), **kw)
    out = lambda: nn.DenseGeneral(self.width, axis=(-2, -1), **kw)
    self.q, self.k, self.v, self.out = heads(), heads(), heads(), out()
    self.v_back, self.out_back = heads(), out()

  def logits(self, compressed, lookup):
    """[B, H, M, N] = q(compressed) . k(lookup) / sqrt(head_dim), in float32."""
    return attention_lib.attention_logits(self.q(compressed), self.k(lookup))

  def gather(self, compressed, lookup):
    """Lookup -> compressed: (update of the M compressed tokens [B, M, C], logits)."""
    a = self.logits(compressed, lookup)
    v = self.v(lookup)
    y = jnp.einsum("bhmn,bnhd->bmhd", jax.nn.softmax(a, axis=-1).astype(v.dtype), v)
    return self.out(y), a

  def scatter(self, compressed, a, compressed_mask=None):
    """Compressed -> lookup with the same logits `a`, softmax over the compressed tokens
    (those with `compressed_mask` [B, M] True)."""
    v = self.v_back(compressed)
    if compressed_mask is not None:
      a = jnp.where(compressed_mask[:, None, :, None], a, jnp.finfo(a.dtype).min)
    y = jnp.einsum("bhmn,bmhd->bnhd", jax.nn.softmax(a, axis=-2).astype(v.dtype), v)
    return self.out_back(y)

  def __call__(self, compressed, lookup):
    """Both directions from scratch (for tests): (compressed update, lookup update, logits)."""
    up, a = self.gather(compressed, lookup)
    return up, self.scatter(compressed, a), a


@base.register("lookup")
class LookupViT(base.Reducer):
  """The LookupViT block around each ViT block (see the module docstring)."""
  stages = (base.PRE_BLOCK, base.POST_BLOCK)
  # The cross-attention shards like the block's attention (heads over "tensor"); the lookup MLP
  # is matched by the ViT's own mlp/fc1, mlp/fc2 rules.
  sharding_rules = (
      (r"cross/(q|k|v|v_back)/kernel$", ("fsdp", "tensor", None)),  # [C, H, D]
      (r"cross/(q|k|v|v_back)/bias$", ("tensor", None)),
      (r"cross/(out|out_back)/kernel$", ("tensor", None, "fsdp")),  # [H, D, C]
  )

  grid: Tuple[int, int] = (7, 7)
  train_grids: Tuple[Tuple[int, int], ...] = ()
  mlp_ratio: float = 0.5
  first: bool = False  # this block makes the compressed tokens
  last: bool = False  # this block drops the lookup tokens

  @classmethod
  def layer_settings(cls, depth: int, grid: Any = 7, mlp_ratio: float = 0.5,
                     layers: Optional[Sequence[int]] = None, train_grids: Sequence[Any] = ()):
    """`grid`: the compressed grid (int or (rows, cols)); `layers`: the LookupViT blocks
    (default all, contiguous); `train_grids`: grids to draw from per training step."""
    grid = parse_grid(grid)
    train = tuple(parse_grid(g, "train_grids entry") for g in (train_grids or ()))
    if not mlp_ratio > 0:
      raise ConfigError(f"lookup mlp_ratio must be positive, got {mlp_ratio!r}")
    layers = list(range(depth)) if layers is None else sorted(int(i) for i in layers)
    if not layers:
      raise ConfigError("lookup layers is empty")
    if layers != list(range(layers[0], layers[-1] + 1)):
      raise ConfigError(f"lookup layers must be contiguous (the lookup tokens flow block to "
                        f"block), got {layers}")
    for i in (layers[0], layers[-1]):
      if not 0 <= i < depth:
        raise ConfigError(f"lookup layer {i} is outside the ViT's {depth} blocks (0..{depth - 1})")
    return {i: dict(grid=grid, train_grids=train, mlp_ratio=float(mlp_ratio),
                    first=i == layers[0], last=i == layers[-1]) for i in layers}

  @classmethod
  def plan_flags(cls, settings):
    flags = super().plan_flags(settings)
    if len(settings.get("train_grids") or ()) > 1:
      flags["rng_streams"] = frozenset({RNG_STREAM})
    return flags

  def _ctx(self) -> base.ModelContext:
    if self.context is None:
      raise ValueError("the lookup reducer needs the model context (width, heads)")
    return self.context

  @nn.compact
  def __call__(self, state: base.TokenState, info: base.BlockInfo, *, train: bool = False):
    if info.stage == base.PRE_BLOCK:
      return self._gather(state, train)
    return self._scatter(state)

  def _compress(self, state: base.TokenState, train: bool):
    p = state.num_prefix
    lookup = state.x[:, p:]
    if state.mask is not None or state.policy is not None:
      raise ConfigError(f"{self.where}: lookup cannot compress a masked or policy-weighted token "
                        "state; place it before any pruning reducer")
    h, w = state.grid.hw
    if lookup.shape[1] != h * w:
      raise ConfigError(f"{self.where}: lookup resizes the {h}x{w} patch grid, but "
                        f"{lookup.shape[1]} patch tokens arrive (an earlier reducer changed them)")
    # Every configured grid is checked at init, not only at the first training step.
    check_grid(self.grid, (h, w))
    for g in self.train_grids:
      check_grid(g, (h, w), "train_grids entry")
    grids = self.train_grids if (train and self.train_grids) else (self.grid,)
    mats = [resize_matrix((h, w), tuple(g)) for g in grids]
    mask = None
    if len(mats) == 1:
      r = jnp.asarray(mats[0])
    else:
      # Several training grids in one program: every grid's tokens are padded to the largest
      # and the padding is masked (attention keys, the reverse softmax, pooling), which
      # computes exactly what that grid alone would. One grid is drawn per step.
      m_max = max(m.shape[0] for m in mats)
      stacked = np.stack([np.pad(m, ((0, m_max - m.shape[0]), (0, 0))) for m in mats])
      pick = jax.random.randint(self.make_rng(RNG_STREAM), (), 0, len(mats))
      r = jnp.asarray(stacked)[pick]
      counts = jnp.asarray([m.shape[0] for m in mats], jnp.int32)
      mask = jnp.concatenate([jnp.ones((state.num_prefix,), bool), jnp.arange(m_max) < counts[pick]])
    b = lookup.shape[0]
    compressed = jnp.einsum("mn,bnc->bmc", r.astype(lookup.dtype), lookup)
    state = state.combine(jnp.broadcast_to(r, (b,) + r.shape), compressed)
    if mask is not None:
      state = state.replace(mask=jnp.broadcast_to(mask, (b, mask.shape[0])))
    return state, lookup

  def _gather(self, state: base.TokenState, train: bool):
    ctx = self._ctx()
    if self.first:
      state, lookup = self._compress(state, train)
      state = state.put(self.name, "lookup", lookup)
    lookup = state.get(self.name, "lookup")
    update, logits = self._cross().gather(ctx.layer_norm(name="norm_compressed")(state.x),
                                          ctx.layer_norm(name="norm_lookup")(lookup))
    state = state.replace(x=state.x + update.astype(state.x.dtype))
    if not self.last:
      state = state.put(self.name, "logits", logits)
    return state, {}

  def _cross(self):
    ctx = self._ctx()
    return BidirectionalCrossAttention(ctx.width, ctx.num_heads, ctx.dtype, ctx.param_dtype,
                                       name="cross")

  def _scatter(self, state: base.TokenState):
    lookup, state = state.pop(self.name, "lookup")
    if self.last:
      return state, {}
    ctx = self._ctx()
    logits, state = state.pop(self.name, "logits")
    lookup = lookup + self._cross().scatter(ctx.layer_norm(name="norm_back")(state.x), logits,
                                           state.mask).astype(lookup.dtype)
    hidden = max(1, int(round(self.mlp_ratio * ctx.width)))
    lookup = lookup + layers_lib.MlpBlock(hidden, 0.0, ctx.gelu_approximate, ctx.dtype,
                                          ctx.param_dtype, name="mlp")(
                                              ctx.layer_norm(name="norm_mlp")(lookup),
                                              deterministic=True)
    return state.put(self.name, "lookup", lookup), {}
