"""Bad input gets a ValueError that names the problem, before XLA sees it."""
import jax
import jax.numpy as jnp
import pytest

from vitoken.models import vit


def _init(model, shape=(1, 32, 32, 3)):
  return model.init(jax.random.key(0), jnp.zeros(shape))


SMALL = dict(variant="Ti/8", depth=1)


@pytest.mark.parametrize("shape,pattern", [
    ((32, 32, 3), r"images must be \[batch, height, width, channels\], got shape \(32, 32, 3\)"),
    ((1, 32, 32, 1), "images have 1 channels, the model takes 3"),
    ((1, 3, 32, 32), "looks like NCHW; vitoken takes NHWC"),
    ((1, 30, 32, 3), "patch size 8x8 does not divide the image size 30x32"),
])
def test_bad_images(shape, pattern):
  with pytest.raises(ValueError, match=pattern):
    _init(vit.Model(3, **SMALL), shape)


def test_image_size_other_than_the_posemb_was_made_for():
  model = vit.Model(3, **SMALL)
  variables = _init(model)
  with pytest.raises(ValueError, match=r"pos_embedding has shape \(1, 16, 192\) but images of 6x6 patches need"):
    model.apply(variables, jnp.zeros((1, 48, 48, 3)))


@pytest.mark.parametrize("kw,pattern", [
    (dict(variant="X/16"), "unknown ViT variant 'X/16'"),
    (dict(variant="B/x"), "bad patch size in variant 'B/x'"),
    (dict(variant="B/16", colour="red"), r"unknown ViT option key 'colour'; allowed keys: \['attention_impl'"),
])
def test_bad_model_options(kw, pattern):
  with pytest.raises(ValueError, match=pattern):
    vit.Model(3, **kw)


@pytest.mark.parametrize("kw,pattern", [
    (dict(pool_type="max"), "pool_type must be one of"),
    (dict(posemb="rope"), "posemb must be one of"),
    (dict(pool_type="tok", class_token=False), "reads the class token"),
    (dict(num_heads=5), "width 192 is not divisible by num_heads 5"),
    (dict(attention_impl="flash"), "attention implementation must be one of"),
    (dict(remat_policy="sometimes"), "unknown remat_policy 'sometimes'"),
    (dict(token_reduction={"method": "magic"}), "unknown token_reduction method 'magic'"),
])
def test_bad_fields_fail_at_init(kw, pattern):
  with pytest.raises(ValueError, match=pattern):
    _init(vit.Model(3, **{**SMALL, **kw}))
