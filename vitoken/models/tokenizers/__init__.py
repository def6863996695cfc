"""Visual tokenizer models: one discrete code per image patch (k-means, FSQ).

Fitting and loading them is on the training side (`vitoken.tokenizers.fit` / `.load`).
"""
from vitoken.models.tokenizers.common import check_codebook_size, check_patch, usage  # noqa: F401
