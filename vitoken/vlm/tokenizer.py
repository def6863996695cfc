"""K visual tokens for a language model out of any vitoken ViT.

    tok = VisualTokenizer(encoder=vit_module, compressor={"method": "cls_topk", "num_tokens": 64},
                          feature_layer=-2, drop_prefix=True, projector=None)
    tokens, aux = tok.apply({"params": {"encoder": encoder_params, ...}}, images_nhwc)

The features are block `feature_layer`'s output (a Python index over blocks: LLaVA's
`hidden_states[-2]` is -2); the blocks after it do not run. Compressors that act inside the
encoder (`IN_ENCODER`) are reducers at that block's `post_block` stage, where it delivers its
class attention and mean keys; those that need more (the next block's weights, the question,
several blocks, the projector) run here. The encoder is frozen by default (no gradient reaches
its params). An encoder without a class token but with a MAP head (SigLIP) scores patches by
the MAP head's attention: a first pass runs the encoder to its end unreduced, and the probe's
attention over the last block's tokens ranks the feature block's tokens at the same positions.
"""
from typing import Any, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitoken import settings as settings_lib
from vitoken.errors import ConfigError, InputError
from vitoken.models.reducers import base, compression, token_learner
from vitoken.vlm import learned

# Reducers placed at the feature block (registered in models/reducers/compression.py).
IN_ENCODER = ("cls_topk", "visionzip", "tome_to_k")
# Compressors the tokenizer runs on the features; `pool` runs after the projector (M3).
IN_TOKENIZER = ("prumerge", "token_learner", "resampler", "quecc", "pool")
METHODS = IN_ENCODER + IN_TOKENIZER
# Methods that rank patches by the class token's attention (or the MAP head's).
SCORED = ("cls_topk", "visionzip")

# Each tokenizer-level method's settings and their defaults (the config schema).
_SETTINGS: Dict[str, Dict[str, Any]] = {
    "prumerge": {"num_tokens": None, "max_tokens": None, "neighbours": 32},
    "token_learner": {"num_tokens": 8, "bottleneck_dim": 64},
    # `queries`: the learned queries M (default num_tokens); fewer tokens use the first ones.
    "resampler": {"num_tokens": 64, "num_heads": 8, "keys": "content", "queries": None},
    "quecc": {"num_tokens": 64, "num_heads": 8, "levels": None},
    "pool": {"num_tokens": 64},
}


def resolve_layer(feature_layer: int, depth: int) -> int:
  """`feature_layer` as a block index in [0, depth), Python-style (-1 is the last block)."""
  if not isinstance(feature_layer, int) or not -depth <= feature_layer < depth:
    raise ConfigError(f"feature_layer={feature_layer!r} is outside the encoder's {depth} blocks; "
                      f"use -{depth}..{depth - 1} (LLaVA's hidden_states[-2] is -2)")
  return feature_layer % depth


def parse_compressor(compressor) -> List[Dict[str, Any]]:
  """The compressor setting as a checked chain of entries: those inside the encoder first,
  `pool` and an adaptive PruMerge (padded, with a mask) last."""
  if compressor is None:
    return []
  entries = [compressor] if isinstance(compressor, dict) or hasattr(compressor, "items") else list(compressor)
  out = []
  for i, entry in enumerate(entries):
    entry = dict(entry)
    method = entry.get("method")
    if method not in METHODS:
      raise ConfigError(f"compressor method {method!r}; known: {list(METHODS)}")
    if method in _SETTINGS:
      settings_lib.check_keys({k: v for k, v in entry.items() if k != "method"},
                              tuple(_SETTINGS[method]), f"compressor {method!r} setting")
      entry = {"method": method, **_SETTINGS[method], **entry}
    elif "layers" in entry:
      raise ConfigError(f"compressor {method!r}: it runs at feature_layer; drop `layers`")
    out.append(entry)
  methods = [e["method"] for e in out]
  first_outside = next((i for i, m in enumerate(methods) if m not in IN_ENCODER), len(methods))
  if any(m in IN_ENCODER for m in methods[first_outside:]):
    raise ConfigError(f"compressor chain {methods}: {list(IN_ENCODER)} act inside the encoder, "
                      "so they come before the others")
  for i, e in enumerate(out[:-1]):
    if e["method"] == "pool":
      raise ConfigError(f"compressor chain {methods}: pool runs after the projector, so it "
                        "comes last")
    if e["method"] == "prumerge" and e["num_tokens"] is None:
      raise ConfigError(f"compressor chain {methods}: an adaptive prumerge (no num_tokens) pads "
                        "to max_tokens with a mask, so it comes last")
  return out


