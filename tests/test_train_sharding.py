"""Meshes and regex sharding rules: placement by path, scanned layers, sharded-at-birth init."""
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from vitoken.engine import sharding
from vitoken.models import vit


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.mark.parametrize("cfg,shape", [
    ({"data": -1}, (8, 1, 1)), ({"data": 4, "fsdp": 2}, (4, 2, 1)), ({"data": 2, "fsdp": 2, "tensor": 2}, (2, 2, 2)),
    ({"data": 1}, (1, 1, 1)), ({"fsdp": -1, "tensor": 2}, (1, 4, 2))])
def test_make_mesh_shapes(cfg, shape):
  m = sharding.make_mesh(cfg)
  assert tuple(m.shape[a] for a in sharding.AXES) == shape
  assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)


@pytest.mark.parametrize("cfg,pattern", [
    ({"data": 3}, "needs 3 devices"), ({"data": -1, "fsdp": -1}, "at most one -1"),
    ({"data": -1, "fsdp": 3}, "does not fit 8 devices"), ({"pipeline": 2}, "unknown mesh config key 'pipeline'")])
def test_bad_meshes(cfg, pattern):
  with pytest.raises(ValueError, match=pattern):
    sharding.make_mesh(cfg)


@pytest.mark.parametrize("path,shape,spec", [
    ("params/block_03/attn/qkv/kernel", (64, 3, 4, 16), P("fsdp", None, "tensor", None)),
    ("opt_state/0/mu/block_03/attn/qkv/kernel", (64, 3, 4, 16), P("fsdp", None, "tensor", None)),
    ("params/blocks/attn/qkv/kernel", (6, 64, 3, 4, 16), P(None, "fsdp", None, "tensor", None)),
    ("params/block_00/mlp/fc1/kernel", (64, 256), P("fsdp", "tensor")),
    ("params/block_00/mlp/fc2/kernel", (256, 64), P("tensor", "fsdp")),
    ("params/block_00/norm1/scale", (64,), P(None)),
    ("params/head/kernel", (64, 10), P("fsdp", None)),
    ("params/block_00/attn/qkv/kernel", (64, 3, 3, 16), P("fsdp", None, None, None)),  # 3 heads on 2
    ("step", (), P()),
])
def test_rules_place_leaves_by_path(mesh, path, shape, spec):
  assert sharding.spec_for(path, shape, mesh, vit.SHARDING_RULES) == spec


def test_init_sharded_creates_the_state_in_place(mesh):
  model = vit.Model(10, variant="Ti/8", width=64, num_heads=4, depth=2, mlp_dim=128)
  init = lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  state, shardings = sharding.init_sharded(init, mesh, vit.SHARDING_RULES)
  qkv = state["params"]["block_00"]["attn"]["qkv"]["kernel"]
  assert qkv.sharding.spec == P("fsdp", None, "tensor", None)
  assert qkv.addressable_shards[0].data.shape == (32, 3, 2, 16)
  reference = init()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6), state, reference)
  assert jax.tree.structure(shardings) == jax.tree.structure(state)


def test_global_batch_is_split_over_batch_axes(mesh):
  local = {"image": np.arange(8 * 3, dtype=np.float32).reshape(8, 3)}
  batch = sharding.global_batch(local, sharding.batch_sharding(mesh))
  assert batch["image"].sharding.spec == P(("data", "fsdp"))
  assert batch["image"].addressable_shards[0].data.shape == (2, 3)
  np.testing.assert_array_equal(np.asarray(batch["image"]), local["image"])
