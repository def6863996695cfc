"""CLIP (QuickGELU, pre-norm) and SigLIP (MAP head) image towers in vitoken's ViT: timm models
and big_vision two-tower `.npz` checkpoints against their references, fp32 on CPU, compared
after chosen blocks, at the output, and in the MAP probe's attention.

The references are timm itself (its modules, run in torch) and, for big_vision, timm's own
`.npz` loader (`_load_weights`) filling a timm SigLIP; the MAP attention is recomputed in
torch from timm's `AttentionPoolLatent` weights. Small random models, no downloads.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vitoken.convert import from_timm
from vitoken.convert.big_vision import from_big_vision, to_big_vision
from vitoken.convert.torch_reference import import_timm
from vitoken.errors import ConfigError
from vitoken.models import layers, vit
from vitoken.models.reducers import base as rbase

timm = import_timm()
from timm.models import vision_transformer as timm_vit  # noqa: E402  (after the shim)

TOL = 1e-4
IMAGE, PATCH, WIDTH, DEPTH, HEADS, MLP = 32, 8, 64, 3, 4, 256
GRID = IMAGE // PATCH
BLOCKS = [0, DEPTH // 2, DEPTH - 1]  # first, middle, last
SMALL = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS)


def _perturb(model, seed=0):
  """Every weight moved off its init, so no zero (head, latent, bias) hides a mistake."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model.eval()


def _images(seed=0, batch=2):
  return np.random.RandomState(seed).randn(batch, 3, IMAGE, IMAGE).astype(np.float32)


def _timm_map_probs(attn_pool, x):
  """AttentionPoolLatent's softmax over tokens, by hand from its q/kv weights: [B, heads, N]."""
  b, n, c = x.shape
  h = attn_pool.num_heads
  q = attn_pool.q(attn_pool.latent.expand(b, -1, -1)).reshape(b, 1, h, c // h).transpose(1, 2)
  k = attn_pool.kv(x).reshape(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4)[0]
  return ((q * attn_pool.scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]


def _run_timm(model, x):
  """timm's output, the tokens after every block and the MAP probe's head-mean attention."""
  seen = {}
  hooks = [blk.register_forward_hook(functools.partial(
      lambda i, _m, _a, out: seen.__setitem__(i, out.detach().numpy()), i))
      for i, blk in enumerate(model.blocks)]
  if getattr(model, "attn_pool", None) is not None:
    hooks.append(model.attn_pool.register_forward_pre_hook(
        lambda _m, args: seen.__setitem__("pool_in", args[0])))
  with torch.no_grad():
    out = model(torch.from_numpy(x)).numpy()
    probs = (_timm_map_probs(model.attn_pool, seen.pop("pool_in")).mean(dim=1).numpy()
             if "pool_in" in seen else None)
  for hook in hooks:
    hook.remove()
  return {"out": out, "blocks": seen, "map_attention": probs}


def _run_vitoken(module, params, x):
  out, aux = jax.jit(module.apply)({"params": params}, x.transpose(0, 2, 3, 1))
  return {"out": np.asarray(out), "blocks": {k: np.asarray(v) for k, v in aux["blocks"].items()},
          "map_attention": (np.asarray(aux["map_attention"]) if "map_attention" in aux else None)}


def _max_diff(a, b):
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(np.asarray(a, np.float64) - b).max())


def _parity(model, **convert_kw):
  x = _images()
  module, params = from_timm(model, **convert_kw)
  return module, params, _run_timm(model, x), _run_vitoken(module, params, x)


# ------------------------------------------------------------------------------------------
# timm CLIP: QuickGELU, pre-norm, class token with a position, no patch bias, LayerNorm 1e-5.
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip():
  model = _perturb(timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False,
                                     num_classes=16, **SMALL))
  return (model, *_parity(model))


