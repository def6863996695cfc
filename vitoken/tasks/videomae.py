"""VideoMAE pretraining on clips (`config.task.name = "videomae"`), with masks from the input
pipeline.

    config.task = dict(name="videomae", mask_ratio=0.9, masking="tube", decoder_width=384,
                       decoder_depth=4, decoder_heads=6)

`config.model` is the video encoder (ViT fields with a (t, p, p) patch, e.g. variant
"B/16x2"); `vitoken.models.videomae.encoder_fields` drops its class token and pooling and gives
it VideoMAE's fixed 1-D table. The pipeline draws every clip's mask (batch field "tube_mask",
float32 [B, L], 1 = masked) from the data position, so masks survive a resume exactly:

- `masking="tube"` (VideoMAE): the int(ratio * h * w) spatial positions of highest noise,
  masked in every time slice (`masking.tube_mask`);
- `masking="frame"` (the paper's frame-independent baseline): the same count drawn anew in each
  time slice, so a position hidden in one slice can be seen in the next.

The targets are built from pixel values: the clips are un-normalised with `config.data`'s mean
and std first, as the reference's. Evaluation reports the loss (each clip's mean over its
masked tubelets, averaged over clips) and writes a reconstruction picture per evaluation:
for each clip, rows of frames (original, masked, reconstruction with the visible tubelets
pasted back). Fine-tune from the workdir with `configs/video.py:stage=finetune,init=<workdir>`.
"""
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from vitoken import paths, visualize
from vitoken.data.config import Settings
from vitoken.errors import ConfigError
from vitoken.models import mae, masking as masking_lib, videomae
from vitoken.tasks import base
from vitoken.tasks.masked_modeling import MaskedImageModeling

MASKINGS = ("tube", "frame")


class ClipMasks:
  """Batch field "tube_mask": float32 [B, frames * positions], `count` masked positions per
  time slice: the same ones in every slice (`tube`) or drawn per slice (`frame`)."""

  def __init__(self, frames: int, positions: int, count: int, tube: bool):
    self.frames, self.positions, self.count, self.tube = frames, positions, count, tube

  def __call__(self, batch, rng: np.random.Generator):
    batch = dict(batch)
    b = batch["image"].shape[0]
    slices = 1 if self.tube else self.frames
    noise = rng.random((b, slices, self.positions), dtype=np.float32)
    # The `count` highest-noise positions of each slice, as masking.tube_mask ranks them.
    ranks = np.argsort(np.argsort(-noise, axis=-1, kind="stable"), axis=-1, kind="stable")
    mask = (ranks < self.count).astype(np.float32)
    if self.tube:
      mask = np.repeat(mask, self.frames, axis=1)
    batch["tube_mask"] = mask.reshape(b, self.frames * self.positions)
    return batch


