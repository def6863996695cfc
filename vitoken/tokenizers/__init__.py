"""Visual tokenizers: one discrete code per image patch, the targets of BEiT-style pretraining.

    python -m vitoken.tokenizers --config=configs/visual_tokenizer.py:kind=kmeans --workdir=/tmp/km
    tokenizer, params = vitoken.tokenizers.load("/tmp/km")
    codes = tokenizer.encode(params, images)        # int32 [B, (H / p) * (W / p)]

Kinds (`config.task.name`): `kmeans_tokenizer` (mini-batch k-means over normalised patches)
and `fsq_tokenizer` (a small FSQ autoencoder). Both run through the trainer (k-means with its
task's non-gradient update), are saved as orbax checkpoints with their config, like any run,
and report codebook usage and perplexity on the eval split. The models themselves live in
`vitoken.models.tokenizers`.
"""
from typing import Any, Dict

from vitoken.models.tokenizers.common import check_codebook_size, check_patch, usage  # noqa: F401
from vitoken.tasks.runs import TOKENIZER_TASKS, load_tokenizer as load  # noqa: F401
from vitoken.train import trainer


def fit(config, workdir: str) -> Dict[str, Any]:
  """Fits (k-means) or trains (FSQ) the tokenizer `config.task` describes; its summary."""
  name = (config.get("task") or {}).get("name")
  if name not in TOKENIZER_TASKS:
    raise ValueError(f"config.task.name {name!r} is not a tokenizer; tokenizers: {TOKENIZER_TASKS}")
  return trainer.run(config, workdir)