def test_clip_layout_converts_to_the_clip_fields(clip):
  model, module, params, _, _ = clip
  assert type(model.blocks[0].mlp.act).__name__ == "QuickGELU"
  assert module.mlp_activation == "quick_gelu" and not module.gelu_approximate
  assert (module.pre_norm, module.pool_type, module.class_token, module.posemb_prefix) == (
      True, "tok", True, True)
  assert not module.patch_bias and not module.fc_norm and module.layer_norm_eps == 1e-5
  assert {"norm_pre", "encoder_norm", "head", "cls"} <= set(params)
  assert params["pos_embedding"].shape == (1, 1 + GRID * GRID, WIDTH)  # the class token's too


@pytest.mark.parametrize("block", BLOCKS)
def test_clip_tokens_after_block_match_timm(clip, block):
  *_, ref, got = clip
  diff = _max_diff(got["blocks"][f"block_{block:02d}"], ref["blocks"][block])
  print(f"CLIP block {block}: max abs token diff {diff:.2e}")
  assert diff < TOL


def test_clip_logits_match_timm(clip):
  *_, ref, got = clip
  assert got["map_attention"] is None
  assert _max_diff(got["out"], ref["out"]) < TOL


def test_quick_gelu_is_used_and_gelu_differs(clip):
  """The field changes the network: the same weights under GELU give other logits, and those
  are timm's when timm's activations are swapped for GELU too."""
  model, module, params, ref, got = clip
  gelu_module = module.clone(mlp_activation=None)
  gelu = _run_vitoken(gelu_module, params, _images())
  # Small random weights keep pre-activations small, where the two functions are close: the
  # gap is still tens of times the parity tolerance.
  assert _max_diff(gelu["out"], got["out"]) > 10 * TOL
  gelu_timm = timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False,
                                num_classes=16, **SMALL).eval()
  gelu_timm.load_state_dict(model.state_dict())
  for blk in gelu_timm.blocks:
    blk.mlp.act = torch.nn.GELU()
  assert _max_diff(gelu["out"], _run_timm(gelu_timm, _images())["out"]) < TOL
  # A timm state dict tells neither the activation nor CLIP's LayerNorm eps: given, it matches.
  sd_module, sd_params = from_timm(model.state_dict(), num_heads=HEADS,
                                   mlp_activation="quick_gelu", layer_norm_eps=1e-5)
  assert _max_diff(_run_vitoken(sd_module, sd_params, _images())["out"], ref["out"]) < TOL


def test_clip_built_from_the_class_with_quick_gelu_matches_timm():
  model = _perturb(timm_vit.VisionTransformer(
      **SMALL, act_layer=timm.layers.QuickGELU, pre_norm=True, num_classes=7,
      norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-5)), seed=3)
  module, _, ref, got = _parity(model)
  assert module.mlp_activation == "quick_gelu" and module.pre_norm
  assert _max_diff(got["out"], ref["out"]) < TOL
  assert _max_diff(got["blocks"][f"block_{DEPTH - 1:02d}"], ref["blocks"][DEPTH - 1]) < TOL


def test_unsupported_or_mixed_timm_activations_are_rejected():
  model = timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, **SMALL)
  model.blocks[1].mlp.act = torch.nn.GELU()
  with pytest.raises(ValueError, match="mixes MLP activations.*blocks.1.mlp"):
    from_timm(model)
  model.blocks[1].mlp.act = torch.nn.SiLU()
  with pytest.raises(ValueError, match="blocks.1.mlp activation is SiLU"):
    from_timm(model)


# ------------------------------------------------------------------------------------------
# timm SigLIP: MAP pooling (AttentionPoolLatent), no class token, fc_norm Identity.
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["gelu", "gelu_tanh"])
def siglip(request):
  model = _perturb(timm.create_model("vit_base_patch16_siglip_224", pretrained=False,
                                     num_classes=10, act_layer=request.param, **SMALL), seed=1)
  with torch.no_grad():  # larger query and key weights: a probe attention far from uniform
    model.attn_pool.q.weight.mul_(6)
    model.attn_pool.kv.weight[:WIDTH].mul_(6)
  return (request.param, model, *_parity(model))


