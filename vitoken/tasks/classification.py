"""Supervised classification: cross-entropy on (smoothed, mixed) labels, accuracy in eval.

Labels are one-hot float [B, num_classes] in training (mixed by mixup/cutmix) and in
evaluation (all-zero rows for the padding rows, which batch["mask"] marks False).

Several label keys (data.label_keys, e.g. a clip's digit and its direction) sit side by side
in batch["labels"]; the model's head then has all their classes, and each key's slice of the
logits is that key's head (a linear head per key, as separate Dense layers would be). The
loss is the sum of the keys' cross-entropies; metrics are per key (`accuracy/<key>`,
`loss/ce/<key>`), and `accuracy` is their mean.
"""
from typing import Dict, Sequence, Tuple

import jax.numpy as jnp
import optax

from vitoken.tasks import base


def smoothed(labels, label_smoothing: float):
  return labels * (1.0 - label_smoothing) + label_smoothing / labels.shape[-1]


def label_splits(info) -> Tuple[Tuple[str, int], ...]:
  """(key, classes) per label key of the data (one key, "label", unless it says otherwise)."""
  splits = getattr(info, "label_splits", None)
  return splits() if splits is not None else (("label", info.num_classes),)


def per_key(array, splits: Sequence[Tuple[str, int]]) -> Dict[str, jnp.ndarray]:
  """The last axis of logits or labels cut into one slice per label key."""
  out, start = {}, 0
  for key, classes in splits:
    out[key] = array[..., start:start + classes]
    start += classes
  return out


@base.register("classification")
class Classification(base.Task):
  """The default task: `loss = CE + reducers' auxiliary losses`; eval accuracy and loss."""

  def __init__(self, config, info):
    super().__init__(config, info)
    self.label_splits = label_splits(info)

  @property
  def multi_label(self) -> bool:
    return len(self.label_splits) > 1

  def classification_terms(self, logits, batch):
    """(summed cross-entropy, mean accuracy, per-key metrics: {} with one label key)."""
    smoothing = self.config.label_smoothing
    logits_of, labels_of = per_key(logits, self.label_splits), per_key(batch["labels"],
                                                                       self.label_splits)
    metrics, ces, accuracies = {}, [], []
    for key, _ in self.label_splits:
      # Smoothing spreads over the key's own classes, as a separate head's would.
      ce = optax.softmax_cross_entropy(logits_of[key], smoothed(labels_of[key], smoothing)).mean()
      accuracy = jnp.mean(jnp.argmax(logits_of[key], -1) == jnp.argmax(labels_of[key], -1))
      ces.append(ce)
      accuracies.append(accuracy)
      if self.multi_label:
        metrics.update({f"loss/ce/{key}": ce, f"accuracy/{key}": accuracy})
    return sum(ces), sum(accuracies) / len(accuracies), metrics

  @staticmethod
  def total(terms, aux, metrics):
    """Sums weighted loss terms and the reducers' losses into metrics["loss"]."""
    extra = base.aux_loss_terms(aux)
    total = sum(terms) + sum(extra.values()) if extra else sum(terms)
    return total, {"loss": total, **metrics, **extra}

  def loss(self, params, frozen, batch, rng, step, progress):
    logits, aux = self.apply(params, batch, rng, train=True, step=step, progress=progress)
    ce, accuracy, per_key_metrics = self.classification_terms(logits, batch)
    return self.total([ce], aux, {"loss/ce": ce, "accuracy": accuracy, **per_key_metrics})

  def eval_sums(self, params, frozen, batch, rng):
    """Summed cross-entropy and correct predictions over the rows with batch["mask"] True.

    batch["labels"] are one-hot float [B, num_classes] as in training; padding rows (mask
    False) have all-zero labels and are left out of every sum, whatever the model predicts.
    With several label keys: per key too (`accuracy/<key>`), "accuracy" their mean and
    "loss" the sum of their cross-entropies.
    """
    logits, _ = self.apply(params, batch, rng, train=False)
    if not self.multi_label:
      return masked_eval_sums(logits, batch["labels"], batch["mask"])
    logits_of, labels_of = per_key(logits, self.label_splits), per_key(batch["labels"],
                                                                       self.label_splits)
    sums = {}
    for key, _ in self.label_splits:
      one = masked_eval_sums(logits_of[key], labels_of[key], batch["mask"])
      sums["count"] = one["count"]
      sums[f"loss/{key}_sum"] = one["loss_sum"]
      sums[f"accuracy/{key}_sum"] = one["accuracy_sum"]
    keys = [key for key, _ in self.label_splits]
    sums["loss_sum"] = sum(sums[f"loss/{k}_sum"] for k in keys)
    sums["accuracy_sum"] = sum(sums[f"accuracy/{k}_sum"] for k in keys) / len(keys)
    return sums


def masked_eval_sums(logits, labels, mask):
  """{"loss_sum", "accuracy_sum", "count"} of logits [B, K] against one-hot labels [B, K],
  over the rows where `mask` [B] is True (the padding rows of an eval batch are not)."""
  valid = mask.astype(bool)
  ce = optax.softmax_cross_entropy(logits, labels.astype(logits.dtype)).astype(jnp.float32)
  correct = jnp.argmax(logits, -1) == jnp.argmax(labels, -1)
  # `where`, not a product: a padding row's loss or prediction never enters a sum (0 * nan).
  return {"loss_sum": jnp.sum(jnp.where(valid, ce, 0.0)),
          "accuracy_sum": jnp.sum(jnp.where(valid & correct, 1.0, 0.0)),
          "count": jnp.sum(valid.astype(jnp.float32))}
