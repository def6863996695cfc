"""vlm.VisualTokenizer: features of the chosen block, compressors inside the encoder and after
it, the projector, a frozen encoder, static K, and errors that name the setting."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitoken import vlm
from vitoken.errors import ConfigError, InputError
from vitoken.models import vit
from vitoken.models.reducers import compression

DEPTH = 4


@pytest.fixture(scope="module")
def encoder():
  model = vit.VisionTransformer(num_classes=10, patch_size=(4, 4), width=32, depth=DEPTH,
                                num_heads=4)
  images = jnp.asarray(np.random.RandomState(0).rand(2, 16, 16, 3).astype(np.float32))
  return model, model.init(jax.random.key(0), images)["params"], images


def tokens_of(encoder, compressor=None, params=None, **kw):
  model, enc_params, images = encoder
  tok = vlm.VisualTokenizer(encoder=model, compressor=compressor, **kw)
  own = tok.init(jax.random.key(1), images)["params"]
  variables = {"params": {**own, "encoder": enc_params if params is None else params}}
  return tok, variables, tok.apply(variables, images)


def reference(encoder, layer):
  """The block's output and its class row of attention (mean over heads), unreduced."""
  model, params, images = encoder
  _, aux = model.clone(return_attention=True).apply({"params": params}, images)
  name = f"block_{layer:02d}"
  return aux["blocks"][name], aux["attention"][name][:, :, 0].mean(axis=1)


@pytest.mark.parametrize("feature_layer,block", [(-2, DEPTH - 2), (-1, DEPTH - 1), (0, 0), (1, 1)])
def test_features_are_the_chosen_blocks_patches(encoder, feature_layer, block):
  _, _, (tokens, aux) = tokens_of(encoder, feature_layer=feature_layer)
  want, _ = reference(encoder, block)
  np.testing.assert_allclose(tokens, want[:, 1:], atol=1e-5)
  np.testing.assert_array_equal(aux["ids"], np.broadcast_to(np.arange(1, 17), (2, 16)))
  _, _, (with_prefix, _) = tokens_of(encoder, feature_layer=feature_layer, drop_prefix=False)
  np.testing.assert_allclose(with_prefix, want, atol=1e-5)


def test_blocks_after_the_feature_block_never_run(encoder):
  model, params, _ = encoder
  trimmed = {k: v for k, v in params.items() if k not in ("block_03", "head")}
  _, _, (tokens, _) = tokens_of(encoder, params=trimmed, feature_layer=-2)
  _, _, (full, _) = tokens_of(encoder, feature_layer=-2)
  np.testing.assert_array_equal(tokens, full)


def test_cls_topk_in_the_encoder_is_fastervlm_on_the_features(encoder):
  _, _, (tokens, aux) = tokens_of(encoder, {"method": "cls_topk", "num_tokens": 5})
  features, cls_attn = reference(encoder, DEPTH - 2)
  want, ids = compression.cls_topk(features, cls_attn, 5)
  np.testing.assert_allclose(tokens, want, atol=1e-5)
  np.testing.assert_array_equal(aux["ids"], ids)
  np.testing.assert_allclose(aux["scores"], cls_attn[:, 1:], atol=1e-6)


def test_visionzip_in_the_encoder_keeps_the_class_token_among_its_dominant(encoder):
  _, _, (tokens, aux) = tokens_of(encoder, {"method": "visionzip", "dominant": 4, "contextual": 3})
  assert tokens.shape == (2, 7, 32)
  np.testing.assert_array_equal(aux["ids"][:, 0], 0)
  np.testing.assert_allclose(aux["size"].sum(axis=1), 17.0)  # every token stands somewhere


@pytest.mark.parametrize("compressor", [{"method": "cls_topk", "num_tokens": 16},
                                        {"method": "pool", "num_tokens": 16}])
def test_k_equal_to_the_patches_is_the_identity(encoder, compressor):
  _, _, (tokens, aux) = tokens_of(encoder, compressor)
  _, _, (plain, _) = tokens_of(encoder)
  np.testing.assert_allclose(tokens, plain, atol=1e-6)
  np.testing.assert_array_equal(aux["ids"], np.broadcast_to(np.arange(1, 17), (2, 16)))


def test_pool_runs_after_the_projector(encoder):
  tok, variables, (tokens, _) = tokens_of(encoder, {"method": "pool", "num_tokens": 4},
                                          projector=24)
  _, _, (features, _) = tokens_of(encoder)
  projected = vlm.Projector(24).apply({"params": variables["params"]["projector"]}, features)
  want = projected.reshape(2, 2, 2, 2, 2, 24).mean(axis=(2, 4)).reshape(2, 4, 24)
  np.testing.assert_allclose(tokens, want, atol=1e-5)


