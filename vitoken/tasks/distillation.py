"""Distillation from a frozen teacher: logits (soft KL at a temperature, or hard labels) and
per-token features, on top of the labels' cross-entropy.

    config.task = dict(name="distillation", teacher=dict(path="/runs/teacher"),
                       ce_weight=0.5, logit_weight=0.5, temperature=1.0, token_weight=0.0)

    loss = ce_weight * CE(student, labels)
         + logit_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))   (hard=False)
                       or CE(student, argmax teacher)                               (hard=True)
         + token_weight * mean over kept patch tokens and channels of
                          (student encoded token - teacher encoded token at its position)^2
         + the reducers' auxiliary losses

DeiT's soft distillation is ce_weight = 1 - alpha, logit_weight = alpha; DynamicViT's is
ce_weight=1, logit_weight=0.5, token_weight=0.5 at T=1. The student's tokens are matched to
the teacher's by `TokenState.ids`, so pruned or reordered students compare each kept token
with the teacher's token at the same patch; learned tokens (ids = LEARNED_ID) and masked ones
are left out, and a keep policy weights them. The teacher runs in evaluation mode.
"""
import jax
import jax.numpy as jnp
import optax

from vitoken import settings as settings_lib
from vitoken.errors import ConfigError
from vitoken.models.reducers import base as rbase
from vitoken.tasks import base, classification, teacher as teacher_lib


def kl_to_teacher(student_logits, teacher_logits, temperature: float = 1.0):
  """Per-example T^2 * KL(softmax(teacher / T) || softmax(student / T))."""
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  return temperature ** 2 * jnp.sum(jnp.exp(t) * (t - s), axis=-1)


def token_distillation(student_state, student_tokens, teacher_tokens, teacher_prefix: int):
  """Mean squared error between the student's patch tokens and the teacher's at the same
  patch (teacher_tokens [B, N_t, C] hold every patch after `teacher_prefix` prefix tokens)."""
  p = student_state.num_prefix
  ids = student_state.ids[:, p:]
  s = student_tokens[:, p:].astype(jnp.float32)
  if s.shape[-1] != teacher_tokens.shape[-1]:
    raise ConfigError(f"token distillation needs equal widths: student {s.shape[-1]}, teacher "
                      f"{teacher_tokens.shape[-1]}; use a teacher of the student's width or set "
                      "task.token_weight = 0")
  patch = ids - p
  weight = (ids >= p).astype(jnp.float32)  # learned tokens (LEARNED_ID) have no patch
  if student_state.mask is not None:
    weight = weight * student_state.mask[:, p:]
  if student_state.policy is not None:
    # DynamicViT's final keep decisions select the tokens; no gradient flows through them.
    weight = weight * jax.lax.stop_gradient(student_state.policy[:, p:])
  index = jnp.clip(patch + teacher_prefix, 0, teacher_tokens.shape[1] - 1)
  t = rbase.take_tokens(jax.lax.stop_gradient(teacher_tokens).astype(jnp.float32), index)
  per_token = jnp.mean(jnp.square(s - t), axis=-1)
  return jnp.sum(per_token * weight) / jnp.maximum(jnp.sum(weight), 1e-6)


@base.register("distillation")
class Distillation(classification.Classification):
  """Classification with a frozen teacher (see the module docstring)."""

  def __init__(self, config, info, teacher=None, ce_weight: float = 0.5, logit_weight: float = 0.5,
               temperature: float = 1.0, hard: bool = False, token_weight: float = 0.0):
    super().__init__(config, info)
    if self.multi_label:
      raise ConfigError(f"distillation takes one label key; data.label_keys gives "
                        f"{[k for k, _ in self.label_splits]}. Train with task 'classification'")
    spec = settings_lib.plain(teacher)
    if not spec or (isinstance(spec, dict) and not spec.get("path")):
      raise ConfigError(
          f"distillation (logit_weight={logit_weight}, token_weight={token_weight}) needs a dense "
          "teacher: set config.task.teacher = dict(path=<a trained run's workdir or checkpoint>) "
          "(configs/token_pruning.py: teacher=<workdir>), or train with task "
          "'classification' to drop the distillation terms")
    self.teacher_model, self._teacher_params = teacher_lib.load(teacher, info)
    if temperature <= 0:
      raise ConfigError(f"distillation temperature (task.temperature) must be > 0, got "
                        f"{temperature}")
    if token_weight and self.teacher_model.patch_size != self.model.patch_size:
      raise ConfigError("token distillation needs the teacher's patch grid: patch sizes "
                        f"{tuple(self.teacher_model.patch_size)} vs "
                        f"{tuple(self.model.patch_size)}; use a teacher with the student's patch size or set task.token_weight = 0")
    self.ce_weight, self.logit_weight = float(ce_weight), float(logit_weight)
    self.temperature, self.hard, self.token_weight = float(temperature), bool(hard), float(token_weight)

  def frozen_params(self):
    return {"teacher": self._teacher_params}

  def teacher_outputs(self, frozen, batch):
    logits, aux = self.teacher_model.apply({"params": frozen["teacher"]}, batch["image"])
    return jax.lax.stop_gradient(logits), jax.lax.stop_gradient(aux["encoded"])

  def loss(self, params, frozen, batch, rng, step, progress):
    logits, aux = self.apply(params, batch, rng, train=True, step=step, progress=progress)
    t_logits, t_tokens = self.teacher_outputs(frozen, batch)
    ce, accuracy, _ = self.classification_terms(logits, batch)
    if self.hard:
      kd = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.argmax(t_logits, -1)).mean()
    else:
      kd = kl_to_teacher(logits, t_logits, self.temperature).mean()
    terms = [self.ce_weight * ce, self.logit_weight * kd]
    metrics = {"loss/ce": ce, "loss/distill_logits": kd, "accuracy": accuracy,
               "teacher_agreement": jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(t_logits, -1))}
    if self.token_weight:
      tok = token_distillation(aux["state"], aux["encoded"], t_tokens, self.teacher_model.num_prefix)
      terms.append(self.token_weight * tok)
      metrics["loss/distill_tokens"] = tok
    return self.total(terms, aux, metrics)