def test_siglip_layout_converts_to_map_pooling(siglip):
  act, model, module, params, _, _ = siglip
  assert model.global_pool == "map" and model.cls_token is None
  assert type(model.fc_norm).__name__ == "Identity"
  assert (module.pool_type, module.num_prefix, module.fc_norm, module.pre_norm) == (
      "map", 0, False, False)
  assert module.gelu_approximate == (act == "gelu_tanh") and module.mlp_activation is None
  assert "map_head" in params and "cls" not in params


@pytest.mark.parametrize("block", BLOCKS)
def test_siglip_tokens_after_block_match_timm(siglip, block):
  act, *_, ref, got = siglip
  diff = _max_diff(got["blocks"][f"block_{block:02d}"], ref["blocks"][block])
  print(f"SigLIP ({act}) block {block}: max abs token diff {diff:.2e}")
  assert diff < TOL


def test_siglip_logits_and_map_attention_match_timm(siglip):
  *_, ref, got = siglip
  assert _max_diff(got["out"], ref["out"]) < TOL
  assert got["map_attention"].shape == (2, GRID * GRID)
  np.testing.assert_allclose(got["map_attention"].sum(-1), 1.0, atol=1e-5)
  assert got["map_attention"].max() > 1.5 / GRID ** 2  # not uniform, so the comparison bites
  assert _max_diff(got["map_attention"], ref["map_attention"]) < 1e-5


def test_siglip_features_only_match_timm_pre_logits(siglip):
  _, model, module, params, _, _ = siglip
  feat_module, feat_params = from_timm(model, num_classes=0)
  assert "head" not in feat_params and feat_module.num_classes == 0
  x = _images(2)
  with torch.no_grad():
    want = model.forward_head(model.forward_features(torch.from_numpy(x)),
                              pre_logits=True).numpy()
  assert _max_diff(_run_vitoken(feat_module, feat_params, x)["out"], want) < TOL


# ------------------------------------------------------------------------------------------
# The MAP head's attention probabilities and aux["map_attention"].
# ------------------------------------------------------------------------------------------


def test_map_head_probs_sum_to_one_respect_mask_and_give_its_attention_output():
  head = vit.MAPHead(num_heads=HEADS, mlp_dim=MLP)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 9, WIDTH)), jnp.float32)
  key_mask = jnp.asarray(rng.uniform(size=(3, 9)) > 0.3).at[:, 0].set(True)
  variables = head.init(jax.random.key(0), x, key_mask)
  seen = {}

  def grab_out_input(next_fun, args, kwargs, context):
    if context.module.name == "out" and context.method_name == "__call__":
      seen["pre_out"] = args[0]  # the attention output [B, 1, heads, head_dim]
    return next_fun(*args, **kwargs)

  plain = head.apply(variables, x, key_mask)
  with nn.intercept_methods(grab_out_input):
    y, probs = head.apply(variables, x, key_mask, return_probs=True)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(plain))
  assert probs.shape == (3, HEADS, 9)
  np.testing.assert_allclose(np.asarray(probs.sum(-1)), 1.0, atol=1e-6)
  assert float(jnp.abs(jnp.where(key_mask[:, None], 0.0, probs)).max()) == 0.0
  kv = variables["params"]["kv"]
  v = jnp.einsum("bnc,chd->bnhd", x, kv["kernel"][:, 1]) + kv["bias"][1]
  weighted = jnp.einsum("bhn,bnhd->bhd", probs, v)
  np.testing.assert_allclose(np.asarray(weighted), np.asarray(seen["pre_out"][:, 0]), atol=1e-5)


