"""Masked-modeling pretraining end to end (configs/masked_modeling.py on cluttered digits):
MAE and SimMIM smoke runs learn and draw reconstruction previews, fine-tuning and the linear
probe start from the pretrained encoder exactly, the probe moves only its head (optimizer
and gradients), ToMe fine-tuning from the pretrained workdir, masks that come from the input
pipeline, and the errors of bad settings."""
import os

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
import pytest

from configs import masked_modeling
from tests.test_train_loop import losses, override
from vitoken import tasks
from vitoken.data import pipeline
from vitoken.engine import checkpoint as ckpt_lib, optim, sharding
from vitoken.engine.metrics import read_jsonl
from vitoken.train import trainer

METHODS = ("mae", "simmim")
DEPTH, GRID = masked_modeling.ENCODER["depth"], 8  # 64 px digits in 8 px patches: 8x8 patches
# The fine-tuned classifier's own parameters: everything else comes from the pretraining.
FRESH = ("fc_norm/", "head/")


def mm_config(arg: str, **overrides):
  """configs/masked_modeling.py:<arg>,runlocal with synchronous checkpoints, no progress bar
  and dotted-key overrides."""
  c = masked_modeling.get_config(f"{arg},runlocal")
  c.progress_bar = False
  c.checkpoint.async_save = False
  return override(c, **overrides)


def flat(params):
  return traverse_util.flatten_dict(jax.tree.map(np.asarray, jax.device_get(params)), sep="/")


def initial_params(config, workdir):
  """The params a run of `config` in (empty) `workdir` starts from."""
  t = trainer.Trainer(config, str(workdir))
  try:
    _, state = t.initial_state(None)
    return flat(state["params"]), t
  finally:
    t.checkpointer.close()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """method -> (workdir, summary) of a runlocal pretraining (12 steps of 32), run once."""
  runs = {}

  def get(method):
    if method not in runs:
      workdir = tmp_path_factory.mktemp(f"pretrain_{method}")
      summary = trainer.run(mm_config(f"stage=pretrain,method={method}"), str(workdir))
      runs[method] = (workdir, summary)
    return runs[method]
  return get


# ------------------------------------------------------------------ 1. pretraining smoke runs


