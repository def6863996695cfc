"""BEiT-style masked visual-token prediction (vitoken.models.beit, the `beit` task): the
masked cross-entropy and code accuracy against numpy, the model's mask token (masked patches'
pixels never reach the encoder, the token sits before the position embedding), a smoke
pretraining against a k-means tokenizer that learns, fine-tuning from its workdir, the errors
of bad settings, and reproducible block masks.

Expected values come from numpy or from the model's own parts put together by hand (a mask
token equal to an empty patch's embedding), never from the code under test.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import masked_modeling, visual_tokenizer
from tests.test_masked_modeling_train import flat, initial_params, mm_config
from tests.test_train_loop import losses
from vitoken import tasks
from vitoken.data import pipeline
from vitoken.engine import checkpoint as ckpt_lib
from vitoken.engine.metrics import read_jsonl
from vitoken.models import beit
import vitoken.tokenizers
from vitoken.train import trainer

CODES = 16  # the test tokenizer's codebook (the config's 512, cut for a meaningful ln(K) bound)
GRID, BUDGET = 8, 24  # 64 px digits in 8 px patches; BEiT's 75 of 196 scaled to 64 patches


# ------------------------------------------------------------------ numpy references


def np_cross_entropy(logits, codes):
  """[B, L] softmax cross-entropy of integer codes, in float64 (log-softmax by hand)."""
  z = np.asarray(logits, np.float64)
  top = z.max(axis=-1, keepdims=True)
  log_softmax = z - top - np.log(np.exp(z - top).sum(axis=-1, keepdims=True))
  return -np.take_along_axis(log_softmax, np.asarray(codes)[..., None], axis=-1)[..., 0]


def np_beit_loss(logits, codes, mask):
  """The reference's CrossEntropyLoss over x[bool_masked_pos]: the mean over masked patches."""
  ce = np_cross_entropy(logits, codes)
  picked = ce[np.asarray(mask) > 0]
  return picked.mean() if picked.size else 0.0


def random_case(seed=0, b=3, length=10, k=7):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, length, k)).astype(np.float32) * 3
  codes = rng.integers(0, k, (b, length)).astype(np.int32)
  mask = (rng.random((b, length)) < 0.4).astype(np.float32)
  mask[0, :3] = 1  # at least a few masked patches ...
  mask[1] = 0  # ... and an example without any
  return logits, codes, mask


# ------------------------------------------------------------------ 1. the loss


def test_loss_is_the_mean_cross_entropy_over_masked_patches_only():
  logits, codes, mask = random_case()
  got = float(beit.loss(jnp.asarray(logits), jnp.asarray(codes), jnp.asarray(mask)))
  want = np_beit_loss(logits, codes, mask)
  assert got == pytest.approx(want, rel=1e-5)
  # Not the mean over every patch, nor the mean of per-example means.
  ce = np_cross_entropy(logits, codes)
  assert abs(want - ce.mean()) > 1e-2
  # The unmasked positions' logits do not matter at all.
  scrambled = np.where(mask[..., None] > 0, logits,
                       np.random.default_rng(1).normal(size=logits.shape).astype(np.float32) * 10)
  assert float(beit.loss(jnp.asarray(scrambled), jnp.asarray(codes),
                         jnp.asarray(mask))) == pytest.approx(got, rel=1e-6)
  # bool masks and bfloat16 logits (cast to float32 inside) work too.
  assert float(beit.loss(jnp.asarray(logits), jnp.asarray(codes),
                         jnp.asarray(mask > 0))) == pytest.approx(got, rel=1e-6)
  half = jnp.asarray(logits, jnp.bfloat16)
  assert float(beit.loss(half, jnp.asarray(codes), jnp.asarray(mask))) == pytest.approx(
      np_beit_loss(np.asarray(half.astype(jnp.float32)), codes, mask), rel=1e-5)


def test_loss_without_masked_patches_is_zero_not_nan():
  logits, codes, mask = random_case()
  zero = beit.loss(jnp.asarray(logits), jnp.asarray(codes), jnp.zeros_like(jnp.asarray(mask)))
  assert np.isfinite(float(zero)) and float(zero) == 0.0
  # ... and its gradient is zero, not NaN.
  grad = jax.grad(beit.loss)(jnp.asarray(logits), jnp.asarray(codes), jnp.zeros(mask.shape))
  assert np.isfinite(np.asarray(grad)).all() and not np.asarray(grad).any()


