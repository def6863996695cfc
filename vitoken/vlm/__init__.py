"""Compact visual tokens for a language model: `VisualTokenizer` turns any vitoken ViT into K
tokens (features of a chosen block, a compressor, an optional projector); the compressors
themselves are `vitoken.models.reducers.compression` (functions and encoder reducers) and
`vitoken.vlm.learned` (the learned resampler and QueCC)."""
from vitoken.vlm.learned import Projector, QueCC, Resampler  # noqa: F401
from vitoken.vlm.tokenizer import (  # noqa: F401
  IN_ENCODER,
  IN_TOKENIZER,
  METHODS,
  VisualTokenizer,
  parse_compressor,
  resolve_layer,
)