@pytest.mark.parametrize("method", METHODS)
def test_pretraining_learns_and_writes_reconstruction_previews(pretrained, method):
  workdir, summary = pretrained(method)
  assert summary["task"] == method and summary["headline"] == "loss"
  assert summary["final_step"] == 12 and summary["steps_run"] == 12
  train = losses(workdir)
  assert len(train) == 6 and all(np.isfinite(train))  # logged every 2 steps
  assert train[-1] < 0.8 * train[0], train
  # The masks hold the configured share: MAE 75% of 64 patches (48), SimMIM ceil(0.6 * 16)
  # of the 4x4 cells of 16 px (10 of 16).
  share = {"mae": 48 / 64, "simmim": 10 / 16}[method]
  np.testing.assert_allclose(losses(workdir, key="masked_share"), share, rtol=1e-6)
  evals = [r for r in read_jsonl(str(workdir / "metrics.jsonl")) if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [6, 12]
  assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in evals)
  assert summary["eval"]["examples"] == 256 and np.isfinite(summary["eval"]["loss"])
  assert summary["eval"]["loss"] == pytest.approx(evals[-1]["loss"])

  previews = workdir / "previews"
  assert sorted(os.listdir(previews)) == ["reconstructions.png", "reconstructions_000006.png",
                                          "reconstructions_000012.png"]
  # The unnumbered picture is the latest evaluation's.
  assert (previews / "reconstructions.png").read_bytes() == (
      previews / "reconstructions_000012.png").read_bytes()
  picture = np.asarray(Image.open(previews / "reconstructions.png").convert("RGB"), np.float32)
  # One row per preview example (8) of 64 px cells with 2 px gaps, upscaled by a whole factor;
  # the columns are the original, the masked input and the reconstruction(s).
  rows, side, gap = 8, 64, 2
  height, width = picture.shape[:2]
  scale = height // (rows * side + (rows - 1) * gap)
  assert scale >= 1 and height == scale * (rows * side + (rows - 1) * gap), picture.shape
  columns, rest = divmod(width // scale + gap, side + gap)
  assert width % scale == 0 and rest == 0 and columns >= 3, picture.shape
  assert picture.std() > 2
  # Each column is a real picture, not a flat fill (the masked input shows grey patches).
  col = scale * (side + gap)
  for i in range(columns):
    assert picture[:, i * col:i * col + scale * side].std() > 2, f"column {i} is blank"
  masked = picture[:scale * side, col:col + scale * side]
  assert np.isclose(masked, 128, atol=1).all(axis=-1).mean() > 0.3  # the masked patches


# ------------------------------------------------------------------ 2. fine-tuning's init


@pytest.mark.parametrize("method", METHODS)
def test_finetune_starts_from_the_pretrained_encoder_exactly(pretrained, method, tmp_path):
  workdir, _ = pretrained(method)
  c = mm_config(f"stage=finetune,init={workdir}")
  assert (c.init_from.path, c.init_from.subtree) == (str(workdir), "encoder")
  got, t = initial_params(c, tmp_path / "finetune")
  # The same run's fresh init (what initial_state makes before taking the pretrained params).
  fresh = flat(sharding.init_sharded(t._init_state, t.mesh, t.rules)[0]["params"])
  encoder = flat(ckpt_lib.load_params(str(workdir))["encoder"])

  assert set(got) == set(fresh)
  # What the fine-tuned model does not take: the pretraining encoder's final norm (fc_norm
  # after pooling replaces it) and SimMIM's mask token.
  unused = {"encoder_norm/bias", "encoder_norm/scale"}
  if method == "simmim":
    unused.add("mask_token/mask_token")
  assert set(encoder) - set(got) == unused
  from_encoder = [k for k in got if not k.startswith(FRESH)]
  assert set(from_encoder) == set(encoder) - unused and len(from_encoder) > 6 * DEPTH
  for key in from_encoder:
    assert got[key].dtype == encoder[key].dtype, key
    np.testing.assert_array_equal(got[key], encoder[key], err_msg=key)
    if key.endswith("kernel"):
      assert not np.array_equal(got[key], fresh[key]), f"{key} was not loaded"
  new = [k for k in got if k.startswith(FRESH)]
  assert sorted(new) == ["fc_norm/bias", "fc_norm/scale", "head/bias", "head/kernel"]
  for key in new:
    np.testing.assert_array_equal(got[key], fresh[key], err_msg=key)


# ------------------------------------------------------------------ 3. the linear probe


def test_linear_probe_trains_only_the_head(pretrained, tmp_path):
  workdir, _ = pretrained("mae")
  # Weight decay on: it must not move the frozen encoder either.
  c = mm_config(f"stage=probe,init={workdir}", total_steps=4, eval_every_steps=0,
                **{"optim.weight_decay": 0.05, "checkpoint.every_steps": 4,
                   "data.eval_examples": 64})
  assert c.optim.trainable_regex == "^head/" and c.model.pool_type == "gap"
  encoder = flat(ckpt_lib.load_params(str(workdir))["encoder"])
  t = trainer.Trainer(c, str(tmp_path / "probe"))

  # Gradients stop at the frozen params: the step differentiates the head only. (With the
  # zero-initialised head no gradient would reach the encoder anyway: use a random head.)
  _, state = t.initial_state(None)
  start = flat(state["params"])
  batch = t._global(next(pipeline.train_iterator(c.data, global_batch_size=c.batch_size,
                                                   seed=c.seed)))
  params = dict(state["params"])
  params["head"] = dict(params["head"], kernel=jax.random.normal(
      jax.random.key(1), params["head"]["kernel"].shape))
  grads, _ = jax.jit(t._grads)(params, batch, t.frozen, jax.random.key(0),
                               jnp.zeros((), jnp.int32))
  grads = flat(grads)
  for key, g in grads.items():
    if key.startswith("head/"):
      assert np.abs(g).max() > 0, key
    else:
      assert not g.any(), f"{key} gets a gradient"

  summary = t.run()
  assert summary["final_step"] == 4 and 0 <= summary["eval"]["accuracy"] <= 1
  final = flat(ckpt_lib.load_params(str(tmp_path / "probe")))
  assert set(final) == set(start)
  frozen = [k for k in final if not k.startswith("head/")]
  # Everything but the head is the pretrained encoder, bit for bit (its norm included: the
  # probe averages the encoder's normalised tokens).
  assert set(frozen) == set(encoder)
  for key in frozen:
    np.testing.assert_array_equal(final[key], encoder[key], err_msg=key)
  for key in ("head/kernel", "head/bias"):
    assert not np.array_equal(final[key], start[key]), f"{key} did not train"


def _toy_params():
  rng = np.random.RandomState(0)
  return {"encoder": {"block_00": {"kernel": jnp.asarray(rng.randn(3, 4), jnp.float32),
                                   "bias": jnp.asarray(rng.randn(4), jnp.float32)},
                      "encoder_norm": {"scale": jnp.ones((4,), jnp.float32)}},
          "head": {"kernel": jnp.asarray(rng.randn(4, 2), jnp.float32),
                   "bias": jnp.asarray(rng.randn(2), jnp.float32)}}


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizer_trainable_regex_freezes_the_rest(name):
  params = _toy_params()
  schedule = {"warmup_steps": 0, "decay": "constant"}
  cfg = {"name": name, "lr": 0.1, "weight_decay": 0.1, "momentum": 0.9, "decay_regex": None}
  mask = optim.trainable_mask(params, "^head/")
  assert jax.tree.leaves(mask) == [False, False, False, True, True]  # sorted keys
  assert all(jax.tree.leaves(optim.trainable_mask(params, None)))

  frozen_tx, _ = optim.make_optimizer({**cfg, "trainable_regex": "^head/"}, schedule, params, 10)
  free_tx, _ = optim.make_optimizer(cfg, schedule, params, 10)
  rng = np.random.RandomState(1)
  p_frozen, p_free = params, params
  s_frozen, s_free = frozen_tx.init(params), free_tx.init(params)
  for _ in range(4):
    # Every leaf gets a gradient here (no stop_gradient): the optimizer alone must hold them.
    grads = jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape), jnp.float32), params)
    u_frozen, s_frozen = frozen_tx.update(grads, s_frozen, p_frozen)
    u_free, s_free = free_tx.update(grads, s_free, p_free)
    for path, u in flat(u_frozen).items():
      if path.startswith("head/"):
        assert np.abs(u).min() > 0, path
      else:
        assert not u.any(), f"{path} has a nonzero update {u}"
    assert all(np.abs(u).min() > 0 for u in flat(u_free).values())  # the control moves all
    p_frozen = optax.apply_updates(p_frozen, u_frozen)
    p_free = optax.apply_updates(p_free, u_free)
  before, after = flat(params), flat(p_frozen)
  for path in before:
    if path.startswith("head/"):
      assert not np.array_equal(after[path], before[path]), path
    else:
      np.testing.assert_array_equal(after[path], before[path], err_msg=path)