def test_per_example_loss_and_code_accuracy_against_numpy():
  logits, codes, mask = random_case(seed=2, b=4, length=9, k=5)
  # Make some predictions right on purpose: the argmax of row (b, l) is the code.
  logits[:, ::2] += 20 * np.eye(5, dtype=np.float32)[codes[:, ::2]]
  total, count = beit.per_example_loss(jnp.asarray(logits), jnp.asarray(codes), jnp.asarray(mask))
  ce = np_cross_entropy(logits, codes)
  np.testing.assert_allclose(np.asarray(total), (ce * mask).sum(axis=1), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(count), mask.sum(axis=1))
  assert total.shape == count.shape == (4,)

  correct, count = beit.code_accuracy(jnp.asarray(logits), jnp.asarray(codes), jnp.asarray(mask))
  right = (logits.argmax(axis=-1) == codes) & (mask > 0)
  np.testing.assert_array_equal(np.asarray(correct), right.sum(axis=1))
  np.testing.assert_array_equal(np.asarray(count), mask.sum(axis=1))
  assert 0 < right.sum() < mask.sum()  # the case checks both right and wrong predictions
  # A right prediction at an unmasked patch does not count.
  assert ((logits.argmax(axis=-1) == codes) & (mask == 0)).any()


# ------------------------------------------------------------------ 2. the model

TINY = dict(patch_size=(8, 8), width=32, depth=1, num_heads=2, mlp_dim=64, channels=1)
SIDE, PATCHES = 32, 16  # 32 px images of 4x4 patches


@pytest.fixture(scope="module")
def tiny():
  """(model, params, jitted apply, images, codes, mask) of a one-block BEiT."""
  model = beit.BEiT(encoder=TINY, codebook_size=CODES)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, SIDE, SIDE, 1)).astype(np.float32)
  codes = rng.integers(0, CODES, (2, PATCHES)).astype(np.int32)
  mask = np.zeros((2, PATCHES), np.float32)
  mask[0, [1, 2, 5, 6]] = 1  # a 2x2 block
  mask[1, [0, 7, 10, 13, 15]] = 1  # scattered, another count
  params = jax.jit(model.init)(jax.random.key(0), images, codes, mask)["params"]
  apply = jax.jit(lambda p, x, c, m: model.apply({"params": p}, x, c, m))
  return model, params, apply, images, codes, mask


def with_patch(images, example, patch, value):
  """A copy of `images` with patch `patch` (row-major on the 4x4 grid) of one example set."""
  out = np.array(images)
  r, c = divmod(patch, SIDE // 8)
  out[example, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = value
  return out


def test_model_logits_and_loss(tiny):
  _, params, apply, images, codes, mask = tiny
  loss, logits, out_mask = apply(params, images, codes, mask)
  assert logits.shape == (2, PATCHES, CODES) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out_mask), mask)
  assert float(loss) == pytest.approx(float(beit.loss(logits, codes, mask)), rel=1e-6)
  assert float(loss) == pytest.approx(np_beit_loss(np.asarray(logits), codes, mask), rel=1e-5)
  with pytest.raises(ValueError, match=r"BEiT needs one code per patch: codes \(2, 15\) vs "
                                       r"mask \(2, 16\)"):
    jax.eval_shape(lambda: tiny[0].apply({"params": params}, images, codes[:, :15], mask))


def test_masked_patches_pixels_never_reach_the_encoder(tiny):
  _, params, apply, images, codes, mask = tiny
  _, logits, _ = apply(params, images, codes, mask)
  logits = np.asarray(logits)
  # New pixels in every masked patch: nothing changes anywhere (bit for bit).
  noisy = np.array(images)
  rng = np.random.default_rng(5)
  for b in range(2):
    for i in np.flatnonzero(mask[b]):
      noisy = with_patch(noisy, b, i, rng.normal(size=(8, 8, 1)) * 5)
  loss2, logits2, _ = apply(params, noisy, codes, mask)
  np.testing.assert_array_equal(np.asarray(logits2), logits)
  # New pixels in one unmasked patch of example 0: its tokens change (through attention, all of
  # them), example 1's do not.
  moved = with_patch(images, 0, 3, 4.0)
  assert mask[0, 3] == 0
  _, logits3, _ = apply(params, moved, codes, mask)
  logits3 = np.asarray(logits3)
  assert (np.abs(logits3[0] - logits[0]).max(axis=-1) > 1e-6).all()
  np.testing.assert_array_equal(logits3[1], logits[1])