def _projector_width(projector) -> Optional[int]:
  if projector is None:
    return None
  width = projector.get("width") if hasattr(projector, "get") else projector
  if not isinstance(width, int) or width < 1:
    raise ConfigError(f"projector={projector!r}: give the language model's width, an int or "
                      "{'width': D}")
  return width


class VisualTokenizer(nn.Module):
  """Images -> (tokens [B, K, C'], aux) for a language model. aux holds `ids` [B, K] (positions
  in the encoder's sequence, -1 for learned or merged-away tokens), `size` [B, K] (patches each
  token stands for), `source` ([B, K, N0] when a compressor tracks it, else None), `scores`
  ([B, N] the per-patch scores a compressor ranked by, else None) and `mask` ([B, K] bool
  for an adaptive count, else None)."""
  encoder: nn.Module
  compressor: Any = None  # {"method": ..., **settings}, a list of them (a chain), or None
  feature_layer: int = -2
  drop_prefix: bool = True  # VisionZip's dominant tokens count the class token and keep it
  projector: Any = None  # None | the LM width D (or {"width": D}): LLaVA-1.5's MLP
  frozen: bool = True  # no gradient reaches the encoder's params
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def feature_block(self) -> int:
    return resolve_layer(self.feature_layer, self.encoder.depth)

  def chain(self) -> List[Dict[str, Any]]:
    return parse_compressor(self.compressor)

  def _check_encoder(self, chain):
    enc = self.encoder
    if getattr(enc, "scan", False):
      raise ConfigError("VisualTokenizer reads the features of one block and stops there; a "
                        "scanned encoder (scan=True) has its blocks stacked: build it with "
                        "scan=False (the params are the same, unstacked)")
    if len(tuple(enc.patch_size)) != 2:
      raise ConfigError("VisualTokenizer takes an image encoder (2-D patch_size)")
    scored = [e["method"] for e in chain if e["method"] in SCORED]
    has_cls = enc.num_prefix > enc.num_registers
    if scored and not has_cls and enc.pool_type != "map":
      raise ConfigError(f"compressor {scored[0]!r} ranks patches by the class token's attention, "
                        "and this encoder has neither a class token nor a MAP head to score "
                        "them; use tome_to_k, pool, token_learner or resampler")
    if any(e["method"] == "prumerge" for e in chain) and not has_cls:
      raise ConfigError("compressor 'prumerge' scores patches by the class token's attention in "
                        "the next block, and this encoder has no class token")

  @nn.compact
  def __call__(self, images, *, train: bool = False, text=None, query_count=None):
    """`text` [B, T]: the language model's state at the question's last token (quecc).
    `query_count`: a traced int, how many of a resampler's queries to use this step
    (Matryoshka training): all `num_tokens` run and `aux["mask"]` marks the first ones."""
    enc = self.encoder
    chain = self.chain()
    self._check_encoder(chain)
    layer = self.feature_block()
    if self.is_initializing():
      enc(images)  # creates the encoder's params as its own config has them
    params = enc.variables["params"]
    if self.frozen:
      params = jax.lax.stop_gradient(params)
    has_cls = enc.num_prefix > enc.num_registers

    inputs, scores = {}, None
    if any(e["method"] in SCORED for e in chain) and not has_cls:
      # Unreduced, so that position i of the last block is the patch at position i.
      _, first = enc.clone(parent=None, num_classes=0, token_reduction=None).apply(
          {"params": params}, images)
      scores = first["map_attention"]
      inputs["token_scores"] = scores
    entries = [dict(e, layers=[layer]) for e in chain if e["method"] in IN_ENCODER]
    own = enc.token_reduction
    own = [] if own is None else [own] if hasattr(own, "items") else list(own)
    trunk = enc.clone(parent=None, depth=layer + 1, num_classes=0, pool_type="none",
                      class_token=has_cls, token_reduction=(own + entries) or None,
                      return_attention=False)
    _, out = trunk.apply({"params": params}, images, inputs=inputs)
    state = out["state"]
    tokens, p = state.x, state.num_prefix
    aux = {"ids": state.ids, "size": state.size, "source": state.source, "scores": scores,
           "mask": state.mask}
    for name, record in out["reduction"].items():
      if name.startswith(f"block_{layer:02d}/") and "scores" in record:
        aux["scores"] = record["scores"]
    keep_prefix = any(e["method"] == "visionzip" for e in entries) or not self.drop_prefix

    rest = [e for e in chain if e["method"] not in IN_ENCODER]
    after_projector = [e for e in rest if e["method"] == "pool"]
    for entry in [e for e in rest if e["method"] != "pool"]:
      tokens, aux, p = self._compress(entry, tokens, aux, p, params, layer, out, text, train,
                                      query_count)
    if not keep_prefix and p:
      tokens = tokens[:, p:]
      aux = {k: (v[:, p:] if k in ("ids", "size", "source", "mask") and v is not None else v)
             for k, v in aux.items()}
    width = _projector_width(self.projector)
    if width is not None:
      tokens = learned.Projector(width, self.dtype, self.param_dtype, name="projector")(tokens)
    for entry in after_projector:
      tokens, aux = self._pool(entry, tokens, aux, keep_prefix, p)
    return tokens, aux

  def _compress(self, entry, tokens, aux, p, params, layer, out, text, train, query_count):
    method, k = entry["method"], entry["num_tokens"]
    b = tokens.shape[0]
    if method == "prumerge":
      nxt = f"block_{layer + 1:02d}"
      if layer + 1 >= self.encoder.depth or nxt not in params:
        raise ConfigError(f"compressor 'prumerge' reads the attention of the block after the "
                          f"feature block ({layer}), and the encoder has {self.encoder.depth} "
                          "blocks; use an earlier feature_layer")
      q, key = _next_block_qk(params[nxt], tokens, self.encoder.layer_norm_eps)
      new, ids, mask, scores = compression.prumerge(
          tokens, q, key, num_prefix=p, neighbours=entry["neighbours"], num_tokens=k,
          max_tokens=entry["max_tokens"])
      # A kept token stands for its patch, the extra one for the patches pruned.
      pruned = tokens.shape[1] - p - (mask.sum(axis=1, keepdims=True) - 1)
      size = jnp.where(ids >= 0, 1.0, jnp.where(mask, pruned, 0.0)).astype(jnp.float32)
      prefix = {"ids": aux["ids"][:, :p], "size": aux["size"][:, :p]}
      aux = dict(aux, ids=jnp.concatenate([prefix["ids"], ids], axis=1),
                 size=jnp.concatenate([prefix["size"], size], axis=1), source=None,
                 scores=scores, mask=jnp.concatenate([jnp.ones((b, p), bool), mask], axis=1))
      return jnp.concatenate([tokens[:, :p], new], axis=1), aux, p
    patches = tokens[:, p:]
    grid = _side(patches.shape[1]) if method in ("resampler", "quecc") else None
    if method == "token_learner":
      compression.check_count(k, patches.shape[1], "token_learner")
      new = token_learner.TokenLearnerV11(k, entry["bottleneck_dim"], dtype=self.dtype,
                                          param_dtype=self.param_dtype,
                                          name="token_learner")(patches, deterministic=not train)
    elif method == "resampler":
      queries = entry["queries"] or k
      if not isinstance(queries, int) or queries < k:
        raise ConfigError(f"compressor 'resampler': queries={queries!r} must be an int of at "
                          f"least num_tokens={k} (the first num_tokens of them are used)")
      count = query_count if query_count is not None else (k if k < queries else None)
      new = learned.Resampler(queries, patches.shape[-1], entry["num_heads"], keys=entry["keys"],
                              dtype=self.dtype, param_dtype=self.param_dtype,
                              name="resampler")(patches, grid, num_tokens=count)
    else:  # quecc
      if text is None:
        raise InputError("compressor 'quecc' compresses with the question: pass text= (the "
                         "language model's last-layer state at the question's last token)")
      levels = entry["levels"] or [layer]
      blocks = [out["blocks"][f"block_{resolve_layer(lv, self.encoder.depth):02d}"][:, -patches.shape[1]:]
                for lv in levels]
      new = learned.QueCC(k, patches.shape[-1], entry["num_heads"], dtype=self.dtype,
                          param_dtype=self.param_dtype, name="quecc")(
                              patches, jnp.concatenate(blocks, axis=-1), text, grid)
    learned_ids = jnp.full((b, new.shape[1]), base.LEARNED_ID, jnp.int32)
    mask = None
    if method == "resampler" and query_count is not None:
      m = new.shape[1]
      mask = jnp.concatenate([jnp.ones((b, p), bool), jnp.broadcast_to(
          learned.query_mask(query_count, m), (b, m))], axis=1)
    aux = dict(aux, ids=jnp.concatenate([aux["ids"][:, :p], learned_ids], axis=1),
               size=jnp.concatenate([aux["size"][:, :p],
                                     jnp.full(learned_ids.shape, patches.shape[1] / new.shape[1])],
                                    axis=1),
               source=None, mask=mask)
    return jnp.concatenate([tokens[:, :p], new], axis=1), aux, p

  def _pool(self, entry, tokens, aux, keep_prefix, p):
    """M3's pooling after the projector, over the patches (a kept prefix stays in front)."""
    lead = p if keep_prefix else 0
    patches = tokens[:, lead:]
    side = _side(patches.shape[1])
    pooled = compression.pool(patches, entry["num_tokens"], side)
    s = compression.pool_stride(patches.shape[1], entry["num_tokens"], side)
    b, k = pooled.shape[:2]
    ids = aux["ids"][:, lead:].reshape(b, side[0] // s, s, side[1] // s, s)[:, :, 0, :, 0]
    aux = dict(aux, ids=jnp.concatenate([aux["ids"][:, :lead], ids.reshape(b, k)], axis=1),
               size=jnp.concatenate([aux["size"][:, :lead],
                                     jnp.full((b, k), float(s * s), jnp.float32)], axis=1),
               source=None, mask=None)
    return jnp.concatenate([tokens[:, :lead], pooled], axis=1), aux


def _side(n: int) -> Tuple[int, int]:
  side = int(round(n ** 0.5))
  if side * side != n:
    raise ConfigError(f"{n} patch tokens do not form a square grid; pool, resampler and quecc "
                      "need the patches of a square image, uncompressed before them")
  return side, side


def _next_block_qk(block, x, eps: float):
  """PruMerge's one-head query and key over the full width: the next block's q and k
  projections of its LayerNorm of x."""
  norm, qkv = block["norm1"], block["attn"]["qkv"]
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  var = ((xf - mean) ** 2).mean(-1, keepdims=True)
  y = (xf - mean) / jnp.sqrt(var + eps) * norm["scale"] + norm["bias"]
  kernel = qkv["kernel"].astype(jnp.float32)  # [C, 3, H, D]
  proj = jnp.einsum("bnc,cthd->btnhd", y, kernel, precision=jax.lax.Precision.HIGHEST)
  if "bias" in qkv:
    proj = proj + qkv["bias"].astype(jnp.float32)[:, None]
  b, _, n, h, d = proj.shape
  return proj[:, 0].reshape(b, n, h * d), proj[:, 1].reshape(b, n, h * d)