def test_trainable_regex_matching_nothing_or_invalid_is_an_error():
  params = _toy_params()
  with pytest.raises(ValueError, match=r"'trainable_regex' \('\^nope/'\) matches no parameter"):
    optim.make_optimizer({"trainable_regex": "^nope/"}, None, params, 10)
  with pytest.raises(ValueError, match=r"'trainable_regex' is not a valid regex"):
    optim.make_optimizer({"trainable_regex": "(head"}, None, params, 10)


# ------------------------------------------------------------------ 4. ToMe fine-tuning


def test_finetune_with_tome_from_the_pretrained_workdir(pretrained, tmp_path):
  workdir, _ = pretrained("mae")
  r = 2
  c = mm_config(f"stage=finetune,init={workdir},tome={r}", total_steps=2, eval_every_steps=0,
                **{"checkpoint.every_steps": 2, "data.eval_examples": 64})
  assert c.model.token_reduction.to_dict() == {"method": "tome", "r": r}
  t = trainer.Trainer(c, str(tmp_path / "tome"))
  summary = t.run()
  assert summary["final_step"] == 2 and np.isfinite(summary["train"]["loss"])
  assert summary["eval"]["examples"] == 64 and 0 <= summary["eval"]["accuracy"] <= 1
  params = ckpt_lib.load_params(str(tmp_path / "tome"))
  # The trained model merges r tokens in every block: 1 + 64 tokens in, 1 + 64 - r * depth out
  # (shapes only: jax.eval_shape traces the model without compiling it).
  images = next(iter(t._eval_batches()))["image"][:4]
  logits, aux = jax.eval_shape(lambda p, x: t.model.apply({"params": p}, x), params, images)
  assert logits.shape == (4, 10)
  assert aux["state"].x.shape[1] == 1 + GRID * GRID - r * DEPTH


