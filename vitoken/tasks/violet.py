"""VIOLET-style masked visual-token modeling on clips (`config.task.name = "violet"`): BEiT's
task on video, with space-time block masks from the input pipeline.

    config.task = dict(name="violet", tokenizer="/runs/tokenizer", masking="block",
                       min_block_patches=16)

`config.model` is the video encoder (ViT fields with a (t, p, p) patch; `vitoken.models.violet`
gives it no class token and the fixed 1-D table, as VideoMAE's). `tokenizer` is the workdir of an
image tokenizer (`python -m vitoken.tokenizers`, k-means or FSQ) that codes single frames
(tubelet 1): its patch must be the model's spatial p x p, its channels the clips'. Each token
predicts the codes of its patch in each of its t frames; the loss is the cross-entropy over the
masked tokens and their frames.

The pipeline draws each clip's mask (batch field "patch_mask", float32 [B, L], 1 = masked, tokens
time-major) from the data position, so masks survive a resume exactly:
- `masking="block"` (default): BEiT's block-wise rules with cuboids over time
  (`block_masking.SpaceTimeBlockMasking`): up to round(mask_ratio * L) tokens (default BEiT's
  75/196 share), at least `min_block_patches` tokens a cuboid (at most `max_block_patches`),
  aspect ratios in [min_aspect, 1/min_aspect], `min_block_frames` to `max_block_frames` (default
  every) time slices a cuboid;
- `masking="violet"`: VIOLET's blockwise masking as its reference draws it (one random cuboid
  per time slice, no budget; `block_masking.VioletBlockMasking`).

Evaluation reports the masked cross-entropy (each clip's mean over its masked tokens' frames,
averaged over clips), the share of those codes predicted exactly, the masked share and the
usage of the codebook on the eval clips; every evaluation writes previews/reconstructions.png:
per clip three rows of frames (the original, the masked clip, and the tokenizer's decoding of the
predicted codes with the visible tokens' own codes). Fine-tune with
`configs/video.py:stage=finetune,init=<workdir>`.
"""
from typing import Optional

import jax
import jax.numpy as jnp

from vitoken import settings as settings_lib
from vitoken.errors import ConfigError
from vitoken.models import block_masking, masking as masking_lib, violet
from vitoken.models.patches import PatchGrid
from vitoken.tasks import base, runs
from vitoken.tasks.masked_modeling import CodePrediction
from vitoken.tasks.videomae import ClipPreview

MASKINGS = ("block", "violet")


def tokenizer_channels(tok, params) -> int:
  """The image channels a loaded tokenizer codes (k-means: from its centroids)."""
  if getattr(tok, "kind", None) == "kmeans":
    return int(params["centroids"].shape[-1]) // (tok.patch_size[0] * tok.patch_size[1])
  return int(tok.model.encoder_model().channels)