@pytest.mark.parametrize("include_prefix", [False, True])
def test_map_attention_in_aux_covers_the_pooled_tokens(include_prefix):
  model = vit.VisionTransformer(num_classes=3, patch_size=(PATCH, PATCH), width=WIDTH, depth=1,
                                num_heads=HEADS, pool_type="map", class_token=True,
                                num_registers=1, pool_include_prefix=include_prefix)
  images = jnp.asarray(np.random.default_rng(1).standard_normal((2, IMAGE, IMAGE, 3)),
                       jnp.float32)
  variables = model.init(jax.random.key(1), images)
  _, aux = model.apply(variables, images)
  n = GRID * GRID + (2 if include_prefix else 0)
  assert aux["map_attention"].shape == (2, n)
  np.testing.assert_allclose(np.asarray(aux["map_attention"].sum(-1)), 1.0, atol=1e-6)
  gap = model.clone(pool_type="gap", class_token=None)
  _, gap_aux = gap.apply(gap.init(jax.random.key(1), images), images)
  assert "map_attention" not in gap_aux


# ------------------------------------------------------------------------------------------
# The activation field, its errors, and ModelContext.activation.
# ------------------------------------------------------------------------------------------


def test_mlp_activations_are_the_published_functions():
  x = jnp.linspace(-5.0, 5.0, 101)
  erf = np.asarray(jax.scipy.special.erf(x / np.sqrt(2.0)))
  np.testing.assert_allclose(layers.mlp_activation("gelu")(x), 0.5 * x * (1 + erf), atol=1e-6)
  np.testing.assert_allclose(layers.mlp_activation(None)(x), layers.mlp_activation("gelu")(x))
  tanh = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
  np.testing.assert_allclose(layers.mlp_activation("gelu_tanh")(x), tanh, atol=1e-6)
  np.testing.assert_allclose(layers.mlp_activation(None, True)(x), tanh, atol=1e-6)
  with torch.no_grad():
    quick = timm.layers.QuickGELU()(torch.from_numpy(np.array(x))).numpy()
  np.testing.assert_allclose(layers.mlp_activation("quick_gelu")(x), quick, atol=1e-6)


@pytest.mark.parametrize("activation,approximate", [
    (None, False), (None, True), ("gelu", False), ("gelu_tanh", False), ("gelu_tanh", True),
    ("quick_gelu", False)])
def test_model_context_activation_is_the_vits_mlp(activation, approximate):
  model = vit.VisionTransformer(num_classes=0, patch_size=(PATCH, PATCH), width=WIDTH, depth=1,
                                num_heads=HEADS, pool_type="map", mlp_activation=activation,
                                gelu_approximate=approximate)
  ctx = model.context()
  assert ctx.mlp_activation == activation and ctx.gelu_approximate == approximate
  images = jnp.asarray(np.random.default_rng(2).standard_normal((2, IMAGE, IMAGE, 3)),
                       jnp.float32)
  variables = model.init(jax.random.key(2), images)
  _, state = model.apply(variables, images, capture_intermediates=True, mutable=["intermediates"])
  inter, params = state["intermediates"], variables["params"]
  for mlp in ("block_00/mlp", "map_head/mlp"):
    scope_i, scope_p = inter, params
    for part in mlp.split("/"):
      scope_i, scope_p = scope_i[part], scope_p[part]
    hidden = scope_i["fc1"]["__call__"][0]
    fc2 = scope_p["fc2"]
    want = scope_i["__call__"][0]
    np.testing.assert_allclose(np.asarray(ctx.activation(hidden) @ fc2["kernel"] + fc2["bias"]),
                               np.asarray(want), atol=1e-5, err_msg=mlp)
  h = jnp.asarray(np.random.default_rng(3).standard_normal((5, 7)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(ctx.activation(h)),
                                np.asarray(layers.mlp_activation(activation, approximate)(h)))
  np.testing.assert_array_equal(np.asarray(ctx.gelu(h)),  # gelu() keeps its old meaning
                                np.asarray(nn.gelu(h, approximate=approximate)))
  assert rbase.ModelContext(width=8, num_heads=1, mlp_dim=8, depth=1).mlp_activation is None


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_gelu_approximate_contradicting_mlp_activation_is_a_config_error(activation):
  model = vit.VisionTransformer(num_classes=0, patch_size=(PATCH, PATCH), width=WIDTH, depth=1,
                                num_heads=HEADS, mlp_activation=activation, gelu_approximate=True)
  with pytest.raises(ConfigError, match=f"gelu_approximate=True.*mlp_activation='{activation}'"):
    model.init(jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3)))


