"""Visual tokenizers as tasks, so each is configured, checkpointed and loaded like any run.

    config.task = dict(name="fsq_tokenizer", levels=(8, 8, 8), decoder_depth=2)   # trained
    config.task = dict(name="kmeans_tokenizer", codebook_size=512, patch_size=8)  # fitted

`config.model` is the FSQ encoder's ViT fields; k-means has no model beyond its settings.
Both evaluate their codebook usage (share of codes used, perplexity) on the eval split. Both
run through the trainer: FSQ by gradient, k-means by its own update (mini-batch k-means needs
no gradients, so its state has no optimizer state). `python -m vitoken.tokenizers` runs either.
"""
from typing import Dict

import jax
import jax.numpy as jnp

from vitoken import settings as settings_lib
from vitoken.errors import ConfigError
from vitoken.models.tokenizers import common, fsq, kmeans
from vitoken.tasks import base


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

  uses_optimizer = False

  def describe_model(self) -> str:
    tok = self._tokenizer
    return (f"k-means tokenizer, {tok.codebook_size} codes over "
            f"{'x'.join(map(str, tok.patch_size))} patches")

  def phase_starts(self):
    return ()

  def init_params(self, rng, batch):
    # Placeholders of the right shapes: the centroids start from k-means++ on the first
    # training batch, in `update` at step 0.
    tok, channels = self._tokenizer, batch["image"].shape[-1]
    return {"centroids": jnp.zeros((tok.codebook_size, tok.patch_dim(channels)), jnp.float32),
            "counts": jnp.zeros((tok.codebook_size,), jnp.float32)}

  def update(self, state, batch, frozen, rng, progress, gradient_step):
    """One mini-batch k-means step; at step 0 the centroids first start from k-means++ on
    that batch (seeded by `config.seed`)."""
    if jax.process_count() > 1:
      raise ConfigError("k-means fitting runs in one process (its updates are not reduced "
                        "across hosts); fit it on one host and share the workdir")
    tok, images = self._tokenizer, batch["image"]
    params = jax.lax.cond(state["step"] == 0,
                          lambda: tok.init(jax.random.key(self.config.seed), images),
                          lambda: state["params"])
    params, inertia = tok.update(params, images)
    return dict(state, step=state["step"] + 1, params=params), {"loss": inertia}

  def eval_error(self, params, images):
    tok = self._tokenizer
    points = tok.patches(images)
    codes = kmeans.assign(points, params["centroids"])
    nearest = params["centroids"][codes]
    return jnp.mean(jnp.sum(jnp.square(points - nearest), axis=-1), axis=1), codes
