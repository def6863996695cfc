"""Visual tokenizers as tasks, so each is configured, checkpointed and loaded like any run.

    config.task = dict(name="fsq_tokenizer", levels=(8, 8, 8), decoder_depth=2)   # trained
    config.task = dict(name="kmeans_tokenizer", codebook_size=512, patch_size=8)  # fitted

`config.model` is the FSQ encoder's ViT fields; k-means has no model beyond its settings.
Both evaluate their codebook usage (share of codes used, perplexity) on the eval split. FSQ
trains with the ordinary trainer; k-means is fitted by `vitoken.tokenizers.fit` (mini-batch
k-means needs no gradients). `python -m vitoken.tokenizers` runs either.
"""
from typing import Dict

import jax.numpy as jnp

from vitoken import settings as settings_lib
from vitoken.tasks import base
from vitoken.models.tokenizers import common, fsq, kmeans


class TokenizerTask(base.Task):
  """What the tokenizers share: no labels, codebook usage in the eval metrics."""
  uses_labels = False
  headline = "perplexity"

  def tokenizer(self):
    raise NotImplementedError

  def depth(self):
    return None

  def layer_decay_groups(self) -> Dict[str, str]:
    return {}

  def eval_error(self, params, images):
    """Per-example error [B] of the tokenizer on `images`, and their codes [B, L]."""
    raise NotImplementedError

  def eval_sums(self, params, frozen, batch, rng):
    error, codes = self.eval_error(params, batch["image"])
    weight = batch["mask"].astype(jnp.float32)
    return {"loss_sum": jnp.sum(error * weight), "count": jnp.sum(weight),
            "code_counts": common.code_counts(codes, weight, self.tokenizer().codebook_size)}

  def eval_summary(self, totals):
    return common.summary_with_usage(totals, super().eval_summary)


@base.register("fsq_tokenizer")
class FSQTokenizerTask(TokenizerTask):
  """Trains an FSQ autoencoder (vitoken.models.tokenizers.fsq) on reconstruction error."""
  backbone_scope = "encoder"

  def __init__(self, config, info, levels=(8, 8, 8), decoder_depth: int = 2, decoder_heads=None):
    super().__init__(config, info)
    self.settings = dict(levels=fsq.check_levels(levels), decoder_depth=decoder_depth,
                         decoder_heads=decoder_heads)
    fields = settings_lib.as_dict(config.model, "model config")
    fields.setdefault("channels", info.image_shape[-1])
    self.fields = fields

  def models(self):
    if self._models is None:
      model = fsq.FSQAutoencoder(encoder=self.fields, **self.settings)
      self._models = (model, model)
    return self._models

  def tokenizer(self):
    return fsq.FSQTokenizer(self.model)

  def backbone(self):
    return self.model.encoder_model()

  def sharding_rules(self):
    return self.backbone().sharding_rules()

  def init_params(self, rng, batch):
    return self.model.init(rng, batch["image"])["params"]

  def loss(self, params, frozen, batch, rng, step, progress):
    error, _ = self.tokenizer().reconstruction_error(params, batch["image"], rng)
    loss = error.mean()
    return loss, {"loss": loss}

  def eval_error(self, params, images):
    return self.tokenizer().reconstruction_error(params, images)


@base.register("kmeans_tokenizer")
class KMeansTokenizerTask(TokenizerTask):
  """Mini-batch k-means over normalised patches (vitoken.models.tokenizers.kmeans); its eval error
  is the mean squared distance of a patch to its centroid."""

  def __init__(self, config, info, codebook_size: int = 512, patch_size=8, eps: float = 0.1):
    super().__init__(config, info)
    self._tokenizer = kmeans.KMeansTokenizer(tuple(settings_lib.pair(patch_size)),
                                             common.check_codebook_size(codebook_size), eps)

  def tokenizer(self):
    return self._tokenizer

  def models(self):
    raise ValueError("a k-means tokenizer has no model to train by gradient: fit it with "
                     "`python -m vitoken.tokenizers --config=... --workdir=...`")

  def init_params(self, rng, batch):
    return self._tokenizer.init(rng, jnp.asarray(batch["image"]))

  def loss(self, params, frozen, batch, rng, step, progress):
    raise ValueError("k-means is fitted by `python -m vitoken.tokenizers`, not by the trainer")

  def eval_error(self, params, images):
    tok = self._tokenizer
    points = tok.patches(images)
    codes = kmeans.assign(points, params["centroids"])
    nearest = params["centroids"][codes]
    return jnp.mean(jnp.sum(jnp.square(points - nearest), axis=-1), axis=1), codes
