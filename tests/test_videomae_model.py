"""VideoMAE's model against a torch transcription of MCG-NJU/VideoMAE (`modeling_pretrain.py`,
`modeling_finetune.py`, the loss of `engine_for_pretraining.py`), through `from_videomae`."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vitoken.convert import from_videomae  # noqa: E402
from vitoken.errors import InputError  # noqa: E402
from vitoken.models import masking, videomae  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def sinusoid_table(n, d):
  table = np.array([[p / np.power(10000, 2 * (j // 2) / d) for j in range(d)] for p in range(n)])
  table[:, 0::2], table[:, 1::2] = np.sin(table[:, 0::2]), np.cos(table[:, 1::2])
  return torch.tensor(table, dtype=torch.float32)[None]


class Attention(nn.Module):  # q and v biases, no k bias
  def __init__(self, dim, heads):
    super().__init__()
    self.heads, self.scale = heads, (dim // heads) ** -0.5
    self.qkv = nn.Linear(dim, 3 * dim, bias=False)
    self.q_bias, self.v_bias = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
    qkv = nn.functional.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
  def __init__(self, dim, heads, init_values=0.0):
    super().__init__()
    self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads)
    self.mlp = nn.Sequential()
    self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
    self.gamma_1 = self.gamma_2 = None
    if init_values > 0:
      self.gamma_1 = nn.Parameter(init_values + torch.rand(dim))
      self.gamma_2 = nn.Parameter(init_values + torch.rand(dim))

  def forward(self, x):
    if self.gamma_1 is None:
      x = x + self.attn(self.norm1(x))
      return x + self.mlp(self.norm2(x))
    x = x + self.gamma_1 * self.attn(self.norm1(x))
    return x + self.gamma_2 * self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
  def __init__(self, dim, chans, tubelet, patch):
    super().__init__()
    self.proj = nn.Conv3d(chans, dim, (tubelet, patch, patch), (tubelet, patch, patch))

  def forward(self, x):  # [B, C, T, H, W]
    return self.proj(x).flatten(2).transpose(1, 2)


class Encoder(nn.Module):
  def __init__(self, dim, depth, heads, chans, tubelet, patch, n, init_values):
    super().__init__()
    self.patch_embed = PatchEmbed(dim, chans, tubelet, patch)
    self.pos_embed = sinusoid_table(n, dim)
    self.blocks = nn.ModuleList([Block(dim, heads, init_values) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)

  def forward(self, x, mask):
    x = self.patch_embed(x) + self.pos_embed
    b, _, c = x.shape
    x = x[~mask].reshape(b, -1, c)
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x)


class PretrainVideoMAE(nn.Module):
  def __init__(self, dim=32, depth=2, heads=2, ddim=16, ddepth=2, dheads=2, chans=3, tubelet=2,
               patch=4, n=12, init_values=0.0):
    super().__init__()
    self.encoder = Encoder(dim, depth, heads, chans, tubelet, patch, n, init_values)
    self.decoder = nn.Module()
    self.decoder.blocks = nn.ModuleList([Block(ddim, dheads) for _ in range(ddepth)])
    self.decoder.norm = nn.LayerNorm(ddim, eps=1e-6)
    self.decoder.head = nn.Linear(ddim, chans * tubelet * patch * patch)
    self.encoder_to_decoder = nn.Linear(dim, ddim, bias=False)
    self.mask_token = nn.Parameter(torch.randn(1, 1, ddim))
    self.pos_embed = sinusoid_table(n, ddim)

  def forward(self, x, mask):
    x_vis = self.encoder_to_decoder(self.encoder(x, mask))
    b, _, c = x_vis.shape
    pos = self.pos_embed.expand(b, -1, -1)
    pos_vis, pos_mask = pos[~mask].reshape(b, -1, c), pos[mask].reshape(b, -1, c)
    x = torch.cat([x_vis + pos_vis, self.mask_token + pos_mask], dim=1)
    for blk in self.decoder.blocks:
      x = blk(x)
    return self.decoder.head(self.decoder.norm(x[:, -pos_mask.shape[1]:]))


def reference_loss(videos, pred, mask, tubelet, patch):
  """engine_for_pretraining's loss (normalised targets) in torch, channels-first clips."""
  mean = torch.tensor(MEAN)[None, :, None, None, None]
  std = torch.tensor(STD)[None, :, None, None, None]
  v = videos * std + mean
  b, c, t, h, w = v.shape
  x = v.reshape(b, c, t // tubelet, tubelet, h // patch, patch, w // patch, patch)
  x = x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, -1, tubelet * patch * patch, c)
  x = (x - x.mean(dim=-2, keepdim=True)) / (x.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
  x = x.reshape(b, x.shape[1], -1)
  labels = x[mask].reshape(b, -1, x.shape[-1])
  return nn.functional.mse_loss(pred, labels)


def _randomise(model, seed=0):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(0.3 * torch.randn(p.shape, generator=gen))
  return model


@pytest.mark.parametrize("init_values", [0.0, 0.1])
def test_pretraining_model_matches_the_reference(init_values):
  torch.manual_seed(0)
  ref = _randomise(PretrainVideoMAE(init_values=init_values)).eval()
  rng = np.random.default_rng(0)
  clips = rng.normal(size=(2, 4, 8, 12, 3)).astype(np.float32)  # [B, T, H, W, C]
  noise = rng.random((2, 6)).astype(np.float32)  # 2x3 positions a slice
  mask = np.asarray(masking.tube_mask(noise, 0.5, frames=2)).astype(bool)  # 3 of 6 per slice
  module, params = from_videomae(ref.state_dict(), image_size=(8, 12), num_frames=4,
                                 num_heads=2, decoder_heads=2, mask_ratio=0.5)
  loss, pred, got_mask = module.apply({"params": params}, jnp.asarray(clips), noise=noise)
  np.testing.assert_array_equal(np.asarray(got_mask).astype(bool), mask)
  videos = torch.tensor(clips).permute(0, 4, 1, 2, 3)
  with torch.no_grad():
    want = ref(videos, torch.tensor(mask))
    want_loss = reference_loss(videos, want, torch.tensor(mask), 2, 4)
  np.testing.assert_allclose(np.asarray(pred), want.numpy(), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-4)
  # The same mask passed in from the input pipeline.
  _, pred2, _ = module.apply({"params": params}, jnp.asarray(clips), mask=mask.astype(np.float32))
  np.testing.assert_allclose(np.asarray(pred2), np.asarray(pred), atol=1e-6)


class FinetuneVideoMAE(nn.Module):
  def __init__(self, dim=32, depth=2, heads=2, chans=3, tubelet=2, patch=4, n=12, classes=5):
    super().__init__()
    self.patch_embed = PatchEmbed(dim, chans, tubelet, patch)
    self.pos_embed = sinusoid_table(n, dim)
    self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
    self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
    self.head = nn.Linear(dim, classes)

  def forward(self, x):
    x = self.patch_embed(x) + self.pos_embed
    for blk in self.blocks:
      x = blk(x)
    return self.head(self.fc_norm(x.mean(1)))


def test_fine_tuned_model_matches_the_reference():
  ref = _randomise(FinetuneVideoMAE(), seed=1).eval()
  clips = np.random.default_rng(1).normal(size=(2, 4, 8, 12, 3)).astype(np.float32)
  module, params = from_videomae(ref.state_dict(), image_size=(8, 12), num_frames=4, num_heads=2)
  logits, _ = module.apply({"params": params}, jnp.asarray(clips))
  with torch.no_grad():
    want = ref(torch.tensor(clips).permute(0, 4, 1, 2, 3))
  np.testing.assert_allclose(np.asarray(logits), want.numpy(), atol=1e-4, rtol=1e-4)


def test_pretraining_trains_and_the_encoder_fine_tunes():
  """A few steps of VideoMAE pretraining lower its loss; the encoder's params then load into
  `finetune_model`'s video ViT unchanged."""
  import optax  # pylint: disable=import-outside-toplevel
  module = videomae.VideoMAE(encoder={"patch_size": (2, 4, 4), "width": 32, "depth": 1,
                                      "mlp_dim": 64, "num_heads": 2, "channels": 1},
                             decoder_width=16, decoder_depth=1, decoder_heads=2, mask_ratio=0.5)
  rng = np.random.default_rng(2)
  clips = np.zeros((4, 4, 8, 8, 1), np.float32)
  clips[:, :, 2:6, 2:6] = rng.random((4, 1, 1, 1, 1))  # a square of one brightness per clip
  params = module.init({"params": jax.random.key(0), "masking": jax.random.key(1)}, clips)["params"]
  opt = optax.adam(3e-3)
  state = opt.init(params)

  @jax.jit
  def step(p, s, key):
    loss, grads = jax.value_and_grad(
        lambda p: module.apply({"params": p}, clips, rngs={"masking": key})[0])(p)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  losses = []
  for i in range(30):
    params, state, loss = step(params, state, jax.random.key(10 + i))
    losses.append(float(loss))
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
  classifier = videomae.finetune_model(module, 3)
  variables = classifier.init(jax.random.key(0), clips)
  merged = dict(variables["params"], **{k: v for k, v in params["encoder"].items()
                                        if k != "encoder_norm"})
  logits, _ = classifier.apply({"params": merged}, clips)
  assert logits.shape == (4, 3)


def test_bad_checkpoints_and_clips_are_named():
  ref = PretrainVideoMAE()
  sd = {k: v for k, v in ref.state_dict().items() if k != "mask_token"}
  with pytest.raises(InputError, match="missing .*mask_token"):
    from_videomae(sd, image_size=(8, 12), num_frames=4, num_heads=2)
  with pytest.raises(InputError, match="clips of 5 frames do not split into tubelets of 2"):
    from_videomae(ref.state_dict(), image_size=(8, 12), num_frames=5, num_heads=2)
  with pytest.raises(ValueError, match="needs a tubelet patch"):
    videomae.encoder_fields({"patch_size": (4, 4)})