def test_unknown_mlp_activation_is_a_config_error():
  with pytest.raises(ConfigError, match="mlp_activation must be one of.*'swish'"):
    vit.Model(0, variant="Ti/16", depth=1, mlp_activation="swish").init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


# ------------------------------------------------------------------------------------------
# big_vision SigLIP two-tower `.npz`: the image tower under params/img/.
# ------------------------------------------------------------------------------------------

EMBED = 24  # a two-tower's joint embedding size (the image tower's head)
MHA = "MultiHeadDotProductAttention_0"


def _siglip_image_tower(seed, *, head: bool, scanned: bool):
  """Random big_vision-named params of a SigLIP image tower (vit.py with pool_type='map')."""
  rng = np.random.default_rng(seed)
  normal = lambda shape, std: (rng.standard_normal(shape) * std).astype(np.float32)
  d = WIDTH // HEADS
  ck = {"embedding/kernel": normal((PATCH, PATCH, 3, WIDTH), 0.05),
        "embedding/bias": normal((WIDTH,), 0.05),
        "pos_embedding": normal((1, GRID * GRID, WIDTH), 0.2)}

  def ln(prefix):
    ck[f"{prefix}/scale"] = 1.0 + normal((WIDTH,), 0.1)
    ck[f"{prefix}/bias"] = normal((WIDTH,), 0.05)

  def mha(prefix, qk_std=0.1):
    for name in ("query", "key", "value"):
      std = qk_std if name != "value" else 0.1
      ck[f"{prefix}/{name}/kernel"] = normal((WIDTH, HEADS, d), std)
      ck[f"{prefix}/{name}/bias"] = normal((HEADS, d), 0.05)
    ck[f"{prefix}/out/kernel"] = normal((HEADS, d, WIDTH), 0.08)
    ck[f"{prefix}/out/bias"] = normal((WIDTH,), 0.05)

  def mlp(prefix):
    ck[f"{prefix}/Dense_0/kernel"], ck[f"{prefix}/Dense_0/bias"] = normal((WIDTH, MLP), 0.08), \
        normal((MLP,), 0.05)
    ck[f"{prefix}/Dense_1/kernel"], ck[f"{prefix}/Dense_1/bias"] = normal((MLP, WIDTH), 0.05), \
        normal((WIDTH,), 0.05)

  for i in range(DEPTH):
    block = f"Transformer/encoderblock_{i}"
    ln(f"{block}/LayerNorm_0")
    mha(f"{block}/{MHA}")
    ln(f"{block}/LayerNorm_1")
    mlp(f"{block}/MlpBlock_0")
  ln("Transformer/encoder_norm")
  ck["MAPHead_0/probe"] = normal((1, 1, WIDTH), 1.0)
  mha(f"MAPHead_0/{MHA}", qk_std=0.3)  # a probe attention far from uniform
  ln("MAPHead_0/LayerNorm_0")
  mlp("MAPHead_0/MlpBlock_0")
  if head:
    ck["head/kernel"], ck["head/bias"] = normal((WIDTH, EMBED), 0.2), normal((EMBED,), 0.1)
  if scanned:  # as SigLIP's released checkpoints: the layers stacked under encoderblock/
    first = "Transformer/encoderblock_0/"
    for key in [k for k in ck if k.startswith(first)]:
      name = key[len(first):]
      ck[f"Transformer/encoderblock/{name}"] = np.stack(
          [ck.pop(f"Transformer/encoderblock_{i}/{name}") for i in range(DEPTH)])
  return ck


