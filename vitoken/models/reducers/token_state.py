"""The token sequence a ViT block and its reducers pass along (`TokenState`), and the batched
token gather every reducer moves tokens with (`take_tokens`, checkable with `checked_gathers`).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple, Union

import flax
import jax
import jax.numpy as jnp

from vitoken.models.gathers import _DEBUG, checked_gathers, run_checked, take_tokens  # noqa: F401  (part of the state's API)
from vitoken.models.patches import PatchGrid

# `TokenState.ids` of a token that is no single input position (a learned or fused token).
LEARNED_ID = -1

# How a per-token carried array follows a merge of tokens (a gather just moves it):
# "mean" size-weighted like the tokens, "sum", "max", or "keep" the destination's value.
MERGE_MODES = ("mean", "sum", "max", "keep")

# The grid of a state built without one (nothing that reads the grid can run on it).
EMPTY_GRID = PatchGrid((1, 1), (0, 0))

@flax.struct.dataclass
class TokenState:
  """Everything a block and its reducers know about the current token sequence.

  Leading `num_prefix` tokens (class token, registers) are protected: no reducer may drop,
  merge or reorder them. All per-token arrays share the [B, N] leading dims.

  Learned and fused tokens (a token learner's outputs) have `ids == LEARNED_ID`, `size` the
  total patch mass they pool (sum of their weights times the input sizes) and `source` the
  same weights spread over the initial tokens.
  """
  x: jax.Array  # [B, N, C] tokens
  size: jax.Array  # [B, N] float32: how many original tokens each token stands for
  ids: jax.Array  # [B, N] int32: index in the initial sequence (prefix included); LEARNED_ID
  source: Optional[jax.Array] = None  # [B, N, N0] which initial tokens each token holds
  mask: Optional[jax.Array] = None  # [B, N] bool: False marks a dropped or padding token
  # [B, N] float keep weights in [0, 1] (DynamicViT): attention to a key is scaled by its
  # weight (each token still attends fully to itself), so gradients reach the policy.
  policy: Optional[jax.Array] = None
  # Arrays a method carries between its stages and layers, as {"owner/key": array}. Keys
  # listed in `per_token` (with their merge mode) are [B, N, ...] and move with every gather
  # and merge; the others are global and nothing touches them.
  carry: Dict[str, Any] = flax.struct.field(default_factory=dict)
  per_token: Tuple[Tuple[str, str], ...] = flax.struct.field(pytree_node=False, default=())
  num_prefix: int = flax.struct.field(pytree_node=False, default=0)
  # The patch grid of the initial sequence (a PatchGrid; a bare (gh, gw) is taken as one).
  grid: PatchGrid = flax.struct.field(pytree_node=False, default=EMPTY_GRID)
  # The unprotected tokens form `slices` equal groups in time order (a video's time slices:
  # grid.frames at the start); 1 once a reducer has mixed tokens across slices.
  slices: int = flax.struct.field(pytree_node=False, default=1)
  # How many sequences of each example lie along the batch axis (example-major: rows
  # [i * sequences, (i + 1) * sequences) are example i's). 1 but after a reducer that runs
  # frames as sequences of their own (TempMe, `split_slices` / `group_sequences`); the ViT
  # joins them back into one per example after the last block.
  sequences: int = flax.struct.field(pytree_node=False, default=1)

  def __post_init__(self):
    if not isinstance(self.grid, PatchGrid):
      object.__setattr__(self, "grid", PatchGrid.coerce(self.grid))

  @property
  def num_tokens(self) -> int:
    return self.x.shape[1]

  @classmethod
  def create(cls, x, *, num_prefix: int, grid: Union[PatchGrid, Tuple[int, ...]],
             track_source: bool = False):
    b, n, _ = x.shape
    ids = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    source = None
    if track_source:
      source = jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32), (b, n, n))
    grid = PatchGrid.coerce(grid)
    return cls(x=x, size=jnp.ones((b, n), jnp.float32), ids=ids, source=source,
               num_prefix=num_prefix, grid=grid, slices=grid.frames)

  # ---- carried arrays ---------------------------------------------------------------------
  def put(self, owner: str, key: str, value, *, per_token: bool = False,
          merge: str = "mean") -> "TokenState":
    """Carries `value` under `owner/key` (owner: the reducer's config-entry name)."""
    full = f"{owner}/{key}"
    if per_token:
      if merge not in MERGE_MODES:
        raise ValueError(f"carry {full!r}: merge must be one of {MERGE_MODES}, got {merge!r}")
      if tuple(value.shape[:2]) != tuple(self.x.shape[:2]):
        raise ValueError(f"per-token carry {full!r} has shape {tuple(value.shape)}, but the "
                         f"tokens are {tuple(self.x.shape[:2])} [batch, tokens]")
    modes = tuple((k, m) for k, m in self.per_token if k != full)
    if per_token:
      modes += ((full, merge),)
    return self.replace(carry={**self.carry, full: value}, per_token=modes)

  def has(self, owner: str, key: str) -> bool:
    return f"{owner}/{key}" in self.carry

  def get(self, owner: str, key: str):
    full = f"{owner}/{key}"
    if full not in self.carry:
      raise KeyError(f"no carried array {full!r} in the token state (carried: "
                     f"{sorted(self.carry) or 'none'}); the stage that writes it has not run")
    return self.carry[full]

  def pop(self, owner: str, key: str):
    """(value, state without it)."""
    value, full = self.get(owner, key), f"{owner}/{key}"
    carry = {k: v for k, v in self.carry.items() if k != full}
    return value, self.replace(carry=carry, per_token=tuple(p for p in self.per_token if p[0] != full))

  def carried_per_token(self) -> Dict[str, Tuple[jax.Array, str]]:
    return {k: (self.carry[k], mode) for k, mode in self.per_token}

  # ---- moving tokens ----------------------------------------------------------------------
  def per_token_fields(self) -> Dict[str, jax.Array]:
    """The fields whose second axis is the token axis (those a gather must move)."""
    fields = {"x": self.x, "size": self.size, "ids": self.ids}
    for name in ("source", "mask", "policy"):
      if getattr(self, name) is not None:
        fields[name] = getattr(self, name)
    return fields

  def map_tokens(self, fn: Callable[[jax.Array], jax.Array]) -> "TokenState":
    """Applies `fn` to every per-token field and per-token carry (a gather or a slice)."""
    moved = {name: fn(a) for name, a in self.per_token_fields().items()}
    carry = dict(self.carry)
    for key, _ in self.per_token:
      carry[key] = fn(carry[key])
    return self.replace(carry=carry, **moved)

  def gather(self, indices: jax.Array) -> "TokenState":
    """Keeps tokens `indices` [B, K] (batched gather of every per-token field and carry)."""
    return self.map_tokens(lambda a: take_tokens(a, indices))

  def combine(self, weights: jax.Array, x: jax.Array, *, keep: Optional[jax.Array] = None
              ) -> "TokenState":
    """Replaces the unprotected tokens by learned ones: `x` [B, S, C] built with `weights`
    [B, S, T] over the T unprotected input tokens (rows need not sum to 1).

    The protected tokens stay in front, followed by the tokens `keep` [B, K] (indices into
    the whole sequence, protected ones included) when given (EViT keeps its attentive tokens
    and fuses the rest), then the new ones. The new tokens get ids LEARNED_ID, size = weights
    @ size, source = weights @ source, and per-token carries with merge "sum" or "mean" are
    combined the same way ("mean" normalised by the new size); "max"/"keep" carries cannot
    follow a soft combination and are an error (pop them first). Masked or policy-weighted
    states are refused: learned tokens have no single keep decision.
    """
    p = self.num_prefix
    if self.mask is not None or self.policy is not None:
      raise ValueError("combine: the token state has a mask or a keep policy; learned tokens "
                       "cannot inherit them")
    b, s = x.shape[:2]
    w = weights.astype(jnp.float32)
    size_in = self.size[:, p:]
    new_size = jnp.einsum("bst,bt->bs", w, size_in)
    head = self.map_tokens(lambda a: a[:, :p]) if keep is None else self.gather(keep)
    cat = lambda pre, new: jnp.concatenate([pre.astype(new.dtype), new], axis=1)
    carry = dict(head.carry)
    for key, mode in self.per_token:
      v = self.carry[key][:, p:].astype(jnp.float32)
      if mode == "sum":
        new = jnp.einsum("bst,bt...->bs...", w, v)
      elif mode == "mean":
        ws = w * size_in[:, None, :]
        new = jnp.einsum("bst,bt...->bs...", ws, v) / jnp.maximum(
            new_size, 1e-6).reshape((b, s) + (1,) * (v.ndim - 2))
      else:
        raise ValueError(f"combine: carry {key!r} merges by {mode!r}, which learned tokens "
                         "cannot follow; pop it before combining")
      carry[key] = cat(head.carry[key], new.astype(self.carry[key].dtype))
    source = None
    if self.source is not None:
      source = cat(head.source, jnp.einsum("bst,btm->bsm", w, self.source[:, p:]))
    ids = cat(head.ids, jnp.full((b, s), LEARNED_ID, jnp.int32))
    return self.replace(x=cat(head.x, x), size=cat(head.size, new_size), ids=ids,
                        source=source, carry=carry)

  # ---- time slices ------------------------------------------------------------------------
  def fold_slices(self) -> Tuple["TokenState", "TokenState"]:
    """(per-slice state, prefix state): the unprotected tokens as one sequence per time slice,
    [B, P + T*n, ...] -> [B*T, n, ...] (no prefix, the slice's 2-D grid, ids and sources still
    numbering the whole clip), and the protected tokens kept aside for `unfold_slices`. Global
    carries pass through as they are (a per-slice method's own are in the folded layout)."""
    t, p = self.slices, self.num_prefix
    n = self.num_tokens - p
    if n % t:
      raise ValueError(f"{n} unprotected tokens do not split into {t} time slices")
    folded = self.map_tokens(self.fold_array)
    prefix = self.map_tokens(lambda a: a[:, :p])
    return folded.replace(num_prefix=0, slices=1, grid=self.grid.slice_grid()), prefix

  def fold_array(self, a):
    """An array laid out as the tokens, [B, P + T*n, ...], folded as `fold_slices` folds the
    tokens: [B*T, n, ...], the prefix dropped (per-token block information, for example)."""
    return a[:, self.num_prefix:].reshape((a.shape[0] * self.slices, -1) + a.shape[2:])

  def split_slices(self) -> "TokenState":
    """Each time slice as a sequence of its own, with a copy of the protected tokens in front:
    [B*S, P + T*n, ...] -> [B*S*T, P + n, ...] (`sequences` times T, `slices` 1, the slice's
    grid). Unlike `fold_slices` the copies stay: the sequences run through the blocks as
    images would (TempMe). Global carries pass through."""
    if self.slices == 1:
      return self
    n = self.num_tokens - self.num_prefix
    if n % self.slices:
      raise ValueError(f"{n} unprotected tokens do not split into {self.slices} time slices")
    return self.map_tokens(self.split_array).replace(
        slices=1, sequences=self.sequences * self.slices, grid=self.grid.slice_grid())

  def split_array(self, a):
    """An array laid out as the tokens, [B, P + T*n, ...], split as `split_slices` splits the
    tokens: [B*T, P + n, ...], the leading P rows copied to every slice."""
    t, p = self.slices, self.num_prefix
    b, n = a.shape[0], (a.shape[1] - p) // t
    head = jnp.broadcast_to(a[:, None, :p], (b, t, p) + a.shape[2:])
    tail = a[:, p:].reshape((b, t, n) + a.shape[2:])
    return jnp.concatenate([head, tail], axis=2).reshape((b * t, p + n) + a.shape[2:])

  def group_sequences(self, group: int) -> "TokenState":
    """Joins each run of `group` consecutive sequences into one: the protected tokens of all
    of them first, then their unprotected tokens in sequence order (TempMe's regrouping of
    frames): [B*S, P + n, ...] -> [B*S/group, group*P + group*n, ...]. `num_prefix` becomes
    group*P, `sequences` S/group, `slices` group (the joined sequences were time slices)."""
    if group == 1:
      return self
    if self.sequences % group:
      raise ValueError(f"{self.sequences} sequences per example do not split into groups of "
                       f"{group}")
    p = self.num_prefix

    def join(a):
      rows, n = a.shape[:2]
      a = a.reshape((rows // group, group, n) + a.shape[2:])
      head = a[:, :, :p].reshape((rows // group, group * p) + a.shape[3:])
      tail = a[:, :, p:].reshape((rows // group, group * (n - p)) + a.shape[3:])
      return jnp.concatenate([head, tail], axis=1)

    grid = self.grid
    if grid.ndim == 2:
      grid = PatchGrid((1,) + grid.patch, (group,) + grid.grid)
    return self.map_tokens(join).replace(num_prefix=group * p, sequences=self.sequences // group,
                                         slices=group * self.slices, grid=grid)

  def join_sequences(self) -> "TokenState":
    """One sequence per example (`group_sequences` over all of its sequences)."""
    return self.group_sequences(self.sequences)

  def unfold_slices(self, folded: "TokenState", prefix: "TokenState") -> "TokenState":
    """The inverse of `fold_slices` after a reducer ran on the folded state: [B*T, n', ...]
    -> [B, P + T*n', ...], time slices still in order, `slices` kept."""
    b, t = prefix.x.shape[0], self.slices

    def join(head, tail, fill):
      tail = tail.reshape((b, t * tail.shape[1]) + tail.shape[2:])
      if head is None:
        head = jnp.full((b, self.num_prefix) + tail.shape[2:], fill, tail.dtype)
      return jnp.concatenate([head.astype(tail.dtype), tail], axis=1)

    fields = {name: None for name in ("source", "mask", "policy")}
    for name, tail in folded.per_token_fields().items():
      fields[name] = join(getattr(prefix, name), tail, {"mask": True, "policy": 1.0}.get(name, 0))
    per_token = dict(folded.per_token)
    carry = {k: v for k, v in folded.carry.items() if k not in per_token}
    for key in per_token:
      carry[key] = join(prefix.carry.get(key), folded.carry[key], 0)
    return self.replace(carry=carry, per_token=folded.per_token, **fields)
