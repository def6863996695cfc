"""The visual_qa task: a frozen encoder, the visual tokenizer and a tiny causal LM trained on
the answer word; per-question-type accuracy; M3 and MQT training; a smoke run that learns."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import visual_qa as vqa_config
from vitoken.data import digit_scenes
from vitoken.engine import checkpoint as ckpt_lib
from vitoken.errors import ConfigError, InputError
from vitoken.tasks import visual_qa
from vitoken.train import trainer
from vitoken.vlm import lm as lm_lib

QTYPES = digit_scenes.QTYPES


def _lm(**kw):
  return lm_lib.TinyLM(vocab_size=len(digit_scenes.VOCAB), width=32, depth=2, num_heads=2, **kw)


def _question(*words):
  return digit_scenes.encode(list(words), length=digit_scenes.QUESTION_LENGTH)


def test_the_lm_answers_after_the_last_word_and_ignores_padding_and_masked_tokens():
  lm = _lm()
  q = jnp.asarray(np.stack([_question("how", "many", "digits", "?"),
                            _question("is", "there", "a", "7", "?")]))
  visual = jnp.asarray(np.random.RandomState(0).randn(2, 5, 32).astype(np.float32))
  params = lm.init(jax.random.key(0), visual, q)
  logits, state = lm.apply(params, visual, q)
  assert logits.shape == (2, len(digit_scenes.VOCAB)) and state.shape == (2, 32)
  # Causal: what follows the last word (padding, or another word) never reaches the answer.
  with_pad = jnp.concatenate([q, jnp.zeros((2, 3), q.dtype)], axis=1)
  np.testing.assert_allclose(lm.apply(params, visual, with_pad)[0], logits, atol=1e-5)
  # A masked visual token is invisible; an unmasked one is not.
  mask = jnp.array([[True, True, False, True, True]] * 2)
  base, _ = lm.apply(params, visual, q, visual_mask=mask)
  moved = visual.at[:, 2].add(jnp.asarray(np.random.RandomState(9).randn(32), jnp.float32))
  np.testing.assert_allclose(lm.apply(params, moved, q, visual_mask=mask)[0], base, atol=1e-5)
  assert not np.allclose(lm.apply(params, moved, q)[0], logits, atol=1e-3)
  with pytest.raises(InputError, match="width 16, the language model 32"):
    lm.apply(params, visual[..., :16], q)


def test_every_visual_token_reaches_the_answer():
  """The visual tokens come first, so under the causal mask the state at the question's last
  word depends on each of them."""
  lm = _lm()
  q = jnp.asarray(_question("what", "digit", "is", "at", "top", "left", "?")[None])
  visual = jnp.asarray(np.random.RandomState(1).randn(1, 3, 32).astype(np.float32))
  params = lm.init(jax.random.key(0), visual, q)

  def state_of(v, words):
    return lm.apply(params, v, words)[1]

  grads = jax.grad(lambda v: state_of(v, q).sum())(visual)
  assert np.abs(grads).min() > 0  # every visual token reaches the answer


def test_qa_sums_count_per_question_type_against_numpy():
  rng = np.random.RandomState(3)
  logits = jnp.asarray(rng.randn(16, 32).astype(np.float32))
  answer = rng.randint(0, 32, 16)
  answer[:6] = np.asarray(logits[:6]).argmax(-1)  # some right
  batch = {"answer": jnp.asarray(answer), "qtype": jnp.asarray(rng.randint(0, 4, 16)),
           "mask": jnp.asarray(np.arange(16) < 13)}
  sums = visual_qa.qa_sums(logits, batch, QTYPES)
  right = (np.asarray(logits).argmax(-1) == answer) & np.asarray(batch["mask"])
  assert sums["count"] == 13 and sums["accuracy_sum"] == right.sum()
  for i, name in enumerate(QTYPES):
    of_type = np.asarray(batch["qtype"]) == i
    assert sums[f"accuracy/{name}_sum"] == (right & of_type).sum()
    assert sums[f"count/{name}"] == (of_type & np.asarray(batch["mask"])).sum()
  logp = jax.nn.log_softmax(logits)
  want = -np.asarray(logp)[np.arange(16), answer][:13].sum()
  np.testing.assert_allclose(sums["loss_sum"], want, rtol=1e-5)


def test_lm_flops_count_two_per_multiply_add():
  width, depth, tokens, vocab = 8, 1, 3, 5
  got = lm_lib.flops_per_example(width, depth, None, tokens, vocab)
  dense = 2 * tokens * (3 * width * width + width * width + 2 * width * 4 * width)
  attention = 2 * 2 * tokens * tokens * width
  assert got == dense + attention + 2 * width * vocab


def test_config_arguments_are_checked():
  with pytest.raises(ValueError, match="stage=qa needs encoder="):
    vqa_config.get_config("")
  with pytest.raises(ValueError, match="compressor must be none or one of"):
    vqa_config.get_config("encoder=/x,compressor=fastervlm")
  with pytest.raises(ValueError, match="scales .* set compressor=pool"):
    vqa_config.get_config("encoder=/x,compressor=cls_topk,scales")
  c = vqa_config.get_config("encoder=/x,compressor=visionzip,k=64")
  assert c.task.compressor.to_dict() == {"method": "visionzip", "dominant": 54, "contextual": 10}
  assert vqa_config.compressor("prumerge", 1) == {"method": "prumerge", "num_tokens": 0,
                                                  "neighbours": 8}


# ---- a trained encoder ----------------------------------------------------------------------
def _trained(workdir, arg, steps):
  c = vqa_config.get_config(arg)
  c.total_steps, c.eval_every_steps, c.checkpoint.every_steps = steps, steps, steps
  c.schedule.warmup_steps = min(20, steps - 1)
  c.progress_bar = False
  return c, trainer.run(c, str(workdir))


@pytest.fixture(scope="module")
def vqa_encoder(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("vqa") / "encoder"
  _trained(workdir, "stage=encoder,runlocal", 120)
  return str(workdir)


def _task(encoder, **task):
  c = vqa_config.get_config(f"encoder={encoder},runlocal")
  c.task.update(task)
  from vitoken.data import pipeline
  return visual_qa.VisualQA(c, pipeline.dataset_info(c.data), **{
      k: v for k, v in c.task.items() if k != "name"})


def test_the_encoder_is_frozen_arrays_without_optimizer_state(vqa_encoder, tmp_path):
  c, summary = _trained(tmp_path / "qa", f"encoder={vqa_encoder},runlocal", 4)
  shapes = ckpt_lib.params_shapes(str(tmp_path / "qa"))
  assert set(shapes) == {"lm", "tokenizer"} and set(shapes["tokenizer"]) == {"projector"}
  task = _task(vqa_encoder)
  saved = ckpt_lib.load_params(vqa_encoder)
  frozen = task.frozen_params()["encoder"]
  assert jax.tree.structure(frozen) == jax.tree.structure(saved)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(saved)))
  assert "accuracy/count" in summary["eval"]


def test_m3_scales_average_the_losses_of_each_token_count(vqa_encoder):
  task = _task(vqa_encoder, compressor={"method": "pool", "num_tokens": 4}, scales=(1, 4, 36))
  batch = task.example_batch(4)
  batch["question"] = jnp.asarray(np.stack([_question("how", "many", "digits", "?")] * 4))
  batch["image"] = jnp.asarray(np.random.RandomState(0).rand(*batch["image"].shape), jnp.float32)
  params = task.init_params(jax.random.key(0), batch)
  frozen = task.frozen_params()
  loss, metrics = task.loss(params, frozen, batch, jax.random.key(1), 0, 0.0)
  each = []
  for k in (1, 4, 36):
    logits, _ = task.logits(params, frozen, batch, train=True,
                            model=task.qa_model({"method": "pool", "num_tokens": k}))
    each.append(float(lm_lib.answer_loss(logits, batch["answer"]).mean()))
    assert float(metrics[f"loss/k{k}"]) == pytest.approx(each[-1], rel=1e-5)
  assert float(loss) == pytest.approx(np.mean(each), rel=1e-5)
  assert len(set(np.round(each, 5))) == 3  # the scales differ


def test_task_settings_that_cannot_work_are_refused(vqa_encoder):
  with pytest.raises(ConfigError, match="task.scales=.* trains a pool compressor"):
    _task(vqa_encoder, compressor={"method": "cls_topk", "num_tokens": 4}, scales=(1, 4))
  with pytest.raises(ConfigError, match="task.matryoshka draws .* resampler"):
    _task(vqa_encoder, compressor={"method": "pool", "num_tokens": 4}, matryoshka=True)
  c = vqa_config.get_config(f"encoder={vqa_encoder},runlocal")
  c.data.name = "cluttered_digits"
  from vitoken.data import pipeline
  with pytest.raises(ConfigError, match="task visual_qa reads questions and answers"):
    visual_qa.VisualQA(c, pipeline.dataset_info(c.data), encoder={"path": vqa_encoder})
  with pytest.raises(ConfigError, match="needs a trained encoder"):
    visual_qa.VisualQA(ml_collections.ConfigDict({"data": {"name": "digit_scenes"}}), None)


def test_a_short_training_learns_to_count(vqa_encoder, tmp_path):
  """300 steps on the tiny scenes: counting is read from the image (chance is 1/4)."""
  _, summary = _trained(tmp_path / "qa", f"encoder={vqa_encoder},runlocal", 300)
  assert summary["eval"]["accuracy/count"] > 0.4, summary["eval"]
  assert set(f"accuracy/{t}" for t in QTYPES) <= set(summary["eval"])