# ------------------------------------------------------------------ 5. masks from the pipeline


@pytest.mark.parametrize("method,length", [("mae", GRID * GRID), ("simmim", 4 * 4)])
def test_noise_comes_from_the_pipeline_and_is_positional(method, length):
  c = mm_config(f"stage=pretrain,method={method}")
  task = tasks.build(c, pipeline.dataset_info(c.data))
  assert not task.uses_labels

  def train(seed=0):
    return pipeline.train_iterator(c.data, global_batch_size=8, seed=seed, labels=False,
                                   batch_fields=task.batch_fields())

  a, b = train(), train()
  first = [next(a) for _ in range(3)]
  second = [next(b) for _ in range(3)]
  assert set(first[0]) == {"image", "noise"}
  for x, y in zip(first, second):
    assert x["noise"].shape == (8, length) and x["noise"].dtype == np.float32
    assert 0 <= x["noise"].min() and x["noise"].max() < 1
    np.testing.assert_array_equal(x["noise"], y["noise"])
  assert not np.array_equal(first[0]["noise"], first[1]["noise"])
  assert not np.array_equal(first[1]["noise"], first[2]["noise"])
  assert not np.array_equal(next(train(seed=1))["noise"], first[0]["noise"])
  # A resumed iterator (from the state after batch 0) draws batch 1's noise again.
  resumed = train()
  next(resumed)
  state = resumed.get_state()
  again = train()
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["noise"], first[1]["noise"])
  # Eval batches carry the same noise at every evaluation.
  evals = [pipeline.eval_iterator(c.data, global_batch_size=64, labels=False, seed=c.seed,
                                  batch_fields=task.batch_fields()) for _ in range(2)]
  for x, y in zip(*evals):
    assert set(x) == {"image", "mask", "noise"}
    np.testing.assert_array_equal(x["noise"], y["noise"])


def test_mae_evaluation_is_deterministic(pretrained):
  workdir, summary = pretrained("mae")
  t = trainer.Trainer(mm_config("stage=pretrain,method=mae"), str(workdir))
  try:
    step, state = t.initial_state(None)  # the run's last checkpoint
  finally:
    t.checkpointer.close()
  assert step == 12
  first, second = t.evaluate(state["params"]), t.evaluate(state["params"])
  assert first == second and first["examples"] == 256
  # ... and the same as the run's own evaluation at that step, in another Trainer.
  assert first["loss"] == pytest.approx(summary["eval"]["loss"], rel=1e-6)


# ------------------------------------------------------------------ 6, 7. errors


@pytest.mark.parametrize("arg,pattern", [
    ("stage=finetune", r"stage=finetune starts from a pretraining run: pass init="),
    ("stage=probe", r"stage=probe starts from a pretraining run: pass init="),
    ("stage=probe,init=/x,tome=2", r"tome is a fine-tuning setting"),
    ("stage=pretrain,method=bert", r"method must be one of \('mae', 'simmim', 'beit'\), got 'bert'"),
    ("stage=pretrian", r"stage must be one of .*got 'pretrian'"),
])
def test_config_arguments_are_checked(arg, pattern):
  with pytest.raises(ValueError, match=pattern):
    masked_modeling.get_config(arg)


def test_unknown_init_subtree_names_the_available_keys(pretrained, tmp_path):
  workdir, _ = pretrained("mae")
  c = mm_config(f"stage=finetune,init={workdir}", **{"init_from.subtree": "nope"})
  with pytest.raises(ValueError, match=r"init_from.subtree 'nope': no 'nope' .*"
                                       r"\['decoder', 'encoder'\]"):
    initial_params(c, tmp_path / "w")


