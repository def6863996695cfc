"""Visual tokenizers: one discrete code per image patch, the targets of BEiT-style pretraining.

    python -m vitoken.tokenizers --config=configs/visual_tokenizer.py:kind=kmeans --workdir=/tmp/km
    tokenizer, params = vitoken.tokenizers.load("/tmp/km")
    codes = tokenizer.encode(params, images)        # int32 [B, (H / p) * (W / p)]

Kinds (`config.task.name`): `kmeans_tokenizer` (mini-batch k-means over normalised patches)
and `fsq_tokenizer` (a small FSQ autoencoder). Both are saved as orbax checkpoints with their
config, like any run, and report codebook usage and perplexity on the eval split.
"""
from vitoken.models.tokenizers.common import check_codebook_size, check_patch, usage  # noqa: F401
from vitoken.tokenizers.fitting import fit, load  # noqa: F401