class ClipPreview:
  """Previews of a clip task: `preview` cuts the batch to `preview_examples` clips and asks
  the task's `reconstruct(params, batch)` -> (clips [B, T, H, W, C], token mask [B, L]);
  `write_preview` draws per clip three rows of frames (original, masked, reconstruction)."""

  def preview(self, params, batch):
    k = min(self.preview_examples, batch["image"].shape[0])
    batch = {key: v[:k] for key, v in batch.items()}
    clips = batch["image"].astype(jnp.float32)
    reconstruction, mask = self.reconstruct(params, batch)
    c = clips.shape[-1]
    pixel_mask = self.grid.unpatchify(
        jnp.repeat(mask[..., None], self.grid.patch_dim(c), axis=-1), c)
    return {"original": clips, "masked": clips * (1 - pixel_mask), "pixel_mask": pixel_mask,
            "reconstruction": reconstruction}

  def write_preview(self, arrays, directory, step: int):
    """previews/reconstructions_<step>.png and previews/reconstructions.png."""
    picture = visualize.clip_reconstruction_grid(arrays["original"], arrays["pixel_mask"],
                                                 arrays["reconstruction"])
    folder = paths.resolve(directory) / "previews"
    folder.mkdir(parents=True, exist_ok=True)
    data = visualize.png_bytes(picture, scale=max(1, 128 // arrays["original"].shape[2]))
    for name in (f"reconstructions_{step:06d}.png", "reconstructions.png"):
      (folder / name).write_bytes(data)


@base.register("videomae")
class VideoMAETask(ClipPreview, MaskedImageModeling):
  """VideoMAE pretraining (vitoken.models.videomae) with tube or frame masks from the pipeline."""
  takes_clips = True

  def __init__(self, config, info, mask_ratio: float = 0.9, masking: str = "tube",
               norm_target: bool = True, decoder_width: int = 384, decoder_depth: int = 4,
               decoder_heads: int = 6, decoder_mlp_dim: Optional[int] = None,
               preview_examples: int = 2):
    super().__init__(config, info, preview_examples)
    if len(info.image_shape) != 4:
      raise ConfigError(f"task videomae pretrains on clips [T, H, W, C]; the data gives images of "
                        f"shape {tuple(info.image_shape)} (set config.data.name to a video dataset "
                        "such as 'moving_digits')")
    masking_lib.check_mask_ratio(mask_ratio, "task mask_ratio")
    if masking not in MASKINGS:
      raise ConfigError(f"task masking must be one of {MASKINGS}, got {masking!r}")
    mae.check_decoder(decoder_width, decoder_depth, decoder_heads)
    if not isinstance(norm_target, bool):
      raise ConfigError(f"task norm_target must be a bool, got {norm_target!r}")
    data = Settings.parse(config.get("data") if hasattr(config, "get") else None)
    self.settings = dict(mask_ratio=float(mask_ratio), norm_target=norm_target,
                         decoder_width=decoder_width, decoder_depth=decoder_depth,
                         decoder_heads=decoder_heads, decoder_mlp_dim=decoder_mlp_dim,
                         input_mean=data.mean, input_std=data.std)
    self.masking = masking
    self.grid = self.encoder().patch_grid(tuple(info.image_shape[:-1]))
    self.positions = self.grid.num_patches // self.grid.frames
    self.count = masking_lib.tube_mask_count(self.positions, mask_ratio)

  def pretraining_model(self):
    return videomae.VideoMAE(encoder=self.encoder_spec(), **self.settings)

  def batch_fields(self):
    return ClipMasks(self.grid.frames, self.positions, self.count, self.masking == "tube")

  def init_params(self, rng, batch):
    params_rng, masking_rng = jax.random.split(rng)
    return self.model.init({"params": params_rng, "masking": masking_rng}, batch["image"],
                           mask=batch["tube_mask"])["params"]

  def apply(self, params, batch, rng, *, train: bool, step=None, progress=None, model=None):
    rngs = {"dropout": rng} if train else {}
    return self.model.apply({"params": params}, batch["image"], mask=batch["tube_mask"],
                            train=train, rngs=rngs)

  def per_example(self, images, pred, mask):
    target = videomae.targets(images, tuple(self.encoder().patch_size),
                              self.settings["norm_target"], input_mean=self.settings["input_mean"],
                              input_std=self.settings["input_std"])
    picked = videomae.masked_targets(target, mask, pred.shape[1])
    error = jnp.sum((pred.astype(jnp.float32) - picked) ** 2, axis=(1, 2))
    return error, jnp.full(error.shape, float(pred.shape[1] * pred.shape[2]))

  # ---- reconstruction pictures ------------------------------------------------------------
  def reconstruct(self, params, batch):
    """(the model's clips [B, T, H, W, C] in the input's scale, the tube mask [B, L])."""
    _, pred, mask = self.apply(params, batch, None, train=False)
    images = batch["image"].astype(jnp.float32)
    patch = tuple(self.encoder().patch_size)
    pixels = videomae.unnormalise(images, self.settings["input_mean"], self.settings["input_std"])
    tubes = masking_lib.patchify(pixels, patch)
    if self.settings["norm_target"]:
      # Predictions are per-tubelet normalised pixels: shown at each tubelet's own mean and
      # spread, per channel.
      b, n, _ = tubes.shape
      c = images.shape[-1]
      mean, scale = videomae.tube_stats(tubes, c)
      shown = (self._scatter_masked(tubes, pred, mask).reshape(b, n, -1, c) * scale
               + mean).reshape(b, n, -1)
      # Only the masked rows held normalised predictions; the visible ones stay pixels.
      tubes = jnp.where(mask[..., None] > 0, shown, tubes)
    else:
      tubes = self._scatter_masked(tubes, pred, mask)
    clips = self.grid.unpatchify(tubes, images.shape[-1])
    mean = jnp.asarray(self.settings["input_mean"], jnp.float32)
    std = jnp.asarray(self.settings["input_std"], jnp.float32)
    return (clips - mean) / std, mask

  @staticmethod
  def _scatter_masked(tubes, pred, mask):
    """`tubes` [B, L, D] with the masked ones replaced by `pred` [B, M, D] (ascending order)."""
    order = jnp.argsort(1 - mask, axis=1, stable=True)[:, :pred.shape[1]]
    rows = jnp.arange(tubes.shape[0])[:, None]
    return tubes.at[rows, order].set(pred.astype(tubes.dtype))
