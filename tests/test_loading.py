"""Sharing a trained model takes one call: vitoken.load(path) rebuilds it from its config."""
import jax
import numpy as np
import pytest

from tests.test_train_loop import smoke_config
import vitoken
from vitoken import tasks
from vitoken.data import pipeline
from vitoken.engine import checkpoint as ckpt_lib, sharding
from vitoken.train import trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  config = smoke_config(total_steps=4, **{"model.head_zeroinit": False})
  trainer.run(config, str(workdir))
  info = pipeline.dataset_info(config.data)
  images = next(iter(pipeline.eval_iterator(config.data, global_batch_size=8)))["image"]
  reference = tasks.vit_from_config(config.model, info)
  logits = reference.apply({"params": ckpt_lib.load_params(str(workdir))}, images)[0]
  return workdir, images, np.asarray(logits)


def test_load_rebuilds_the_model_from_its_saved_config(run):
  workdir, images, want = run
  for path in (workdir, workdir / "checkpoints", workdir / "checkpoints" / "4"):
    module, params, config = vitoken.load(str(path))
    assert config.model.depth == 2 and module.depth == 2 and module.num_classes == 10
    np.testing.assert_array_equal(module.apply({"params": params}, images)[0], want)


def test_load_onto_a_mesh_places_params_by_the_rules(run):
  workdir, images, want = run
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8})
  module, params, _ = vitoken.load(str(workdir), mesh=mesh)
  kernel = params["block_00"]["mlp"]["fc1"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert len({s.device for s in kernel.addressable_shards}) == 8
  np.testing.assert_allclose(module.apply({"params": params}, images)[0], want, atol=1e-5)


def test_load_with_overrides_and_a_model_that_does_not_fit(run):
  workdir, images, want = run
  module, params, _ = vitoken.load(str(workdir), token_reduction={"method": "tome", "r": 16})
  merged = module.apply({"params": params}, images)
  assert merged[1]["state"].num_tokens == 64 - 2 * 16
  with pytest.raises(ValueError, match="(?s)checkpoint .* does not fit the model.*missing block_02"):
    vitoken.load(str(workdir), depth=3)
