"""Visual question answering through compact visual tokens: a frozen encoder, a
`vlm.VisualTokenizer` (compressor and LLaVA-1.5 projector) and a tiny causal language model
over [K visual tokens, question], trained on the answer word (the next word after the question).

    config.task = dict(name="visual_qa", encoder=dict(path=<a trained run>), feature_layer=-2,
                       compressor={"method": "cls_topk", "num_tokens": 16},
                       lm=dict(width=128, depth=2, num_heads=4), scales=None)

The encoder's params are frozen arrays of the step (`frozen_params`): no gradient, no optimizer
state. `scales` trains a `pool` compressor at several token counts at once, averaging their
losses (M3's Matryoshka training); `matryoshka` trains a `resampler` with the first m of its
queries, m drawn each step (MQT-LLaVA). Evaluation uses the compressor's own `num_tokens`.
Evaluation reports the accuracy per question type (`accuracy/<type>`) and over all.
"""
from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitoken import settings as settings_lib
from vitoken.data import digit_scenes
from vitoken.errors import ConfigError
from vitoken.tasks import base, runs, teacher as teacher_lib
from vitoken.vlm import learned, lm as lm_lib, tokenizer as tokenizer_lib

# Datasets of questions with one-word answers: their vocabulary (VOCAB, 0 pads), question
# types (QTYPES) and padded question length (QUESTION_LENGTH).
QA_DATASETS = {"digit_scenes": digit_scenes}
LM_DEFAULTS = {"width": 128, "depth": 2, "num_heads": 4, "mlp_dim": None}
QUESTION_FIELDS = ("question", "answer", "qtype")


class VisualQAModel(nn.Module):
  """(images, question words) -> (next-word logits [B, V], tokenizer aux)."""
  tokenizer: tokenizer_lib.VisualTokenizer
  lm: lm_lib.TinyLM

  @nn.compact
  def __call__(self, images, question, *, train: bool = False, query_count=None):
    text = None
    if any(e["method"] == "quecc" for e in self.tokenizer.chain()):
      # QueCC compresses with the question: the LM's state at its last word, text alone.
      _, text = self.lm(None, question)
    tokens, aux = self.tokenizer(images, train=train, text=text, query_count=query_count)
    logits, _ = self.lm(tokens, question, visual_mask=aux["mask"])
    return logits, aux


