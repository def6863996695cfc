"""MAE and SimMIM against independent references written here (numpy / torch), following
facebookresearch/mae `models_mae.py` + `util/pos_embed.py` and microsoft/SimMIM
(`data/data_simmim.py` MaskGenerator, `models/simmim.py` forward): patchify, random masking,
losses, MAE's sin-cos table, a whole torch MAE (timm blocks) converted with `from_mae`, the
masked encoder against a key-masked full forward, SimMIM masks and loss, and input errors.

No expected value here is computed by vitoken itself.
"""
from functools import partial
import math

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import torch
from torch import nn
import torch.nn.functional as F

from vitoken.convert import from_mae, mae as convert_mae
from vitoken.convert.torch_reference import import_timm
from vitoken.models import mae, masking, posemb, simmim, vit

timm = import_timm()
from timm.layers import PatchEmbed  # noqa: E402  (after import_timm's torchvision shim)
from timm.models.vision_transformer import Block  # noqa: E402


# ------------------------------ references (facebookresearch/mae) ------------------------------
def ref_patchify(imgs, p):
  """models_mae.patchify on NCHW, generalised to h != w as the same einsum."""
  n, c, hh, ww = imgs.shape
  h, w = hh // p, ww // p
  x = imgs.reshape(n, c, h, p, w, p)
  x = torch.einsum("nchpwq->nhwpqc", x)
  return x.reshape(n, h * w, p * p * c)


def ref_unpatchify(x, p, h, w, c):
  """models_mae.unpatchify (NCHW out), generalised to h != w."""
  n = x.shape[0]
  x = x.reshape(n, h, w, p, p, c)
  x = torch.einsum("nhwpqc->nchpwq", x)
  return x.reshape(n, c, h * p, w * p)


def ref_random_masking(x, mask_ratio, noise):
  """models_mae.random_masking with the noise passed in."""
  n, length, d = x.shape
  len_keep = int(length * (1 - mask_ratio))
  ids_shuffle = torch.argsort(noise, dim=1)
  ids_restore = torch.argsort(ids_shuffle, dim=1)
  ids_keep = ids_shuffle[:, :len_keep]
  x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
  mask = torch.ones([n, length])
  mask[:, :len_keep] = 0
  mask = torch.gather(mask, dim=1, index=ids_restore)
  return x_masked, mask, ids_restore


def np_patchify_nhwc(images, p):
  b, hh, ww, c = images.shape
  x = images.reshape(b, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (hh // p) * (ww // p), p * p * c)


def ref_mae_loss(images_nhwc, pred, mask, p, norm_pix_loss, ddof=1, only_masked=True):
  """models_mae.forward_loss in float64 numpy; `ddof`/`only_masked` plant bugs on purpose."""
  target = np_patchify_nhwc(np.asarray(images_nhwc, np.float64), p)
  if norm_pix_loss:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, ddof=ddof, keepdims=True)
    target = (target - mean) / (var + 1.e-6) ** .5
  loss = ((np.asarray(pred, np.float64) - target) ** 2).mean(axis=-1)
  mask = np.asarray(mask, np.float64)
  if not only_masked:
    return loss.mean()
  return (loss * mask).sum() / mask.sum()


def ref_1d_sincos(embed_dim, pos):
  omega = np.arange(embed_dim // 2, dtype=np.float64)
  omega /= embed_dim / 2.
  omega = 1. / 10000 ** omega
  pos = pos.reshape(-1)
  out = np.einsum("m,d->md", pos, omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def ref_2d_sincos(embed_dim, grid_size, cls_token=False):
  """util/pos_embed.get_2d_sincos_pos_embed."""
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.meshgrid(grid_w, grid_h)
  grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
  emb_h = ref_1d_sincos(embed_dim // 2, grid[0])
  emb_w = ref_1d_sincos(embed_dim // 2, grid[1])
  emb = np.concatenate([emb_h, emb_w], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
  return emb


class TorchMAE(nn.Module):
  """models_mae.MaskedAutoencoderViT with timm blocks, random_masking taking explicit noise."""

  def __init__(self, img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4,
               decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4, mlp_ratio=4.,
               norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=False):
    super().__init__()
    self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
    num_patches = self.patch_embed.num_patches
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
    self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True,
                                       norm_layer=norm_layer) for _ in range(depth)])
    self.norm = norm_layer(embed_dim)
    self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
    self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                          requires_grad=False)
    self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio,
                                               qkv_bias=True, norm_layer=norm_layer)
                                         for _ in range(decoder_depth)])
    self.decoder_norm = norm_layer(decoder_embed_dim)
    self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)
    self.norm_pix_loss = norm_pix_loss
    self.p = patch_size
    gs = int(num_patches ** .5)
    self.pos_embed.data.copy_(torch.from_numpy(ref_2d_sincos(embed_dim, gs, True)).float()[None])
    self.decoder_pos_embed.data.copy_(
        torch.from_numpy(ref_2d_sincos(decoder_embed_dim, gs, True)).float()[None])

  def forward_encoder(self, x, mask_ratio, noise):
    x = self.patch_embed(x)
    x = x + self.pos_embed[:, 1:, :]
    x, mask, ids_restore = ref_random_masking(x, mask_ratio, noise)
    cls_token = self.cls_token + self.pos_embed[:, :1, :]
    cls_tokens = cls_token.expand(x.shape[0], -1, -1)
    x = torch.cat((cls_tokens, x), dim=1)
    for blk in self.blocks:
      x = blk(x)
    x = self.norm(x)
    return x, mask, ids_restore

  def forward_decoder(self, x, ids_restore):
    x = self.decoder_embed(x)
    mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    x = x + self.decoder_pos_embed
    for blk in self.decoder_blocks:
      x = blk(x)
    x = self.decoder_norm(x)
    x = self.decoder_pred(x)
    return x[:, 1:, :]

  def forward_loss(self, imgs, pred, mask):
    target = ref_patchify(imgs, self.p)
    if self.norm_pix_loss:
      mean = target.mean(dim=-1, keepdim=True)
      var = target.var(dim=-1, keepdim=True)
      target = (target - mean) / (var + 1.e-6) ** .5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum()

  def forward(self, imgs, mask_ratio, noise):
    latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
    pred = self.forward_decoder(latent, ids_restore)
    return self.forward_loss(imgs, pred, mask), pred, mask