def test_mask_token_replaces_the_patch_embedding_before_the_position_embedding(tiny):
  """With the mask token set to an empty patch's embedding (the patch conv's bias), masking a
  patch is the same as blanking its pixels without a mask: the masked positions still get
  their own position embedding."""
  _, params, apply, images, codes, mask = tiny
  enc = params["encoder"]
  token = enc["embedding"]["bias"].reshape(1, 1, -1)
  params = dict(params, encoder=dict(enc, mask_token={"mask_token": token}))
  _, masked, _ = apply(params, images, codes, mask)
  blank = np.array(images)
  for b in range(2):
    for i in np.flatnonzero(mask[b]):
      blank = with_patch(blank, b, i, 0.0)
  _, plain, _ = apply(params, blank, codes, np.zeros_like(mask))
  np.testing.assert_allclose(np.asarray(masked), np.asarray(plain), rtol=1e-5, atol=1e-5)
  # The masked positions differ from each other (positions), though their input is one token.
  m0 = np.asarray(masked)[0, np.flatnonzero(mask[0])]
  assert np.abs(m0[1:] - m0[:1]).max() > 1e-3
  # The default (random) mask token is not an empty patch: the logits differ from `plain`.
  _, default, _ = apply(tiny[1], images, codes, mask)
  assert np.abs(np.asarray(default) - np.asarray(plain)).max() > 1e-4


def test_gradients_reach_the_head_and_the_mask_token_not_the_masked_pixels(tiny):
  model, params, _, images, codes, mask = tiny

  def f(p, x):
    return model.apply({"params": p}, x, codes, mask)[0]

  g_params, g_images = jax.jit(jax.grad(f, argnums=(0, 1)))(params, jnp.asarray(images))
  g = flat(g_params)
  for key in ("lm_head/kernel", "lm_head/bias", "encoder/mask_token/mask_token",
              "encoder/embedding/kernel", "encoder/block_00/attn/qkv/kernel"):
    assert np.abs(g[key]).max() > 0, f"{key} gets no gradient"
  assert all(np.isfinite(v).all() for v in g.values())
  g_images = np.asarray(g_images)
  for b in range(2):
    for i in range(PATCHES):
      r, c = divmod(i, SIDE // 8)
      block = g_images[b, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8]
      if mask[b, i]:
        assert not block.any(), f"masked patch {i} of example {b} gets a gradient"
      else:
        assert np.abs(block).max() > 0, f"visible patch {i} of example {b} gets none"


# ------------------------------------------------------------------ 3. pretraining runs


def tokenizer_config(**task):
  c = visual_tokenizer.get_config("kind=kmeans,runlocal")
  c.progress_bar = False
  c.checkpoint.async_save = False
  with c.unlocked():
    c.task.codebook_size = CODES
    c.task.update(task)
  return c


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  """(workdir, summary) of a runlocal k-means tokenizer of 16 codes over 8 px patches."""
  workdir = tmp_path_factory.mktemp("tokenizer")
  summary = vitoken.tokenizers.fit(tokenizer_config(), str(workdir))
  return workdir, summary


@pytest.fixture(scope="module")
def pretrained(tokenizer_dir, tmp_path_factory):
  """(workdir, summary) of the runlocal BEiT pretraining (12 steps of 32), run once."""
  workdir = tmp_path_factory.mktemp("pretrain_beit")
  summary = trainer.run(beit_config(tokenizer_dir[0]), str(workdir))
  return workdir, summary


def beit_config(tokenizer, **overrides):
  return mm_config(f"stage=pretrain,method=beit,tokenizer={tokenizer}", **overrides)


def test_beit_pretraining_learns_the_codes(pretrained, tokenizer_dir):
  workdir, summary = pretrained
  assert summary["task"] == "beit" and summary["final_step"] == 12
  records = read_jsonl(str(workdir / "metrics.jsonl"))
  assert all({"step", "split"} <= set(r) for r in records)
  train = losses(workdir)
  evals = [r for r in records if r["split"] == "eval"]
  assert len(train) == 6 and all(np.isfinite(train))  # logged every 2 steps
  assert [r["step"] for r in evals] == [6, 12]
  chance = np.log(CODES)  # a uniform guess over the codebook
  assert train[-1] < train[0] and train[-1] < chance, train
  assert evals[-1]["loss"] < chance and evals[-1]["loss"] < train[0], evals
  assert summary["train"]["loss"] == pytest.approx(train[-1])
  ev = summary["eval"]
  assert ev["loss"] == pytest.approx(evals[-1]["loss"]) and ev["examples"] == 256
  assert 0 <= ev["code_accuracy"] <= 1
  # Block masks of at most 24 of the 64 patches (some draws stop short of the budget).
  for share in [ev["masked_share"]] + losses(workdir, key="masked_share"):
    assert 0 < share <= BUDGET / GRID ** 2 + 1e-6, share
  assert 0 < ev["target_codebook_usage"] <= 1
  assert 1 <= ev["target_perplexity"] <= CODES
  # The codes the step computes from the frozen tokenizer are the tokenizer's own: the same
  # usage and perplexity over the same eval split as the tokenizer's fit reported.
  tok = tokenizer_dir[1]["eval"]
  assert ev["target_codebook_usage"] == pytest.approx(tok["codebook_usage"], rel=1e-6)
  assert ev["target_perplexity"] == pytest.approx(tok["perplexity"], rel=1e-6)
  # Only the encoder and the head train; the tokenizer stays out of the checkpoint.
  params = ckpt_lib.load_params(str(workdir))
  assert sorted(params) == ["encoder", "lm_head"]
  assert params["lm_head"]["kernel"].shape == (masked_modeling.ENCODER["width"], CODES)

  previews = workdir / "previews"
  assert sorted(os.listdir(previews)) == ["reconstructions.png", "reconstructions_000006.png",
                                          "reconstructions_000012.png"]
  picture = np.asarray(Image.open(previews / "reconstructions.png").convert("RGB"), np.float32)
  assert picture.std() > 2


def np_kmeans_codes(images, centroids, patch=8, eps=0.1):
  """[B, L] nearest centroids of the contrast-normalised patches (row, column, channel order),
  and each patch's margin between its nearest and second-nearest centroid."""
  x = np.asarray(images, np.float64)
  b, h, w, c = x.shape
  x = x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, -1, patch * patch * c)
  x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
  d = ((x[:, :, None, :] - np.asarray(centroids, np.float64)[None, None]) ** 2).sum(-1)
  near = np.sort(d, axis=-1)
  return d.argmin(axis=-1), near[..., 1] - near[..., 0]


