"""Label-free pretraining by masked modeling: MAE, SimMIM and BEiT, chosen by `config.task.name`.

    config.task = dict(name="mae", mask_ratio=0.75, norm_pix_loss=True, decoder_width=512,
                       decoder_depth=8, decoder_heads=16)
    config.task = dict(name="simmim", mask_patch_size=32, mask_ratio=0.6)
    config.task = dict(name="beit", tokenizer="/runs/tokenizer", min_block_patches=16)

`config.model` is the encoder (ViT fields); it ends at its LayerNorm, with no pooling or head.
The masks' randomness is uniform noise that the input pipeline draws for every example (one
value per patch for MAE, per mask cell for SimMIM), seeded by the data position, so masks
survive a resume exactly and the model's shapes are static. Evaluation reports the same loss
on the eval split, and every evaluation writes a reconstruction grid (original, masked,
reconstruction, reconstruction with the visible patches pasted back) to `<workdir>/previews/`. Fine-tune the encoder from the run's workdir with
`config.init_from = dict(path=workdir, subtree="encoder", exclude="^(head|fc_norm)/")`.
"""
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vitoken import paths, settings as settings_lib, visualize
from vitoken.errors import ConfigError
from vitoken.models import beit, block_masking, mae, masking, simmim
from vitoken.models.tokenizers import common as tokenizer_common
from vitoken.tasks import base, runs


class UniformNoise:
  """Batch field "noise": float32 [B, length] uniform in [0, 1), from the pipeline's generator."""

  def __init__(self, length: int):
    self.length = length

  def __call__(self, batch, rng: np.random.Generator):
    batch = dict(batch)
    batch["noise"] = rng.random((batch["image"].shape[0], self.length), dtype=np.float32)
    return batch