@pytest.mark.parametrize("task,pattern", [
    ({"name": "mae", "mask_ration": 0.7}, r"unknown task 'mae' key 'mask_ration'; did you mean "
                                          r"'mask_ratio'"),
    ({"name": "simmim", "mask_patchsize": 16}, r"key 'mask_patchsize'"),
    ({"name": "simmim", "mask_patch_size": 12}, r"mask_patch_size 12 is not a multiple of the "
                                                r"patch size 8"),
    ({"name": "simmim", "mask_patch_size": 24}, r"mask_patch_size 24 does not divide the image"),
    ({"name": "mae", "decoder_width": 30, "decoder_heads": 4},
     r"decoder_width 30 is not divisible by decoder_heads 4"),
    ({"name": "mae", "decoder_width": 30, "decoder_heads": 3}, r"decoder_width 30 must be "
                                                               r"divisible by 4"),
    ({"name": "mae", "mask_ratio": 1.0}, r"mask_ratio must be a number in \(0, 1\), got 1.0"),
    ({"name": "simmim", "mask_ratio": 0.0}, r"mask_ratio must be a number in \(0, 1\), got 0.0"),
    ({"name": "mae", "norm_pix_loss": "yes"}, r"norm_pix_loss must be a bool"),
    ({"name": "mae", "preview_examples": -1}, r"preview_examples must be an int >= 0"),
], ids=["typo_mae", "typo_simmim", "mask_patch_12", "mask_patch_24", "decoder_heads",
        "decoder_width", "mask_ratio_1", "mask_ratio_0", "norm_pix_loss", "previews"])
def test_bad_task_settings_fail_clearly(task, pattern, tmp_path):
  c = mm_config("stage=pretrain")
  c.task = task
  with pytest.raises(ValueError, match=pattern):
    trainer.Trainer(c, str(tmp_path / "w"))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("key,value", [("pool_type", "gap"), ("num_classes", 10),
                                       ("fc_norm", True)])
def test_pretraining_encoder_with_a_head_or_pooling_is_an_error(method, key, value, tmp_path):
  c = mm_config(f"stage=pretrain,method={method}", **{f"model.{key}": value})
  with pytest.raises(ValueError, match=rf"{'MAE' if method == 'mae' else 'SimMIM'} encoder: "
                                       rf"{key}={value!r} belongs to fine-tuning"):
    trainer.Trainer(c, str(tmp_path / "w"))


def test_pretraining_continues_from_a_pretraining_workdir(pretrained, tmp_path):
  """init_from a pretraining run (whole param tree) starts a new pretraining from it exactly."""
  workdir, _ = pretrained("mae")
  config = mm_config("stage=pretrain,method=mae")
  config.init_from.path = str(workdir)
  start, _ = initial_params(config, tmp_path / "again")
  loaded = flat(ckpt_lib.load_params(workdir))
  assert sorted(start) == sorted(loaded)
  for key, value in loaded.items():
    np.testing.assert_array_equal(start[key], value, err_msg=key)


def test_finetune_from_mae_learns(pretrained, tmp_path):
  """A fine-tune from the MAE encoder learns its labels: on 32 training images (one batch,
  seen every step) the loss falls from chance's log(10) = 2.30 (the head starts at zero)."""
  workdir, _ = pretrained("mae")
  config = mm_config(f"stage=finetune,init={workdir}", total_steps=40, log_every_steps=1,
                     eval_every_steps=40, **{"checkpoint.every_steps": 40,
                                             "data.train_examples": 32, "model.drop_path_rate": 0.0})
  trainer.run(config, str(tmp_path / "ft"))
  train = losses(tmp_path / "ft")
  assert len(train) == 40 and all(np.isfinite(train))
  assert abs(train[0] - np.log(10)) < 1e-3
  assert np.mean(train[-5:]) < np.mean(train[:5]) - 0.05, train
  assert all(b < a + 0.02 for a, b in zip(train[2:], train[3:])), train  # falls steadily