def test_eval_sums_and_codes_against_numpy(pretrained, tokenizer_dir):
  """The step's codes are the frozen tokenizer's nearest centroids; eval sums the per-example
  masked cross-entropy, code accuracy and mask share of the real (weighted) examples."""
  workdir, _ = pretrained
  c = beit_config(tokenizer_dir[0])
  task = tasks.build(c, pipeline.dataset_info(c.data))
  params = ckpt_lib.load_params(str(workdir))
  frozen = task.frozen_params()
  batch = next(pipeline.eval_iterator(c.data, global_batch_size=8, labels=False, seed=c.seed,
                                      batch_fields=task.batch_fields()))
  batch["mask"] = np.array([True] * 6 + [False] * 2)  # two padding examples
  step = jax.jit(lambda p, f, b: (task.forward(p, f, b, None, train=False),
                                  task.eval_sums(p, f, b, None)))
  (loss, logits, mask, codes), sums = jax.device_get(step(params, frozen, batch))
  patch_mask, weight = batch["patch_mask"], batch["mask"].astype(np.float64)

  want, margin = np_kmeans_codes(batch["image"], frozen["tokenizer"]["centroids"])
  clear = margin > 1e-4
  assert clear.mean() > 0.99
  np.testing.assert_array_equal(codes[clear], want[clear])
  np.testing.assert_array_equal(mask, patch_mask)
  assert float(loss) == pytest.approx(np_beit_loss(logits, codes, patch_mask), rel=1e-5)

  ce = np_cross_entropy(logits, codes)
  count = patch_mask.sum(axis=1)
  assert (count > 0).all()
  right = (logits.argmax(axis=-1) == codes) * patch_mask
  np.testing.assert_allclose(sums["loss_sum"], ((ce * patch_mask).sum(1) / count * weight).sum(),
                             rtol=1e-5)
  np.testing.assert_allclose(sums["code_accuracy_sum"], (right.sum(1) / count * weight).sum(),
                             rtol=1e-5)
  np.testing.assert_allclose(sums["masked_share_sum"], (patch_mask.mean(1) * weight).sum(),
                             rtol=1e-6)
  assert float(sums["count"]) == 6
  np.testing.assert_array_equal(sums["code_counts"],
                                np.bincount(codes[:6].ravel(), minlength=CODES))