@base.register("visual_qa")
class VisualQA(base.Task):
  """See the module docstring."""
  uses_labels = False
  headline = "accuracy"

  def __init__(self, config, info, encoder=None, compressor=None, feature_layer: int = -2,
               drop_prefix: bool = True, lm=None, scales: Optional[Sequence[int]] = None,
               matryoshka: bool = False):
    super().__init__(config, info)
    name = str(config.data.get("name", "")).split("/")[0]
    if name not in QA_DATASETS:
      raise ConfigError(f"task visual_qa reads questions and answers (question, answer, qtype "
                        f"fields): data.name={config.data.get('name')!r} has none; use one of "
                        f"{sorted(QA_DATASETS)}")
    words = QA_DATASETS[name]
    self.qtypes, self.vocab_size = tuple(words.QTYPES), len(words.VOCAB)
    self.question_length = words.QUESTION_LENGTH
    spec = settings_lib.plain(encoder)
    if not spec or not spec.get("path"):
      raise ConfigError("task visual_qa needs a trained encoder: set config.task.encoder = "
                        "dict(path=<a run's workdir or checkpoint, or a big_vision .npz>)")
    self.encoder_model, self._encoder_params = load_encoder(spec, info)
    self.lm_settings = settings_lib.resolve(lm, LM_DEFAULTS, "task.lm")
    self.compressor = settings_lib.plain(compressor)
    self.feature_layer, self.drop_prefix = feature_layer, drop_prefix
    self.scales = tuple(int(s) for s in scales) if scales else ()
    chain = tokenizer_lib.parse_compressor(self.compressor)
    if self.scales and (len(chain) != 1 or chain[0]["method"] != "pool"):
      raise ConfigError(f"task.scales={list(self.scales)} trains a pool compressor at several "
                        f"token counts (M3); the compressor is {self.compressor!r}")
    self.matryoshka = bool(matryoshka)
    if self.matryoshka and (len(chain) != 1 or chain[0]["method"] != "resampler"):
      raise ConfigError(f"task.matryoshka draws how many of a resampler's queries each step "
                        f"uses (MQT-LLaVA); the compressor is {self.compressor!r}")

  # ---- models -----------------------------------------------------------------------------
  def qa_model(self, compressor=None) -> VisualQAModel:
    s = self.lm_settings
    tokenizer = tokenizer_lib.VisualTokenizer(
        encoder=self.encoder_model, compressor=self.compressor if compressor is None else compressor,
        feature_layer=self.feature_layer, drop_prefix=self.drop_prefix, projector=s["width"])
    return VisualQAModel(tokenizer, lm_lib.TinyLM(self.vocab_size, s["width"], s["depth"],
                                                  s["num_heads"], s["mlp_dim"]))

  def tokenizer_chain(self):
    return tokenizer_lib.parse_compressor(self.compressor)

  def models(self):
    if self._models is None:
      self._models = (self.qa_model(), self.qa_model())
    return self._models

  def backbone(self):
    return self.encoder_model

  def depth(self):
    return self.lm_settings["depth"]

  def layer_decay_groups(self) -> Dict[str, str]:
    return {"tokenizer": "stem", "lm": "head"}

  def sharding_rules(self):
    return ((r".*", ()),)

  def phase_starts(self):
    return ()

  def describe_model(self) -> str:
    s = self.lm_settings
    return (f"visual_qa: frozen ViT width {self.encoder_model.width} depth "
            f"{self.encoder_model.depth}, features of block {self.feature_layer}, compressor "
            f"{settings_lib.plain(self.compressor)}, LM width {s['width']} depth {s['depth']}")

  def example_batch(self, batch_size: int = 1):
    batch = super().example_batch(batch_size)
    batch.update(question=jnp.ones((batch_size, self.question_length), jnp.int32),
                 answer=jnp.zeros((batch_size,), jnp.int32), qtype=jnp.zeros((batch_size,), jnp.int32))
    return batch

  def init_params(self, rng, batch):
    params = dict(self.model.init(rng, batch["image"], batch["question"])["params"])
    params["tokenizer"] = {k: v for k, v in params["tokenizer"].items() if k != "encoder"}
    return params

  def frozen_params(self):
    return {"encoder": self._encoder_params}

  # ---- objective and metrics --------------------------------------------------------------
  def _variables(self, params, frozen):
    tokenizer = {**params.get("tokenizer", {}), "encoder": frozen["encoder"]}
    return {"params": {**params, "tokenizer": tokenizer}}

  def logits(self, params, frozen, batch, *, train: bool, model=None, query_count=None):
    model = model or (self.model if train else self.eval_model)
    return model.apply(self._variables(params, frozen), batch["image"], batch["question"],
                       train=train, query_count=query_count)

  def loss(self, params, frozen, batch, rng, step, progress):
    if self.scales:
      losses, accs = [], []
      for k in self.scales:
        logits, _ = self.logits(params, frozen, batch, train=True,
                                model=self.qa_model({"method": "pool", "num_tokens": k}))
        losses.append(lm_lib.answer_loss(logits, batch["answer"]).mean())
        accs.append(jnp.mean(logits.argmax(-1) == batch["answer"]))
      loss = sum(losses) / len(losses)
      return loss, {"loss": loss, "accuracy": sum(accs) / len(accs),
                    **{f"loss/k{k}": v for k, v in zip(self.scales, losses)}}
    count = None
    if self.matryoshka:  # MQT-LLaVA: the first m queries, m even and uniform in [2, M]
      entry = self.tokenizer_chain()[0]
      count = learned.matryoshka_tokens(rng, entry["queries"] or entry["num_tokens"])
    logits, _ = self.logits(params, frozen, batch, train=True, query_count=count)
    loss = lm_lib.answer_loss(logits, batch["answer"]).mean()
    return loss, {"loss": loss, "accuracy": jnp.mean(logits.argmax(-1) == batch["answer"])}

  def eval_sums(self, params, frozen, batch, rng):
    logits, _ = self.logits(params, frozen, batch, train=False)
    return qa_sums(logits, batch, self.qtypes)

  def eval_summary(self, totals: Dict[str, Any]) -> Dict[str, float]:
    out = super().eval_summary({k: v for k, v in totals.items() if not k.startswith("count/")})
    for name in self.qtypes:
      count = float(totals[f"count/{name}"])
      if count:
        out[f"accuracy/{name}"] = float(totals[f"accuracy/{name}_sum"]) / count
    return out


def load_encoder(spec, info):
  """(ViT, params) of the frozen encoder: a run (its own classes and image size, from its
  config: the encoder was trained on another label, e.g. digit presence) or a big_vision .npz
  (for this data's image size)."""
  spec = settings_lib.resolve(spec, teacher_lib.DEFAULTS, "task.encoder")
  if str(spec["path"]).endswith(".npz"):
    return teacher_lib.load(spec, info)
  model, params, _ = runs.load_model(str(spec["path"]), None,
                                     model_overrides=dict(spec["model"] or {}),
                                     what="encoder checkpoint (task.encoder.path)")
  return model, params


def qa_sums(logits, batch, qtypes: Sequence[str]) -> Dict[str, jax.Array]:
  """Summed loss and correct answers over the valid rows (batch["mask"]), overall and per
  question type (`accuracy/<type>_sum` with its `count/<type>`)."""
  valid = batch["mask"].astype(bool)
  correct = valid & (logits.argmax(-1) == batch["answer"])
  loss = jnp.where(valid, lm_lib.answer_loss(logits, batch["answer"]), 0.0)
  sums = {"loss_sum": loss.sum(), "accuracy_sum": correct.sum().astype(jnp.float32),
          "count": valid.sum().astype(jnp.float32)}
  for i, name in enumerate(qtypes):
    of_type = batch["qtype"] == i
    sums[f"accuracy/{name}_sum"] = (correct & of_type).sum().astype(jnp.float32)
    sums[f"count/{name}"] = (valid & of_type).sum().astype(jnp.float32)
  return sums