def test_projector_is_llava_mlp2x_gelu(encoder):
  _, variables, (tokens, _) = tokens_of(encoder, projector={"width": 24})
  _, _, (features, _) = tokens_of(encoder)
  p = variables["params"]["projector"]
  h = np.asarray(features) @ np.asarray(p["fc1"]["kernel"]) + np.asarray(p["fc1"]["bias"])
  from scipy.special import erf
  h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
  want = h @ np.asarray(p["fc2"]["kernel"]) + np.asarray(p["fc2"]["bias"])
  np.testing.assert_allclose(tokens, want, atol=1e-5)


def test_prumerge_scores_with_the_next_blocks_query_and_key(encoder):
  model, params, images = encoder
  _, _, (tokens, aux) = tokens_of(encoder, {"method": "prumerge", "num_tokens": 4,
                                            "neighbours": 5}, feature_layer=1)
  features, _ = reference(encoder, 1)
  block = params["block_02"]
  x = np.asarray(features, np.float64)
  y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  y = y * np.asarray(block["norm1"]["scale"]) + np.asarray(block["norm1"]["bias"])
  kernel, bias = np.asarray(block["attn"]["qkv"]["kernel"]), np.asarray(block["attn"]["qkv"]["bias"])
  q = (y @ kernel[:, 0].reshape(32, -1)) + bias[0].reshape(-1)
  k = (y @ kernel[:, 1].reshape(32, -1)) + bias[1].reshape(-1)
  logits = q @ k.transpose(0, 2, 1) / np.sqrt(32)
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  np.testing.assert_allclose(aux["scores"], attn[:, 0, 1:], atol=1e-5)
  want, ids, mask, _ = compression.prumerge(features, jnp.asarray(q, jnp.float32),
                                            jnp.asarray(k, jnp.float32), neighbours=5,
                                            num_tokens=4)
  np.testing.assert_allclose(tokens, want, atol=1e-4)
  assert tokens.shape == (2, 5, 32) and np.asarray(mask).all()


def test_the_encoder_is_frozen_unless_asked(encoder):
  model, params, images = encoder
  for frozen in (True, False):
    tok = vlm.VisualTokenizer(encoder=model, compressor={"method": "token_learner",
                                                         "num_tokens": 4}, frozen=frozen)
    own = tok.init(jax.random.key(1), images)["params"]

    def loss(p):
      tokens, _ = tok.apply({"params": p}, images)
      return jnp.sum(tokens ** 2)

    grads = jax.grad(loss)({**own, "encoder": params})
    enc_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["encoder"]))
    tl_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["token_learner"]))
    assert tl_norm > 0
    assert (enc_norm == 0) == frozen, (frozen, enc_norm)


def test_one_compile_per_token_count(encoder):
  model, params, images = encoder
  traces = []

  def run(k):
    tok = vlm.VisualTokenizer(encoder=model, compressor={"method": "cls_topk", "num_tokens": k})

    @jax.jit
    def f(p, x):
      traces.append(k)
      return tok.apply({"params": {"encoder": p}}, x)[0]
    return f

  fns = {k: run(k) for k in (2, 4)}
  for _ in range(2):
    for k, f in fns.items():
      assert f(params, images).shape == (2, k, 32)
  assert sorted(traces) == [2, 4]


def test_bad_settings_name_themselves(encoder):
  model, params, images = encoder
  cases = [
      (dict(compressor={"method": "cls_topk", "num_tokens": 17}), r"num_tokens=17 .* 16 tokens"),
      (dict(compressor={"method": "pool", "num_tokens": 8}), r"pool: num_tokens=8 needs a square"),
      (dict(feature_layer=4), r"feature_layer=4 is outside the encoder's 4 blocks"),
      (dict(feature_layer=-5), r"feature_layer=-5"),
      (dict(compressor={"method": "visionzip", "dominant": 4, "contextual": 3, "num_tokens": 8}),
       r"num_tokens=8 but dominant=4 \+ contextual=3"),
      (dict(compressor={"method": "prumerge", "neighbours": 16}), r"neighbours=16"),
      (dict(compressor={"method": "prumerge"}, feature_layer=-1), r"block after the feature"),
      (dict(compressor={"method": "cls_topk", "num_tokns": 3}), r"num_tokns"),
      (dict(compressor={"method": "fastervlm"}), r"compressor method 'fastervlm'"),
      (dict(compressor=[{"method": "pool", "num_tokens": 4}, {"method": "token_learner"}]),
       r"pool runs after the projector"),
      (dict(compressor=[{"method": "token_learner"}, {"method": "cls_topk"}]),
       r"act inside the encoder"),
  ]
  for kw, match in cases:
    with pytest.raises(ConfigError, match=match):
      tok = vlm.VisualTokenizer(encoder=model, **kw)
      tok.init(jax.random.key(1), images)
  gap = model.clone(pool_type="gap", class_token=False)
  with pytest.raises(ConfigError, match="neither a class token nor a MAP head"):
    vlm.VisualTokenizer(encoder=gap, compressor={"method": "cls_topk", "num_tokens": 4}).init(
        jax.random.key(1), images)
  with pytest.raises(InputError, match="'quecc' compresses with the question: pass text="):
    vlm.VisualTokenizer(encoder=model, compressor={"method": "quecc", "num_tokens": 4}).init(
        jax.random.key(1), images)