def test_finetune_starts_from_the_beit_encoder(pretrained, tmp_path):
  workdir, _ = pretrained
  c = mm_config(f"stage=finetune,init={workdir}")
  assert (c.init_from.path, c.init_from.subtree) == (str(workdir), "encoder")
  got, _ = initial_params(c, tmp_path / "finetune")
  encoder = flat(ckpt_lib.load_params(str(workdir))["encoder"])
  # The fine-tuned model does not take the pretraining encoder's norm nor the mask token.
  unused = {"encoder_norm/bias", "encoder_norm/scale", "mask_token/mask_token"}
  assert set(encoder) - set(got) == unused
  fresh = ("fc_norm/", "head/")
  assert sorted(k for k in got if k.startswith(fresh)) == [
      "fc_norm/bias", "fc_norm/scale", "head/bias", "head/kernel"]
  from_encoder = [k for k in got if not k.startswith(fresh)]
  assert set(from_encoder) == set(encoder) - unused
  for key in from_encoder:
    np.testing.assert_array_equal(got[key], encoder[key], err_msg=key)


# ------------------------------------------------------------------ 5. errors


@pytest.fixture(scope="module")
def tokenizer_4px(tmp_path_factory):
  """A (one-step) k-means tokenizer over 4 px patches."""
  workdir = tmp_path_factory.mktemp("tokenizer_4px")
  c = tokenizer_config(patch_size=4)
  c.total_steps = 1
  vitoken.tokenizers.fit(c, str(workdir))
  return workdir


def test_tokenizer_of_another_patch_size_is_an_error(tokenizer_4px, tmp_path):
  with pytest.raises(ValueError, match=rf"the tokenizer at {tokenizer_4px} codes 4x4 patches but "
                                       r"the model's patches are 8x8"):
    trainer.Trainer(beit_config(tokenizer_4px), str(tmp_path / "w"))


@pytest.mark.parametrize("arg,pattern", [
    ("stage=pretrain,method=beit", r"method=beit predicts a visual tokenizer's codes: pass "
                                   r"tokenizer="),
    ("stage=pretrain,method=mae,tokenizer=/tmp/tok", r"tokenizer is BEiT's setting; method=mae "
                                                     r"takes none"),
], ids=["beit_without_tokenizer", "mae_with_tokenizer"])
def test_config_tokenizer_argument_is_checked(arg, pattern):
  with pytest.raises(ValueError, match=pattern):
    masked_modeling.get_config(arg)


@pytest.mark.parametrize("task,pattern", [
    ({"mask_patches": 65}, r"mask_patches 65 is larger than the 8x8 grid of 64 patches"),
    ({"tokenizer": None}, r"task beit needs `tokenizer`"),
], ids=["mask_budget", "no_tokenizer"])
def test_bad_beit_task_settings(tokenizer_dir, task, pattern, tmp_path):
  c = beit_config(tokenizer_dir[0])
  c.task.update(task)
  with pytest.raises(ValueError, match=pattern):
    trainer.Trainer(c, str(tmp_path / "w"))


def test_missing_tokenizer_path_is_an_error(tmp_path):
  missing = tmp_path / "no_tokenizer"
  with pytest.raises(FileNotFoundError, match=rf"tokenizer: {missing} does not exist"):
    trainer.Trainer(beit_config(missing), str(tmp_path / "w"))


def test_a_run_that_is_not_a_tokenizer_is_an_error(pretrained, tmp_path):
  workdir, _ = pretrained
  with pytest.raises(ValueError, match=rf"{workdir} holds a 'beit' run, not a tokenizer"):
    trainer.Trainer(beit_config(workdir), str(tmp_path / "w"))


# ------------------------------------------------------------------ 6. masks


def test_block_masks_are_reproducible():
  c = beit_config("/nowhere")  # the tokenizer is only read when the model is built
  task = tasks.build(c, pipeline.dataset_info(c.data))
  batch = {"image": np.zeros((8, 64, 64, 1), np.float32)}
  first = task.batch_fields()(batch, np.random.default_rng(3))
  again = task.batch_fields()(batch, np.random.default_rng(3))
  other = task.batch_fields()(batch, np.random.default_rng(4))
  assert set(first) == {"image", "patch_mask"}
  mask = first["patch_mask"]
  assert mask.shape == (8, GRID * GRID) and mask.dtype == np.float32
  np.testing.assert_array_equal(mask, again["patch_mask"])
  assert not np.array_equal(mask, other["patch_mask"])
  assert set(np.unique(mask)) <= {0.0, 1.0}
  assert (mask.sum(axis=1) > 0).all() and (mask.sum(axis=1) <= BUDGET).all()
  assert len({m.tobytes() for m in mask}) > 1  # each example draws its own mask