@base.register("violet")
class VIOLETTask(ClipPreview, CodePrediction):
  """VIOLET-style masked visual-token modeling (vitoken.models.violet) on clips."""
  takes_clips = True
  targets = violet

  def __init__(self, config, info, tokenizer=None, masking: str = "block",
               mask_ratio: Optional[float] = None, min_block_patches: int = 16,
               max_block_patches: Optional[int] = None, min_aspect: float = 0.3,
               min_block_frames: int = 1, max_block_frames: Optional[int] = None,
               preview_examples: int = 2):
    super().__init__(config, info, preview_examples)
    if len(info.image_shape) != 4:
      raise ConfigError(f"task violet pretrains on clips [T, H, W, C]; the data gives images of "
                        f"shape {tuple(info.image_shape)} (set config.data.name to a video dataset "
                        "such as 'moving_digits', or use task 'beit' on images)")
    spec = settings_lib.plain(tokenizer)
    self.tokenizer_path = spec.get("path") if isinstance(spec, dict) else spec
    if not self.tokenizer_path or not isinstance(self.tokenizer_path, str):
      raise ConfigError("task violet needs `tokenizer` (config.task.tokenizer): the workdir of an "
                        "image tokenizer with the model's spatial patch (`python -m "
                        "vitoken.tokenizers --config=configs/video.py:stage=tokenizer --workdir=DIR`)")
    if masking not in MASKINGS:
      raise ConfigError(f"task masking must be one of {MASKINGS}, got {masking!r}")
    if mask_ratio is not None:
      masking_lib.check_mask_ratio(mask_ratio, "task mask_ratio")
      if masking == "violet":
        raise ConfigError("task mask_ratio is the budget of masking='block'; VIOLET's masking "
                          "draws one cuboid per time slice with no budget")
    # The encoder's patch without building the model (its head needs the tokenizer).
    self.patch_size = tuple(violet.VIOLET(encoder=self.encoder_spec()).encoder_model().patch_size)
    self.grid = PatchGrid.of(tuple(info.image_shape[:3]), self.patch_size)
    if masking == "violet":
      self.masks = block_masking.VioletBlockMasking(self.grid)
    else:
      self.masks = block_masking.SpaceTimeBlockMasking(
          self.grid, block_masking.clip_budget(self.grid.grid, mask_ratio), min_block_patches,
          max_block_patches, min_aspect, min_block_frames, max_block_frames)
    self._tokenizer = None

  @property
  def tubelet(self) -> int:
    return self.patch_size[0]

  def tokenizer(self):
    """(tokenizer, params), loaded once; its patch and channels are checked against the clips'."""
    if self._tokenizer is None:
      frame_shape = tuple(self.info.image_shape[1:])
      tok, params = runs.load_tokenizer(self.tokenizer_path)
      spatial = self.patch_size[1:]
      if tuple(settings_lib.pair(tok.patch_size)) != spatial:
        tp = tuple(settings_lib.pair(tok.patch_size))
        raise ConfigError(
            f"task violet: the tokenizer at {self.tokenizer_path} (config.task.tokenizer) codes "
            f"{tp[0]}x{tp[1]} patches of a frame, but the video model's patch_size "
            f"{self.patch_size} (config.model) has {spatial[0]}x{spatial[1]} patches in a frame: "
            "train a tokenizer with the model's spatial patch size")
      channels = tokenizer_channels(tok, params)
      if channels != frame_shape[-1]:
        raise ConfigError(
            f"task violet: the tokenizer at {self.tokenizer_path} (config.task.tokenizer) codes "
            f"frames of {channels} channels, but the clips (config.data) have {frame_shape[-1]}: "
            "train a tokenizer on frames like the clips'")
      self._tokenizer = (tok, params)
    return self._tokenizer

  def pretraining_model(self):
    return violet.VIOLET(encoder=self.encoder_spec(), codebook_size=self.tokenizer()[0].codebook_size)

  def frame_codes(self, frozen, clips):
    """int32 [B, T, h*w]: the tokenizer's codes of every frame of `clips` [B, T, H, W, C]."""
    tok = self.tokenizer()[0]
    clips = jnp.asarray(clips, jnp.float32)
    b, t = clips.shape[:2]
    codes = tok.encode(frozen["tokenizer"], clips.reshape((b * t,) + clips.shape[2:]))
    return jax.lax.stop_gradient(codes.reshape(b, t, -1))

  def codes(self, frozen, clips):
    """int32 [B, L, t]: each token's codes in the t frames of its tubelet."""
    return violet.tubelet_codes(self.frame_codes(frozen, clips), self.tubelet)

  def init_params(self, rng, batch):
    mask = jnp.asarray(batch["patch_mask"])
    codes = jnp.zeros(mask.shape + (self.tubelet,), jnp.int32)
    return self.model.init(rng, batch["image"], codes, mask)["params"]

  # ---- previews ---------------------------------------------------------------------------
  def reconstruct(self, params, batch):
    """(the tokenizer's decoding of the predicted codes [B, T, H, W, C], the mask [B, L]):
    masked tokens take the model's codes, visible ones their own, frame by frame."""
    frozen = self.frozen_params()
    _, logits, mask, codes = self.forward(params, frozen, batch, None, train=False)
    predicted = jnp.where(mask[..., None] > 0, jnp.argmax(logits, axis=-1), codes)
    clips = jnp.asarray(batch["image"], jnp.float32)
    b, t = clips.shape[:2]
    per_frame = violet.frame_codes(predicted, self.grid.num_patches // self.grid.frames)
    frames = clips.reshape((b * t,) + clips.shape[2:])
    decoded = self.tokenizer()[0].decode(frozen["tokenizer"], per_frame.reshape(b * t, -1), frames)
    return decoded.reshape(clips.shape), mask