def test_a_map_head_encoder_scores_patches_by_the_probe_over_the_last_block():
  """SigLIP-style (no class token, MAP head): cls_topk keeps the feature block's patches the
  MAP probe attends to most in the last block, position for position."""
  model = vit.VisionTransformer(num_classes=0, patch_size=(4, 4), width=32, depth=DEPTH,
                                num_heads=4, pool_type="map", class_token=False)
  images = jnp.asarray(np.random.RandomState(1).rand(2, 16, 16, 3).astype(np.float32))
  params = model.init(jax.random.key(0), images)["params"]
  params = jax.tree.map(lambda a: a, params)
  params["map_head"]["probe"] = params["map_head"]["probe"] * 30.0  # far from uniform
  _, aux = model.apply({"params": params}, images)
  scores = aux["map_attention"]
  tok = vlm.VisualTokenizer(encoder=model, compressor={"method": "cls_topk", "num_tokens": 5})
  tokens, got = tok.apply({"params": {"encoder": params}}, images)
  features = aux["blocks"][f"block_{DEPTH - 2:02d}"]
  want, ids = compression.cls_topk(features, scores, 5, num_prefix=0)
  np.testing.assert_allclose(tokens, want, atol=1e-5)
  np.testing.assert_array_equal(got["ids"], ids)
  np.testing.assert_allclose(got["scores"], scores, atol=1e-6)
  assert len(set(map(tuple, np.asarray(ids)))) == 2  # the two images keep different patches


def test_visionzip_on_a_map_head_encoder_takes_its_dominant_tokens_among_the_patches():
  model = vit.VisionTransformer(num_classes=0, patch_size=(4, 4), width=32, depth=DEPTH,
                                num_heads=4, pool_type="map", class_token=False)
  images = jnp.asarray(np.random.RandomState(2).rand(2, 16, 16, 3).astype(np.float32))
  params = model.init(jax.random.key(0), images)["params"]
  tok = vlm.VisualTokenizer(encoder=model, compressor={"method": "visionzip", "dominant": 4,
                                                       "contextual": 2})
  tokens, aux = tok.apply({"params": {"encoder": params}}, images)
  _, full = model.clone(return_attention=True).apply({"params": params}, images)
  assert tokens.shape == (2, 6, 32) and (np.asarray(aux["ids"]) >= 0).all()
  top4 = np.sort(np.argsort(-np.asarray(full["map_attention"]), axis=1, kind="stable")[:, :4], 1)
  np.testing.assert_array_equal(aux["ids"][:, :4], top4)
  np.testing.assert_allclose(aux["size"].sum(axis=1), 16.0)


def test_a_resampler_with_more_queries_uses_the_first_ones(encoder):
  """MQT-LLaVA: a resampler of M queries read at K < M gives the first K of its M outputs."""
  tok, variables, (all_m, _) = tokens_of(encoder, {"method": "resampler", "num_tokens": 16,
                                                   "num_heads": 4})
  model, _, images = encoder
  fewer = vlm.VisualTokenizer(encoder=model, compressor={"method": "resampler", "num_tokens": 4,
                                                          "queries": 16, "num_heads": 4})
  first, _ = fewer.apply(variables, images)
  np.testing.assert_allclose(first, all_m[:, :4], atol=1e-5)
  masked, aux = tok.apply(variables, images, query_count=jnp.int32(4))
  np.testing.assert_allclose(masked[:, :4], all_m[:, :4], atol=1e-5)
  np.testing.assert_array_equal(aux["mask"], np.broadcast_to(np.arange(16) < 4, (2, 16)))


def test_prumerge_keeping_no_patch_gives_the_score_weighted_sum_of_all():
  """K = 1 for the fixed PruMerge: no kept patch, only the extra token, which then sums every
  patch weighted by its class-attention score."""
  rng = np.random.RandomState(4)
  x = jnp.asarray(rng.randn(2, 17, 8).astype(np.float32))
  q, k = (jnp.asarray(rng.randn(2, 17, 8).astype(np.float32)) for _ in range(2))
  tokens, ids, mask, scores = compression.prumerge(x, q, k, neighbours=4, num_tokens=0)
  assert tokens.shape == (2, 1, 8) and np.asarray(mask).all() and (np.asarray(ids) == -1).all()
  np.testing.assert_allclose(tokens[:, 0], np.einsum("bn,bnc->bc", scores, x[:, 1:]), atol=1e-5)