class MaskedImageModeling(base.Task):
  """What MAE and SimMIM share: noise from the pipeline, loss metrics, reconstruction grids."""
  uses_labels = False
  headline = "loss"
  backbone_scope = "encoder"

  takes_clips: bool = False  # True for video pretraining (VideoMAE); images otherwise

  def __init__(self, config, info, preview_examples: int = 8):
    super().__init__(config, info)
    if len(info.image_shape) == 4 and not self.takes_clips:
      raise ConfigError(f"task {self.task_name!r} pretrains on images; the data gives clips of "
                        f"shape {tuple(info.image_shape)} (for video use task 'videomae', or an "
                        "image dataset)")
    if not isinstance(preview_examples, int) or preview_examples < 0:
      raise ConfigError(f"task preview_examples must be an int >= 0, got {preview_examples!r}")
    self.preview_examples = preview_examples

  def pretraining_model(self):
    raise NotImplementedError

  def encoder_spec(self):
    """The encoder's ViT fields: `config.model`, channels defaulting to the data's."""
    fields = settings_lib.as_dict(self.config.model, "model config")
    fields.setdefault("channels", self.info.image_shape[-1])
    return fields

  def noise_length(self) -> int:
    raise NotImplementedError

  def per_example(self, images, pred, mask):
    """([B] loss numerators, [B] denominators) whose batch ratio is the method's loss."""
    raise NotImplementedError

  def models(self):
    if self._models is None:
      model = self.pretraining_model()
      self._models = (model, model)
    return self._models

  def encoder(self):
    return self.model.encoder_model()

  def backbone(self):
    return self.encoder()

  def depth(self) -> Optional[int]:
    return None  # the encoder's blocks sit under "encoder/": no layer-wise lr decay here

  def layer_decay_groups(self) -> Dict[str, str]:
    return {}

  def sharding_rules(self):
    return self.encoder().sharding_rules()

  def batch_fields(self):
    return UniformNoise(self.noise_length())

  def init_params(self, rng, batch):
    params_rng, masking_rng = jax.random.split(rng)
    return self.model.init({"params": params_rng, "masking": masking_rng}, batch["image"],
                           noise=batch["noise"])["params"]

  def apply(self, params, batch, rng, *, train: bool, step=None, progress=None, model=None):
    rngs = {"dropout": rng} if train else {}
    return self.model.apply({"params": params}, batch["image"], noise=batch["noise"],
                            train=train, rngs=rngs)

  def loss(self, params, frozen, batch, rng, step, progress):
    loss, _, mask = self.apply(params, batch, rng, train=True)
    return loss, {"loss": loss, "masked_share": mask.mean()}

  def eval_sums(self, params, frozen, batch, rng):
    _, pred, mask = self.apply(params, batch, rng, train=False)
    numerator, denominator = self.per_example(batch["image"], pred, mask)
    per_example = numerator / denominator
    weight = batch["mask"].astype(jnp.float32)
    return {"loss_sum": jnp.sum(per_example * weight), "count": jnp.sum(weight)}

  # ---- reconstruction grids ---------------------------------------------------------------
  @property
  def previews(self) -> bool:
    return self.preview_examples > 0

  def preview(self, params, batch) -> Dict[str, jax.Array]:
    """Arrays for a picture of the first examples: original, masked and reconstructed images."""
    k = min(self.preview_examples, batch["image"].shape[0])
    batch = {key: v[:k] for key, v in batch.items()}
    images = batch["image"].astype(jnp.float32)
    reconstruction, mask = self.reconstruct(params, batch)
    patch = tuple(self.encoder().patch_size)
    grid = masking.patch_grid(images.shape[1:3], patch)
    pixel_mask = masking.unpatchify(
        jnp.repeat(mask[..., None], patch[0] * patch[1] * images.shape[-1], axis=-1), patch, grid,
        images.shape[-1])
    return {"original": images, "masked": images * (1 - pixel_mask), "pixel_mask": pixel_mask,
            "reconstruction": reconstruction}

  def reconstruct(self, params, batch):
    """(the model's picture of the batch [B, H, W, C], its patch mask [B, L])."""
    _, pred, mask = self.apply(params, batch, None, train=False)
    images = batch["image"].astype(jnp.float32)
    patch = tuple(self.encoder().patch_size)
    grid = masking.patch_grid(images.shape[1:3], patch)
    return masking.unpatchify(self.to_pixels(images, pred, patch), patch, grid, images.shape[-1]), mask

  def to_pixels(self, images, pred, patch):
    return pred

  def write_preview(self, arrays, directory, step: int):
    """Writes the grid as previews/reconstructions_<step>.png and previews/reconstructions.png."""
    picture = visualize.reconstruction_grid(arrays["original"], arrays["masked"],
                                            arrays["reconstruction"], arrays["pixel_mask"])
    folder = paths.resolve(directory) / "previews"
    folder.mkdir(parents=True, exist_ok=True)
    data = visualize.png_bytes(picture, scale=max(1, 128 // arrays["original"].shape[1]))
    for name in (f"reconstructions_{step:06d}.png", "reconstructions.png"):
      (folder / name).write_bytes(data)


@base.register("mae")
class MAETask(MaskedImageModeling):
  """MAE pretraining (vitoken.models.mae)."""

  def __init__(self, config, info, mask_ratio: float = 0.75, norm_pix_loss: bool = False,
               decoder_width: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
               decoder_mlp_dim: Optional[int] = None, preview_examples: int = 8):
    super().__init__(config, info, preview_examples)
    masking.check_mask_ratio(mask_ratio, "task mask_ratio")
    mae.check_decoder(decoder_width, decoder_depth, decoder_heads)
    if not isinstance(norm_pix_loss, bool):
      raise ConfigError(f"task norm_pix_loss must be a bool, got {norm_pix_loss!r}")
    self.settings = dict(mask_ratio=float(mask_ratio), norm_pix_loss=norm_pix_loss,
                         decoder_width=decoder_width, decoder_depth=decoder_depth,
                         decoder_heads=decoder_heads, decoder_mlp_dim=decoder_mlp_dim)

  def pretraining_model(self):
    return mae.MaskedAutoencoder(encoder=self.encoder_spec(), **self.settings)

  def noise_length(self) -> int:
    gh, gw = masking.patch_grid(self.info.image_shape[:2], self.encoder().patch_size)
    return gh * gw

  def per_example(self, images, pred, mask):
    return mae.per_example_loss(images, pred, mask, tuple(self.encoder().patch_size),
                                self.settings["norm_pix_loss"])

  def to_pixels(self, images, pred, patch):
    if not self.settings["norm_pix_loss"]:
      return pred
    # The model predicts per-patch normalised pixels: show them at each patch's own mean and
    # spread, as MAE's visualisation does.
    mean, std = mae.patch_stats(masking.patchify(images, patch))
    return pred * std + mean


@base.register("simmim")
class SimMIMTask(MaskedImageModeling):
  """SimMIM pretraining (vitoken.models.simmim)."""

  def __init__(self, config, info, mask_patch_size: int = 32, mask_ratio: float = 0.6,
               preview_examples: int = 8):
    super().__init__(config, info, preview_examples)
    masking.check_mask_ratio(mask_ratio, "task mask_ratio")
    self.settings = dict(mask_patch_size=mask_patch_size, mask_ratio=float(mask_ratio))
    self.model.grids(self.info.image_shape[:2])  # checks the mask patch against image and patch

  def pretraining_model(self):
    return simmim.SimMIM(encoder=self.encoder_spec(), **self.settings)

  def noise_length(self) -> int:
    (gh, gw), _ = self.model.grids(self.info.image_shape[:2])
    return gh * gw

  def per_example(self, images, pred, mask):
    total, pixels = simmim.per_example_loss(images, pred, mask, tuple(self.encoder().patch_size))
    return total, (pixels + 1e-5) * images.shape[-1]


class BlockMasks:
  """Batch field "patch_mask": float32 [B, L], BEiT's block-wise masks drawn on the host."""

  def __init__(self, generator: block_masking.BlockMasking):
    self.generator = generator

  def __call__(self, batch, rng: np.random.Generator):
    batch = dict(batch)
    batch["patch_mask"] = self.generator.batch(batch["image"].shape[0], rng)
    return batch


class CodePrediction(MaskedImageModeling):
  """A task that predicts a frozen tokenizer's codes of masked patches (BEiT; VIOLET on
  clips): block masks from the pipeline (`self.masks`), the tokenizer's params frozen, the
  loss and code accuracy from `targets` (a module with `per_example_loss` and
  `code_accuracy` over logits, codes and the mask). Subclasses give `tokenizer()` and
  `codes(frozen, images)`."""
  targets = beit

  def batch_fields(self):
    return BlockMasks(self.masks)

  def frozen_params(self):
    return {"tokenizer": self.tokenizer()[1]}

  def forward(self, params, frozen, batch, rng, *, train: bool):
    """(loss, logits, mask, codes) of the batch."""
    codes = self.codes(frozen, batch["image"])
    rngs = {"dropout": rng} if train else {}
    loss, logits, mask = self.model.apply({"params": params}, batch["image"], codes,
                                          batch["patch_mask"], train=train, rngs=rngs)
    return loss, logits, mask, codes

  def loss(self, params, frozen, batch, rng, step, progress):
    loss, logits, mask, codes = self.forward(params, frozen, batch, rng, train=True)
    correct, count = self.targets.code_accuracy(logits, codes, mask)
    return loss, {"loss": loss, "masked_share": mask.mean(),
                  "code_accuracy": correct.sum() / jnp.maximum(count.sum(), 1.0)}

  def eval_sums(self, params, frozen, batch, rng):
    _, logits, mask, codes = self.forward(params, frozen, batch, rng, train=False)
    total, count = self.targets.per_example_loss(logits, codes, mask)
    correct, _ = self.targets.code_accuracy(logits, codes, mask)
    weight = batch["mask"].astype(jnp.float32)
    count = jnp.maximum(count, 1.0)
    return {"loss_sum": jnp.sum(total / count * weight),
            "code_accuracy_sum": jnp.sum(correct / count * weight),
            "masked_share_sum": jnp.sum(mask.mean(axis=1) * weight), "count": jnp.sum(weight),
            "code_counts": tokenizer_common.code_counts(codes.reshape(codes.shape[0], -1), weight,
                                                        logits.shape[-1])}

  def eval_summary(self, totals):
    return tokenizer_common.summary_with_usage(totals, super().eval_summary, prefix="target_")


@base.register("beit")
class BEiTTask(CodePrediction):
  """BEiT-style pretraining (vitoken.models.beit) against a frozen visual tokenizer's codes.

  `tokenizer` is the workdir of `python -m vitoken.tokenizers` (k-means or FSQ); its patch
  size must be the encoder's. Masks: `mask_patches` (default BEiT's 75 of 196 scaled to the
  grid), at least `min_block_patches` a block, aspect ratios in [min_aspect, 1/min_aspect].
  Evaluation reports the masked cross-entropy (each example's mean over its masked patches,
  averaged over examples, as MAE's and SimMIM's eval losses; training averages over every
  masked patch of the batch, as BEiT), the share of masked codes predicted exactly,
  and the usage of the tokenizer's codebook on the eval images. The previews decode the
  predicted codes with the tokenizer."""

  def __init__(self, config, info, tokenizer=None, mask_patches=None, min_block_patches: int = 16,
               max_block_patches=None, min_aspect: float = 0.3, preview_examples: int = 8):
    super().__init__(config, info, preview_examples)
    spec = settings_lib.plain(tokenizer)
    self.tokenizer_path = spec.get("path") if isinstance(spec, dict) else spec
    if not self.tokenizer_path or not isinstance(self.tokenizer_path, str):
      raise ConfigError("task beit needs `tokenizer` (config.task.tokenizer): the workdir of a "
                        "visual tokenizer (`python -m vitoken.tokenizers "
                        "--config=configs/visual_tokenizer.py --workdir=DIR`)")
    # The encoder's patch size without building the model (its head needs the tokenizer).
    self.patch_size = tuple(mae.pretraining_encoder(
        beit.BEiT(encoder=self.encoder_spec()).encoder_config(), {"method": "mask_token"}).patch_size)
    grid = masking.patch_grid(info.image_shape[:2], self.patch_size)
    self.masks = block_masking.BlockMasking(grid, mask_patches, min_block_patches,
                                            max_block_patches, min_aspect)
    self._tokenizer = None

  def tokenizer(self):
    """(tokenizer, params), loaded once; its patch size is checked against the encoder's."""
    if self._tokenizer is None:
      tok, params = runs.load_tokenizer(self.tokenizer_path, self.info)
      tokenizer_common.check_patch(tok.patch_size, self.patch_size, self.tokenizer_path)
      self._tokenizer = (tok, params)
    return self._tokenizer

  def pretraining_model(self):
    return beit.BEiT(encoder=self.encoder_spec(), codebook_size=self.tokenizer()[0].codebook_size)

  def codes(self, frozen, images):
    tok = self.tokenizer()[0]
    return jax.lax.stop_gradient(tok.encode(frozen["tokenizer"], jnp.asarray(images, jnp.float32)))

  def init_params(self, rng, batch):
    mask = jnp.asarray(batch["patch_mask"])
    return self.model.init(rng, batch["image"], jnp.zeros(mask.shape, jnp.int32), mask)["params"]

  def reconstruct(self, params, batch):
    # The tokenizer's decoding of the codes the model predicts (visible patches keep their own).
    frozen = self.frozen_params()
    _, logits, mask, codes = self.forward(params, frozen, batch, None, train=False)
    predicted = jnp.where(mask > 0, jnp.argmax(logits, axis=-1), codes)
    images = jnp.asarray(batch["image"], jnp.float32)
    return self.tokenizer()[0].decode(frozen["tokenizer"], predicted, images), mask
