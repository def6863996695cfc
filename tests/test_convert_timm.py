"""Parity of converted timm ViTs with timm itself (the PyTorch reference), fp32 on CPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vitoken.convert import from_timm
from vitoken.convert.torch_reference import import_timm
from vitoken.models import layout

timm = import_timm()
TOL = 1e-4


def _random_timm(name, seed=0, **kw):
  """A timm model with every weight perturbed, so no zero-init (head, cls) hides a mistake."""
  torch.manual_seed(seed)
  model = timm.create_model(name, pretrained=False, **kw).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model


def _images(model, batch=2, seed=0):
  h, w = model.patch_embed.img_size
  return np.random.RandomState(seed).randn(batch, 3, h, w).astype(np.float32)


def _max_diff(module, params, model, x):
  with torch.no_grad():
    ref = model(torch.from_numpy(x)).numpy()
  out, _ = jax.jit(module.apply)({"params": params}, x.transpose(0, 2, 3, 1))
  return float(np.abs(np.asarray(out) - ref).max())


@pytest.mark.parametrize("name,kw", [
    ("vit_tiny_patch16_224", {}),
    ("vit_small_patch16_224", {}),
    ("vit_base_patch16_224", {}),
    ("vit_small_patch16_224", {"global_pool": "avg"}),
    ("vit_tiny_patch16_224", {"global_pool": "avg", "class_token": False}),
    ("vit_small_patch8_224", {"img_size": 64}),
    ("vit_base_patch32_224", {}),
    ("vit_tiny_patch16_224", {"reg_tokens": 4, "global_pool": "avg", "no_embed_class": True}),
    ("vit_tiny_patch16_224", {"reg_tokens": 2}),
    ("vit_tiny_patch16_224", {"global_pool": "map", "class_token": False}),
    ("vit_tiny_patch16_224", {"init_values": 1e-5, "no_embed_class": True, "pre_norm": True}),
    ("vit_tiny_patch16_224", {"img_size": (160, 224)}),
], ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_logits_match_timm(name, kw):
  model = _random_timm(name, **kw)
  module, params = from_timm(model)
  diff = _max_diff(module, params, model, _images(model))
  print(f"{name} {kw}: max abs logit diff {diff:.2e}")
  assert diff < TOL


def test_state_dict_gives_same_model_as_module():
  model = _random_timm("vit_tiny_patch16_224", reg_tokens=1)
  m1, p1 = from_timm(model)
  m2, p2 = from_timm(model.state_dict())
  assert (m1.pool_type, m1.num_registers, m1.posemb_prefix) == (m2.pool_type, m2.num_registers, m2.posemb_prefix)
  jax.tree.map(np.testing.assert_array_equal, p1, p2)
  assert _max_diff(m2, p2, model, _images(model)) < TOL


def test_image_size_resizes_posemb_like_timm():
  from timm.layers import resample_abs_pos_embed
  model = _random_timm("vit_tiny_patch16_224")
  module, params = from_timm(model, image_size=160)
  expected = resample_abs_pos_embed(model.pos_embed, (10, 10), (14, 14), num_prefix_tokens=1)
  np.testing.assert_allclose(params["pos_embedding"], expected.detach().numpy(), atol=1e-6)
  # The resized model equals timm run at the new size with the same resampled table.
  small = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=160).eval()
  sd = dict(model.state_dict(), pos_embed=expected)
  small.load_state_dict(sd)
  assert _max_diff(module, params, small, _images(small)) < TOL


def test_overrides_scan_and_identity_reduction_keep_logits():
  model = _random_timm("vit_tiny_patch16_224")
  x = _images(model)
  base = _max_diff(*from_timm(model), model, x)
  scanned, sparams = from_timm(model, scan=True, token_reduction={"method": "identity"})
  assert "blocks" in sparams and scanned.scan
  assert _max_diff(scanned, sparams, model, x) < TOL
  unscanned = layout.to_unscanned(sparams)
  jax.tree.map(np.testing.assert_array_equal, unscanned, from_timm(model)[1])
  assert base < TOL


def test_bf16_override_runs_close_and_keeps_fp32_params():
  model = _random_timm("vit_tiny_patch16_224")
  module, params = from_timm(model, dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  with torch.no_grad():
    ref = model(torch.from_numpy(_images(model))).numpy()
  out, _ = module.apply({"params": params}, _images(model).transpose(0, 2, 3, 1))
  assert out.dtype == jnp.float32
  assert np.abs(np.asarray(out) - ref).max() < 0.05 * np.abs(ref).max()


def test_shape_mismatch_is_a_clear_error():
  sd = _random_timm("vit_tiny_patch16_224").state_dict()
  sd["blocks.3.mlp.fc2.bias"] = torch.zeros(7)
  with pytest.raises(ValueError, match=r"block_03/mlp/fc2/bias: checkpoint \(7,\) vs model \(192,\)"):
    from_timm(sd)


def test_unplaceable_and_foreign_weights_are_rejected():
  sd = _random_timm("vit_tiny_patch16_224").state_dict()
  with pytest.raises(ValueError, match="cannot place.*blocks.0.attn.q_norm.weight"):
    from_timm(dict(sd, **{"blocks.0.attn.q_norm.weight": torch.ones(64)}))
  with pytest.raises(ValueError, match="not a timm VisionTransformer"):
    from_timm({"conv1.weight": torch.ones(3)})
  with pytest.raises(ValueError, match="takes a timm model or a state dict"):
    from_timm(42)


def test_contradicting_architecture_override_is_rejected():
  with pytest.raises(ValueError, match="contradict the checkpoint"):
    from_timm(_random_timm("vit_tiny_patch16_224"), depth=6)


def test_nonstandard_width_state_dict_needs_num_heads():
  model = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=96, num_heads=4,
                            depth=2).eval()
  with pytest.raises(ValueError, match="num_heads"):
    from_timm(model.state_dict())
  module, params = from_timm(model.state_dict(), num_heads=4)
  assert _max_diff(module, params, model, _images(model)) < TOL


@pytest.mark.parametrize("reduction,fresh", [
    ({"method": "token_learner", "num_tokens": 4, "loc": 1}, {"block_01/token_learner"}),
    ({"method": "token_learner", "num_tokens": 4, "loc": 2, "mode": "fuser"},
     {"block_02/token_learner", "block_03/token_learner"}),
    ({"method": "lookup", "grid": 2}, {f"block_{i:02d}/lookup" for i in range(4)}),
])
def test_learned_reducers_start_from_their_initialisers_on_converted_weights(reduction, fresh):
  model = _random_timm("vit_tiny_patch16_224", depth=4, img_size=64)
  dense_module, dense = from_timm(model)
  module, params = from_timm(model, token_reduction=reduction)
  flat = lambda t: {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
                    for path, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  got, want = flat(params), flat(dense)
  # Every converted weight is kept; only the reducer's own modules are new, and they are the
  # module's initialisers (e.g. the fuser's zero mixing kernel), not zeros everywhere.
  assert all(np.array_equal(got[k], v) for k, v in want.items())
  new = {k for k in got if k not in want}
  assert new and {"/".join(k.split("/")[:2]) for k in new} == fresh
  init = flat(jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"])
  assert all(np.array_equal(got[k], init[k]) for k in new)
  assert any(np.abs(got[k]).max() > 0 for k in new)
  logits, _ = module.apply({"params": params}, _images(model).transpose(0, 2, 3, 1))
  assert np.isfinite(np.asarray(logits)).all()