# ------------------------------ references (microsoft/SimMIM) ------------------------------
def ref_simmim_mask(input_size, mask_patch_size, model_patch_size, mask_ratio, perm):
  """data_simmim.MaskGenerator.__call__ with the permutation given."""
  rand_size = input_size // mask_patch_size
  scale = mask_patch_size // model_patch_size
  token_count = rand_size ** 2
  mask_count = int(np.ceil(token_count * mask_ratio))
  mask_idx = perm[:mask_count]
  mask = np.zeros(token_count, dtype=int)
  mask[mask_idx] = 1
  mask = mask.reshape((rand_size, rand_size))
  return mask.repeat(scale, axis=0).repeat(scale, axis=1)


def ref_simmim_loss(images_nchw, pred, mask_grid, p, in_chans):
  """SimMIM.forward's loss: pixel-space L1 over masked pixels. mask_grid [B, h, w]."""
  _, _, hh, ww = images_nchw.shape
  x_rec = ref_unpatchify(pred, p, hh // p, ww // p, in_chans)
  mask = mask_grid.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).contiguous()
  loss_recon = F.l1_loss(images_nchw, x_rec, reduction="none")
  return (loss_recon * mask).sum() / (mask.sum() + 1e-5) / in_chans


# ------------------------------ a ViT forward in numpy (float64) ------------------------------
def _ln(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def ref_vit_forward(params, images, patch, heads, key_mask=None, patch_mask=None, mask_token=None):
  """Pre-norm ViT (class token with zero position, MAE sin-cos positions, exact GELU, LN eps
  1e-6) on every patch; `key_mask` [B, 1+L] hides keys (-inf logits); `patch_mask` [B, L]
  swaps patch embeddings for `mask_token` before the positions (SimMIM). -> [B, 1+L, C]."""
  params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  images = np.asarray(images, np.float64)
  b, hh, ww, _ = images.shape
  kernel = params["embedding"]["kernel"]  # HWIO: (row, column, channel) = patchify's order
  width = kernel.shape[-1]
  x = np_patchify_nhwc(images, patch) @ kernel.reshape(-1, width) + params["embedding"]["bias"]
  if patch_mask is not None:
    w = np.asarray(patch_mask, np.float64)[..., None]
    x = x * (1 - w) + np.asarray(mask_token, np.float64).reshape(1, 1, width) * w
  gh, gw = hh // patch, ww // patch
  assert gh == gw
  x = x + ref_2d_sincos(width, gh)[None]
  cls = np.broadcast_to(params["cls"], (b, 1, width))
  x = np.concatenate([cls, x], axis=1)
  i = 0
  while f"block_{i:02d}" in params:
    blk = params[f"block_{i:02d}"]
    y = _ln(x, blk["norm1"])
    qkv = np.einsum("bnc,cthd->bnthd", y, blk["attn"]["qkv"]["kernel"]) + blk["attn"]["qkv"]["bias"]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if key_mask is not None:
      logits = np.where(np.asarray(key_mask, bool)[:, None, None, :], logits, -np.inf)
    logits = logits - logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", probs, v)
    x = x + np.einsum("bqhd,hdc->bqc", o, blk["attn"]["out"]["kernel"]) + blk["attn"]["out"]["bias"]
    y = _ln(x, blk["norm2"])
    h = y @ blk["mlp"]["fc1"]["kernel"] + blk["mlp"]["fc1"]["bias"]
    h = 0.5 * h * (1 + scipy.special.erf(h / np.sqrt(2)))
    x = x + h @ blk["mlp"]["fc2"]["kernel"] + blk["mlp"]["fc2"]["bias"]
    i += 1
  return _ln(x, params["encoder_norm"])


def perturbed(params, seed, scale=0.2):
  """Adds noise to every leaf (LayerNorm scales stay near 1, zero-init biases and tokens
  become non-zero) so no check passes on a trivially initialised network."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      tree, [jnp.asarray(np.asarray(a) + scale * rng.standard_normal(a.shape), jnp.float32)
             for a in leaves])


ENCODER = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=(8, 8))


@pytest.fixture(scope="module")
def vit_params():
  model = vit.Model(0, **ENCODER, class_token=True, pool_type="none", posemb="sincos2d_mae")
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  return model, perturbed(params, 1)


# ===================================== 1. patchify =====================================
@pytest.mark.parametrize("c,hh,ww,p", [(3, 16, 32, 4), (1, 16, 32, 8), (3, 32, 32, 8), (1, 24, 8, 4)])
def test_patchify_matches_mae_einsum(c, hh, ww, p):
  torch.manual_seed(c * 100 + hh + ww + p)
  imgs = torch.randn(2, c, hh, ww)
  want = ref_patchify(imgs, p).numpy()
  got = np.asarray(mae.patchify(jnp.asarray(imgs.permute(0, 2, 3, 1).numpy()), p))
  assert got.shape == want.shape
  np.testing.assert_array_equal(got, want)
  # The inverse, against the reference's unpatchify and as a round trip.
  back = np.asarray(masking.unpatchify(jnp.asarray(want), p, (hh // p, ww // p), c))
  np.testing.assert_array_equal(back, imgs.permute(0, 2, 3, 1).numpy())
  ref_back = ref_unpatchify(torch.from_numpy(want), p, hh // p, ww // p, c)
  np.testing.assert_array_equal(back, ref_back.permute(0, 2, 3, 1).numpy())


def test_patchify_is_not_a_plain_reshape():
  """The (row, column, channel) order within a patch matters: a C-major flattening differs."""
  imgs = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
  got = np.asarray(mae.patchify(jnp.asarray(imgs.permute(0, 2, 3, 1).numpy()), 4))
  c_major = imgs.reshape(2, 3, 2, 4, 2, 4).permute(0, 2, 4, 1, 3, 5).reshape(2, 4, 48).numpy()
  assert not np.array_equal(got, c_major)
  np.testing.assert_array_equal(got, ref_patchify(imgs, 4).numpy())


# ===================================== 2. random_masking =====================================
@pytest.mark.parametrize("length", [16, 49, 196])
@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.6])
def test_random_masking_matches_reference(length, ratio):
  torch.manual_seed(length * 7 + int(ratio * 100))
  x = torch.randn(3, length, 5)
  noise = torch.rand(3, length)
  want_x, want_mask, want_restore = ref_random_masking(x, ratio, noise)
  kept, mask, restore = mae.random_masking(jnp.asarray(x.numpy()), ratio, jnp.asarray(noise.numpy()))
  keep = int(length * (1 - ratio))
  assert kept.shape == (3, keep, 5)
  np.testing.assert_array_equal(np.asarray(kept), want_x.numpy())
  np.testing.assert_array_equal(np.asarray(mask), want_mask.numpy())
  np.testing.assert_array_equal(np.asarray(restore), want_restore.numpy())
  np.testing.assert_array_equal(np.asarray(mask).sum(1), length - keep)


@pytest.mark.parametrize("length,ratio,keep", [
    (196, 0.75, 49),  # int(196 * 0.25)
    (10, 0.7, 3),  # int(10 * 0.30000000000000004)
    (10, 0.8, 1),  # 10 * (1 - 0.8) = 1.9999999999999996: int() gives 1, round() would give 2
    (20, 0.9, 1),  # 20 * 0.09999999999999998 = 1.9999999999999996
    (49, 0.6, 19),  # 19.6 truncates
])
def test_random_masking_keep_count_follows_int_rule(length, ratio, keep):
  assert int(length * (1 - ratio)) == keep
  torch.manual_seed(length)
  x, noise = torch.randn(2, length, 3), torch.rand(2, length)
  want_x, want_mask, _ = ref_random_masking(x, ratio, noise)
  kept, mask, _ = mae.random_masking(jnp.asarray(x.numpy()), ratio, jnp.asarray(noise.numpy()))
  assert kept.shape[1] == keep == want_x.shape[1]
  np.testing.assert_array_equal(np.asarray(kept), want_x.numpy())
  np.testing.assert_array_equal(np.asarray(mask), want_mask.numpy())


# ===================================== 3. loss =====================================
@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("c,p", [(3, 4), (1, 2)])
def test_mae_loss_matches_reference(norm_pix_loss, c, p):
  rng = np.random.default_rng(c * 10 + p + norm_pix_loss)
  images = rng.normal(0.3, 1.5, (3, 16, 8, c)).astype(np.float32)
  length = (16 // p) * (8 // p)
  pred = rng.normal(0, 1, (3, length, p * p * c)).astype(np.float32)
  mask = (rng.random((3, length)) < 0.6).astype(np.float32)
  mask[:, 0] = 1  # at least one masked patch per example
  got = float(mae.loss(jnp.asarray(images), jnp.asarray(pred), jnp.asarray(mask), p, norm_pix_loss))
  want = ref_mae_loss(images, pred, mask, p, norm_pix_loss)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # The torch model's forward_loss agrees with the numpy reference (same formula, other code).
  tm = TorchMAE.__new__(TorchMAE)
  tm.p, tm.norm_pix_loss = p, norm_pix_loss
  torch_loss = TorchMAE.forward_loss(tm, torch.from_numpy(images).permute(0, 3, 1, 2),
                                     torch.from_numpy(pred), torch.from_numpy(mask))
  np.testing.assert_allclose(float(torch_loss), want, rtol=1e-5)
  # Planted bugs this test would catch: a loss over all patches, and the biased variance.
  assert abs(ref_mae_loss(images, pred, mask, p, norm_pix_loss, only_masked=False) - want) > 1e-3 * want
  if norm_pix_loss:
    assert abs(ref_mae_loss(images, pred, mask, p, True, ddof=0) - want) > 1e-3 * want


# ===================================== 4. posemb =====================================
@pytest.mark.parametrize("dim", [32, 64, 768])
@pytest.mark.parametrize("gs", [2, 4, 14])
def test_sincos_2d_mae_matches_get_2d_sincos_pos_embed(dim, gs):
  want = ref_2d_sincos(dim, gs, cls_token=True)
  np.testing.assert_array_equal(want[0], 0)
  got = np.asarray(posemb.sincos_2d_mae((gs, gs), dim))
  assert got.shape == (1, gs * gs, dim)
  np.testing.assert_allclose(got[0], want[1:], atol=1e-6, rtol=0)
  # big_vision's table (frequencies over width/4 - 1) is a different function: further from
  # the reference than the tolerance by orders of magnitude (least so for a wide, small grid).
  bv = np.asarray(posemb.sincos_2d((gs, gs), dim))
  assert np.abs(bv[0] - want[1:]).max() > 1e-3


# ===================================== 5. whole MAE vs torch =====================================
MAE_L = 16  # (32 / 8) ** 2


def _torch_mae(seed):
  torch.manual_seed(seed)
  model = TorchMAE()
  with torch.no_grad():
    for name, prm in model.named_parameters():
      if name in ("pos_embed", "decoder_pos_embed"):
        continue  # fixed sin-cos tables (from_mae checks them)
      if prm.ndim >= 2 and name not in ("cls_token", "mask_token"):
        fan_in = int(np.prod(prm.shape[1:]))
        prm.copy_(torch.randn_like(prm) / math.sqrt(fan_in))
      elif name.endswith("norm1.weight") or name.endswith("norm2.weight") or "norm.weight" in name:
        prm.copy_(1 + 0.2 * torch.randn_like(prm))  # LayerNorm scales near 1, not 1
      else:
        prm.copy_(0.2 * torch.randn_like(prm))  # biases, cls and mask tokens
  return model.eval()


@pytest.fixture(scope="module")
def torch_mae():
  model = _torch_mae(0)
  torch.manual_seed(1)
  images = torch.randn(2, 3, 32, 32)
  noise = torch.rand(2, MAE_L)
  return model, images, noise


def test_torch_mae_state_dict_has_official_keys(torch_mae):
  sd = torch_mae[0].state_dict()
  for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
              "blocks.1.attn.qkv.weight", "blocks.1.attn.proj.bias", "blocks.0.mlp.fc2.weight",
              "norm.weight", "mask_token", "decoder_embed.weight", "decoder_pos_embed",
              "decoder_blocks.1.norm2.bias", "decoder_norm.bias", "decoder_pred.weight"):
    assert key in sd, key
  assert not any(k.startswith(("head", "fc_norm")) for k in sd)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_from_mae_matches_torch_mae(torch_mae, norm_pix_loss):
  model, images, noise = torch_mae
  model.norm_pix_loss = norm_pix_loss
  with torch.no_grad():
    want_loss, want_pred, want_mask = model(images, 0.75, noise)
  module, params = from_mae(model.state_dict(), norm_pix_loss=norm_pix_loss, num_heads=4,
                            decoder_heads=4)
  loss, pred, mask = module.apply({"params": params}, jnp.asarray(images.permute(0, 2, 3, 1).numpy()),
                                  noise=jnp.asarray(noise.numpy()), mask_ratio=0.75)
  np.testing.assert_array_equal(np.asarray(mask), want_mask.numpy())
  assert np.asarray(mask).sum() == 2 * (MAE_L - int(MAE_L * 0.25))
  pred_err = float(np.abs(np.asarray(pred) - want_pred.numpy()).max())
  print(f"MAE parity norm_pix_loss={norm_pix_loss}: pred max abs err {pred_err:.3g}, "
        f"loss {float(loss):.6f} vs {float(want_loss):.6f}")
  assert pred_err < 1e-4
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-4)
  assert float(np.abs(want_pred.numpy()).mean()) > 0.1  # a non-degenerate prediction
  # The loss is the reference's formula on this very prediction.
  np.testing.assert_allclose(
      float(loss), ref_mae_loss(images.permute(0, 2, 3, 1).numpy(), np.asarray(pred),
                                np.asarray(mask), 8, norm_pix_loss), rtol=1e-5)



def test_mae_encoder_fine_tunes_as_maes_timm_vit(torch_mae):
  """MAE fine-tunes timm's ViT with global pooling and fc_norm, loading the pretraining
  encoder non-strictly (its final `norm` unused); vitoken's fine-tuning ViT built from the
  converted encoder gives the same pooled features."""
  model, images, _ = torch_mae
  module, params = from_mae(model.state_dict(), num_heads=4, decoder_heads=4)
  vit_model = convert_mae.finetune_model(module, 10)
  vit_params = convert_mae.encoder_params(params, vit_model, 32)
  assert vit_model.pool_type == "gap" and vit_model.fc_norm and "encoder_norm" not in vit_params
  encoder_sd = {k: v for k, v in model.state_dict().items()
                if not k.startswith(("decoder", "mask_token", "norm."))}
  reference = timm.models.vision_transformer.VisionTransformer(
      img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4, qkv_bias=True,
      num_classes=10, global_pool="avg", fc_norm=True,
      norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
  missing, unexpected = reference.load_state_dict(encoder_sd, strict=False)
  assert sorted(missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
  assert not unexpected
  with torch.no_grad():
    want = reference.forward_head(reference.forward_features(images), pre_logits=True).numpy()
  _, aux = vit_model.apply({"params": vit_params}, jnp.asarray(images.permute(0, 2, 3, 1).numpy()))
  np.testing.assert_allclose(np.asarray(aux["pre_logits"]), want, atol=1e-4)
  assert float(np.abs(want).mean()) > 0.1

def test_from_mae_checkpoint_wrapper_and_rng_masking(torch_mae):
  model, images, _ = torch_mae
  sd = model.state_dict()
  module, params = from_mae(sd, num_heads=4, decoder_heads=4)
  module2, params2 = from_mae({"model": sd, "epoch": 3}, num_heads=4, decoder_heads=4)
  assert module2 == module
  flat, flat2 = (traverse_util.flatten_dict(p, sep="/") for p in (params, params2))
  assert flat.keys() == flat2.keys()
  for k in flat:
    np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(flat2[k]))
  # The decoder's mask token is the checkpoint's.
  np.testing.assert_array_equal(np.asarray(params["decoder"]["mask_token"]), sd["mask_token"].numpy())

  x = jnp.asarray(images.permute(0, 2, 3, 1).numpy())
  run = lambda k: module.apply({"params": params}, x, mask_ratio=0.75, rngs={"masking": jax.random.key(k)})
  loss, pred, mask = run(0)
  mask = np.asarray(mask)
  assert set(np.unique(mask)) == {0.0, 1.0}
  np.testing.assert_array_equal(mask.sum(1), MAE_L - int(MAE_L * 0.25))
  np.testing.assert_allclose(float(loss), ref_mae_loss(np.asarray(x), np.asarray(pred), mask, 8, False),
                             rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(run(0)[2]), mask)  # same key, same mask
  assert not np.array_equal(np.asarray(run(1)[2]), mask)  # another key, another mask


def test_from_mae_refuses_a_learned_position_table(torch_mae):
  sd = dict(torch_mae[0].state_dict())
  sd["pos_embed"] = sd["pos_embed"] + 0.01 * torch.randn_like(sd["pos_embed"])
  with pytest.raises(ValueError, match="pos_embed is not MAE's fixed 2-D sin-cos table"):
    from_mae(sd, num_heads=4, decoder_heads=4)


# ============================ 6. masked encoder = key-masked encoder ============================
@pytest.mark.parametrize("ratio", [0.75, 0.5])
def test_mae_encoder_equals_key_masked_full_encoder(vit_params, ratio):
  model, params = vit_params
  rng = np.random.default_rng(3)
  images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  length = 16
  noise = rng.random((2, length)).astype(np.float32)
  keep = int(length * (1 - ratio))
  encoder = mae.MaskedAutoencoder(encoder=ENCODER).encoder_model(ratio)
  _, aux = encoder.apply({"params": params}, jnp.asarray(images), inputs={"noise": jnp.asarray(noise)})
  got = np.asarray(aux["encoded"])
  assert got.shape == (2, 1 + keep, 32)
  record = aux["reduction"]["masking"]

  ids_keep = np.argsort(noise, axis=1, kind="stable")[:, :keep]
  visible = np.zeros((2, length), bool)
  np.put_along_axis(visible, ids_keep, True, axis=1)
  np.testing.assert_array_equal(np.asarray(record["mask"]), (~visible).astype(np.float32))
  key_mask = np.concatenate([np.ones((2, 1), bool), visible], axis=1)  # the class token is kept
  full = ref_vit_forward(params, images, 8, 2, key_mask=key_mask)
  want = np.concatenate([full[:, :1], np.take_along_axis(full[:, 1:], ids_keep[..., None], axis=1)], 1)
  err = float(np.abs(got - want).max())
  print(f"MAE encoder vs key-masked full encoder (ratio {ratio}): max abs err {err:.3g}")
  assert err < 1e-4
  # Without the key mask the visible tokens would attend to the hidden ones: a different output.
  unmasked = ref_vit_forward(params, images, 8, 2)
  assert np.abs(unmasked[:, 0] - want[:, 0]).max() > 1e-2
  # The reference forward itself agrees with vitoken's plain ViT on all tokens.
  _, plain = model.apply({"params": params}, jnp.asarray(images))
  assert np.abs(np.asarray(plain["encoded"]) - unmasked).max() < 1e-4


# ===================================== 7. SimMIM =====================================
@pytest.mark.parametrize("ratio", [0.6, 0.5])
@pytest.mark.parametrize("input_size,mask_patch,model_patch", [(192, 32, 4), (64, 16, 8)])
def test_simmim_mask_matches_mask_generator(ratio, input_size, mask_patch, model_patch):
  rand = input_size // mask_patch
  scale = mask_patch // model_patch
  for seed in range(3):
    noise = np.random.default_rng(seed).random((4, rand * rand)).astype(np.float32)
    got = np.asarray(masking.simmim_mask(jnp.asarray(noise), ratio, (rand, rand), scale))
    want = np.stack([ref_simmim_mask(input_size, mask_patch, model_patch, ratio, np.argsort(n))
                     for n in noise]).reshape(4, -1)
    np.testing.assert_array_equal(got, want)
    count = int(np.ceil(rand * rand * ratio))
    np.testing.assert_array_equal(got.sum(1), count * scale * scale)
  # The library's grid rules agree with the generator's sizes.
  assert masking.simmim_grids((input_size, input_size), model_patch, mask_patch) == ((rand, rand), scale)


def test_simmim_mask_count_uses_float_ceil():
  """100 * 0.07 = 7.000000000000001 in floats, so the reference masks 8 cells, not 7."""
  noise = np.random.default_rng(0).random((3, 100)).astype(np.float32)
  got = np.asarray(masking.simmim_mask(jnp.asarray(noise), 0.07, (10, 10), 1))
  want = np.stack([ref_simmim_mask(80, 8, 8, 0.07, np.argsort(n)) for n in noise]).reshape(3, -1)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got.sum(1), 8)


def test_simmim_mask_is_a_uniform_subset():
  n_draws, rand, ratio = 6000, 6, 0.6
  cells = rand * rand
  m = int(np.ceil(cells * ratio))  # 22 of 36
  noise = jax.random.uniform(jax.random.key(0), (n_draws, cells))
  masks = np.asarray(masking.simmim_mask(noise, ratio, (rand, rand), 1))
  np.testing.assert_array_equal(masks.sum(1), m)
  p = m / cells
  freq = masks.mean(0)
  sigma = math.sqrt(p * (1 - p) / n_draws)
  assert np.abs(freq - p).max() < 5 * sigma, (freq, p)
  # Not just the marginals: a pair of cells is masked together with m(m-1) / (n(n-1)).
  pair = m * (m - 1) / (cells * (cells - 1))
  sigma2 = math.sqrt(pair * (1 - pair) / n_draws)
  for i, j in ((0, 1), (0, 35), (7, 20)):
    assert abs((masks[:, i] * masks[:, j]).mean() - pair) < 5 * sigma2
  # And the chi-square of the per-cell counts is plausible (36 - 1 degrees of freedom).
  counts = masks.sum(0)
  chi2 = ((counts - n_draws * p) ** 2 / (n_draws * p * (1 - p))).sum()
  assert chi2 < 80, chi2


@pytest.mark.parametrize("c,hh,ww,p", [(3, 16, 32, 4), (1, 32, 32, 8)])
def test_simmim_loss_matches_pixel_space_reference(c, hh, ww, p):
  rng = np.random.default_rng(c + hh + p)
  images = rng.normal(size=(2, hh, ww, c)).astype(np.float32)
  gh, gw = hh // p, ww // p
  pred = rng.normal(size=(2, gh * gw, p * p * c)).astype(np.float32)
  mask = (rng.random((2, gh * gw)) < 0.5).astype(np.float32)
  got = float(simmim.loss(jnp.asarray(images), jnp.asarray(pred), jnp.asarray(mask), p))
  want = float(ref_simmim_loss(torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(pred),
                               torch.from_numpy(mask).reshape(2, gh, gw), p, c))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Planted bug: averaging over all pixels instead of the masked ones.
  all_pixels = np.abs(images - np.asarray(masking.unpatchify(jnp.asarray(pred), p, (gh, gw), c))).mean()
  assert abs(all_pixels - want) > 1e-3
  # No masked patch: 0 / (0 + 1e-5), not NaN.
  zero = float(simmim.loss(jnp.asarray(images), jnp.asarray(pred), jnp.zeros_like(mask), p))
  assert zero == 0.0


SIMMIM_ENCODER = dict(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=(8, 8))


@pytest.fixture(scope="module")
def simmim_model():
  model = simmim.SimMIM(encoder=SIMMIM_ENCODER, mask_patch_size=16)
  images = np.random.default_rng(5).normal(size=(2, 32, 32, 3)).astype(np.float32)
  params = model.init({"params": jax.random.key(0), "masking": jax.random.key(1)},
                      jnp.zeros((1, 32, 32, 3)))["params"]
  return model, perturbed(params, 2), images


def test_simmim_model_masks_and_loss(simmim_model):
  model, params, images = simmim_model
  noise = np.random.default_rng(6).random((2, 4)).astype(np.float32)  # 2x2 cells of 16 px
  loss, pred, mask = model.apply({"params": params}, jnp.asarray(images), noise=jnp.asarray(noise))
  want_mask = np.stack([ref_simmim_mask(32, 16, 8, 0.6, np.argsort(n)) for n in noise])  # [2, 4, 4]
  np.testing.assert_array_equal(np.asarray(mask), want_mask.reshape(2, -1))
  np.testing.assert_array_equal(np.asarray(mask).sum(1), math.ceil(4 * 0.6) * 4)
  # The prediction: the encoder with the mask token swapped in (before the positions), then
  # the per-token linear decoder.
  enc = dict(params["encoder"])
  token = enc.pop("mask_token")["mask_token"]
  tokens = ref_vit_forward(enc, images, 8, 2, patch_mask=want_mask.reshape(2, -1), mask_token=token)
  want_pred = tokens[:, 1:] @ np.asarray(params["decoder"]["kernel"], np.float64) + np.asarray(
      params["decoder"]["bias"], np.float64)
  err = float(np.abs(np.asarray(pred) - want_pred).max())
  print(f"SimMIM pred vs reference forward: max abs err {err:.3g}")
  assert err < 1e-4
  want_loss = ref_simmim_loss(torch.from_numpy(images).permute(0, 3, 1, 2),
                              torch.from_numpy(np.array(pred)),
                              torch.from_numpy(want_mask.astype(np.float32)), 8, 3)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
  # Without noise or mask, the "masking" stream draws it: still ceil(4 * 0.6) cells of 2x2.
  _, _, drawn = model.apply({"params": params}, jnp.asarray(images), rngs={"masking": jax.random.key(3)})
  drawn = np.asarray(drawn).reshape(2, 4, 4)
  np.testing.assert_array_equal(drawn.sum((1, 2)), 3 * 4)
  np.testing.assert_array_equal(drawn, drawn[:, ::2, ::2].repeat(2, 1).repeat(2, 2))  # whole cells


def test_simmim_mask_token_replaces_only_masked_patches(simmim_model):
  model, params, images = simmim_model
  x = jnp.asarray(images)
  zeros = jnp.zeros((2, 16))
  _, pred0, _ = model.apply({"params": params}, x, mask=zeros)
  # With nothing masked, the encoder is a plain ViT with the same params (no mask token).
  enc = {k: v for k, v in params["encoder"].items() if k != "mask_token"}
  plain = vit.Model(0, **SIMMIM_ENCODER, class_token=True, pool_type="none", posemb="sincos2d_mae")
  _, aux = plain.apply({"params": enc}, x)
  want = np.asarray(aux["encoded"][:, 1:]) @ np.asarray(params["decoder"]["kernel"]) + np.asarray(
      params["decoder"]["bias"])
  np.testing.assert_allclose(np.asarray(pred0), want, atol=1e-5)

  other = jax.tree_util.tree_map(lambda a: a, params)
  other["encoder"] = dict(other["encoder"])
  # A random change: a constant shift of all channels would vanish in every pre-norm LayerNorm.
  change = jnp.asarray(np.random.default_rng(9).normal(size=(1, 1, 32)), jnp.float32)
  other["encoder"]["mask_token"] = {"mask_token": params["encoder"]["mask_token"]["mask_token"] + change}
  _, pred0b, _ = model.apply({"params": other}, x, mask=zeros)
  np.testing.assert_array_equal(np.asarray(pred0b), np.asarray(pred0))
  one = zeros.at[0, 5].set(1.0)
  _, pred1, _ = model.apply({"params": params}, x, mask=one)
  _, pred1b, _ = model.apply({"params": other}, x, mask=one)
  assert np.abs(np.asarray(pred1b) - np.asarray(pred1)).max() > 1e-3
  # Only example 0 had a masked patch; example 1 is untouched by the token.
  np.testing.assert_array_equal(np.asarray(pred1b)[1], np.asarray(pred1)[1])
  np.testing.assert_allclose(np.asarray(pred1)[1], np.asarray(pred0)[1], atol=1e-6)


# ===================================== 8. bad inputs =====================================
BAD_RATIOS = [0, 1, 1.5, -0.1]
RATIO_MSG = r"mask_ratio must be a number in \(0, 1\)"


@pytest.mark.parametrize("ratio", BAD_RATIOS)
def test_random_masking_rejects_bad_ratio(ratio):
  with pytest.raises(ValueError, match=RATIO_MSG):
    mae.random_masking(jnp.zeros((2, 16, 4)), ratio, jnp.zeros((2, 16)))


def test_random_masking_rejects_a_ratio_that_keeps_nothing():
  with pytest.raises(ValueError, match="keeps 0 of 16 patches"):
    mae.random_masking(jnp.zeros((2, 16, 4)), 0.99, jnp.zeros((2, 16)))


@pytest.fixture(scope="module")
def tiny_mae():
  model = mae.MaskedAutoencoder(encoder=SIMMIM_ENCODER, decoder_width=32, decoder_depth=1,
                                decoder_heads=4)
  x = jnp.zeros((2, 32, 32, 3))
  params = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x,
                                             noise=jnp.zeros((2, 16))))["params"]
  params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), params)
  return model, params, x


@pytest.mark.parametrize("ratio", BAD_RATIOS)
def test_mae_apply_rejects_bad_ratio(tiny_mae, ratio):
  model, params, x = tiny_mae
  with pytest.raises(ValueError, match=RATIO_MSG):
    model.apply({"params": params}, x, noise=jnp.zeros((2, 16)), mask_ratio=ratio)
  with pytest.raises(ValueError, match=RATIO_MSG):
    model.clone(mask_ratio=ratio).apply({"params": params}, x, noise=jnp.zeros((2, 16)))


@pytest.mark.parametrize("ratio", BAD_RATIOS)
def test_simmim_rejects_bad_ratio(ratio):
  model = simmim.SimMIM(encoder=SIMMIM_ENCODER, mask_patch_size=16, mask_ratio=ratio)
  with pytest.raises(ValueError, match=RATIO_MSG):
    model.init({"params": jax.random.key(0)}, jnp.zeros((2, 32, 32, 3)), noise=jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match=RATIO_MSG):
    masking.simmim_mask(jnp.zeros((2, 4)), ratio, (2, 2), 2)


def test_simmim_rejects_mask_patch_not_multiple_of_patch():
  model = simmim.SimMIM(encoder=SIMMIM_ENCODER, mask_patch_size=12)
  with pytest.raises(ValueError, match="mask_patch_size 12 is not a multiple of the patch size 8"):
    model.init({"params": jax.random.key(0), "masking": jax.random.key(1)}, jnp.zeros((1, 48, 48, 3)))


def test_mae_rejects_decoder_width_not_divisible_by_heads():
  model = mae.MaskedAutoencoder(encoder=SIMMIM_ENCODER, decoder_width=30, decoder_heads=4,
                                decoder_depth=1)
  with pytest.raises(ValueError, match="decoder_width 30 is not divisible by decoder_heads 4"):
    model.init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)), noise=jnp.zeros((1, 16)))


def test_from_mae_names_missing_keys(torch_mae):
  sd = dict(torch_mae[0].state_dict())
  del sd["decoder_pred.weight"], sd["mask_token"]
  with pytest.raises(ValueError, match="not an MAE pretraining state dict: missing") as err:
    from_mae(sd, num_heads=4, decoder_heads=4)
  assert "'mask_token'" in str(err.value) and "'decoder_pred.weight'" in str(err.value)
  assert "'decoder_embed.weight'" not in str(err.value)  # only the missing ones are named

  torch.manual_seed(0)
  plain = timm.models.vision_transformer.VisionTransformer(
      img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, num_classes=0)
  with pytest.raises(ValueError, match="missing") as err:
    from_mae(plain.state_dict(), num_heads=4)
  msg = str(err.value)
  for key in ("mask_token", "decoder_embed.weight", "decoder_pred.weight", "decoder_pos_embed"):
    assert f"'{key}'" in msg, msg
  assert "from_timm" in msg  # the hint for an encoder-only checkpoint


def test_noise_of_the_wrong_shape(tiny_mae):
  with pytest.raises(ValueError, match=r"noise must be \[batch, 16\].*got shape \(2, 15\)"):
    mae.random_masking(jnp.zeros((2, 16, 4)), 0.75, jnp.zeros((2, 15)))
  with pytest.raises(ValueError, match=r"noise must be \[batch, 16\].*got shape \(3, 16\)"):
    mae.random_masking(jnp.zeros((2, 16, 4)), 0.75, jnp.zeros((3, 16)))
  model, params, x = tiny_mae
  with pytest.raises(ValueError, match=r"inputs\['noise'\] must be \[batch, 16\]"):
    model.apply({"params": params}, x, noise=jnp.zeros((2, 4, 4)))
  sm = simmim.SimMIM(encoder=SIMMIM_ENCODER, mask_patch_size=16)
  with pytest.raises(ValueError, match=r"noise must be \[batch, 4\]"):
    sm.init({"params": jax.random.key(0)}, jnp.zeros((2, 32, 32, 3)), noise=jnp.zeros((2, 16)))
  with pytest.raises(ValueError, match=r"inputs\['patch_mask'\] must be \[batch, 16\]"):
    sm.init({"params": jax.random.key(0)}, jnp.zeros((2, 32, 32, 3)), mask=jnp.zeros((2, 4)))


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_pretraining_refuses_reducers_that_change_the_token_count(method):
  encoder = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=(8, 8),
                 token_reduction={"method": "tome", "r": 2})
  model = (mae.MaskedAutoencoder(encoder=encoder, decoder_width=32, decoder_depth=1, decoder_heads=2)
           if method == "mae" else simmim.SimMIM(encoder=encoder, mask_patch_size=16))
  images = jnp.zeros((2, 32, 32, 3))
  with pytest.raises(ValueError, match="cannot run during pretraining"):
    model.init({"params": jax.random.key(0), "masking": jax.random.key(1)}, images)


def test_big_vision_export_refuses_maes_sincos_table():
  from vitoken.convert import to_big_vision
  model = vit.Model(10, width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=(8, 8),
                    posemb="sincos2d_mae")
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  with pytest.raises(ValueError, match="MAE's sin-cos table"):
    to_big_vision(model, params)