def _two_tower_npz(path, tower):
  """A SigLIP training-style npz: params/img/..., a text tower and the loss's t and b."""
  arrays = {f"params/img/{k}": v for k, v in tower.items()}
  arrays["params/txt/Embed_0/embedding"] = np.ones((11, 8), np.float32)
  arrays["params/txt/head/kernel"] = np.ones((8, EMBED), np.float32)
  arrays["params/t"], arrays["params/b"] = np.full((1,), 2.3, np.float32), np.full((1,), -10.0,
                                                                                   np.float32)
  np.savez(path, **arrays)
  return str(path)


def _timm_siglip_from_npz(path, num_classes):
  """timm's SigLIP with big_vision's tanh GELU, filled by timm's own big_vision npz loader."""
  model = timm_vit.VisionTransformer(**SMALL, mlp_ratio=MLP / WIDTH, class_token=False,
                                     global_pool="map", act_layer="gelu_tanh",
                                     num_classes=num_classes)
  timm_vit._load_weights(model, path)  # pylint: disable=protected-access
  return model.eval()


# id -> (checkpoint has a head, scanned layers, how the path is given, num_classes override)
BIG_VISION_CASES = {
    "head_scanned_auto": (True, True, "", None),
    "head_prefix_img": (True, False, ":img", None),
    "no_head": (False, True, "", None),
    "features_only": (True, True, ":img", 0),
}


@pytest.mark.parametrize("case", list(BIG_VISION_CASES))
def test_big_vision_siglip_two_tower_matches_timm_loader(case, tmp_path):
  has_head, scanned, suffix, num_classes = BIG_VISION_CASES[case]
  tower = _siglip_image_tower(7, head=has_head, scanned=scanned)
  path = _two_tower_npz(tmp_path / "siglip.npz", tower)
  overrides = {} if num_classes is None else {"num_classes": num_classes}
  module, params = from_big_vision(path + suffix, num_heads=HEADS, **overrides)
  out_dim = EMBED if has_head and num_classes is None else 0
  assert (module.pool_type, module.num_prefix, module.gelu_approximate) == ("map", 0, True)
  assert module.num_classes == out_dim and ("head" in params) == bool(out_dim)

  reference = _timm_siglip_from_npz(path, out_dim)
  x = _images(3)
  ref, got = _run_timm(reference, x), _run_vitoken(module, params, x)
  assert got["out"].shape == (2, out_dim or WIDTH)
  assert _max_diff(got["out"], ref["out"]) < TOL, case
  for i in range(DEPTH):
    assert _max_diff(got["blocks"][f"block_{i:02d}"], ref["blocks"][i]) < TOL, (case, i)
  assert got["map_attention"].max() > 1.5 / GRID ** 2
  assert _max_diff(got["map_attention"], ref["map_attention"]) < 1e-5, case


def test_quick_gelu_model_is_not_exported_to_big_vision():
  model = vit.VisionTransformer(num_classes=0, patch_size=(PATCH, PATCH), width=WIDTH, depth=1,
                                num_heads=HEADS, pool_type="map", mlp_activation="quick_gelu")
  with pytest.raises(ValueError, match="QuickGELU"):
    to_big_vision(model, {})


def test_big_vision_two_tower_missing_tower_names_the_towers(tmp_path):
  path = _two_tower_npz(tmp_path / "siglip.npz", _siglip_image_tower(8, head=False,
                                                                     scanned=False))
  with pytest.raises(ValueError, match=r"'image/'.*'params/img/'.*'params/txt/'"):
    from_big_vision(path + ":image", num_heads=HEADS)
