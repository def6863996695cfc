"""Supervised classification: cross-entropy on (smoothed, mixed) labels, accuracy in eval.

Labels are one-hot float [B, num_classes] in training (mixed by mixup/cutmix) and in
evaluation (all-zero rows for the padding rows, which batch["mask"] marks False).
"""
import jax.numpy as jnp
import optax

from vitoken.tasks import base


def smoothed(labels, label_smoothing: float):
  return labels * (1.0 - label_smoothing) + label_smoothing / labels.shape[-1]


@base.register("classification")
class Classification(base.Task):
  """The default task: `loss = CE + reducers' auxiliary losses`; eval accuracy and loss."""

  def __init__(self, config, info):
    super().__init__(config, info)

  def classification_terms(self, logits, batch):
    ce = optax.softmax_cross_entropy(logits, smoothed(batch["labels"], self.config.label_smoothing)).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(batch["labels"], -1))
    return ce, accuracy

  @staticmethod
  def total(terms, aux, metrics):
    """Sums weighted loss terms and the reducers' losses into metrics["loss"]."""
    extra = base.aux_loss_terms(aux)
    total = sum(terms) + sum(extra.values()) if extra else sum(terms)
    return total, {"loss": total, **metrics, **extra}

  def loss(self, params, frozen, batch, rng, step, progress):
    logits, aux = self.apply(params, batch, rng, train=True, step=step, progress=progress)
    ce, accuracy = self.classification_terms(logits, batch)
    return self.total([ce], aux, {"loss/ce": ce, "accuracy": accuracy})

  def eval_sums(self, params, frozen, batch, rng):
    """Summed cross-entropy and correct predictions over the rows with batch["mask"] True.

    batch["labels"] are one-hot float [B, num_classes] as in training; padding rows (mask
    False) have all-zero labels and are left out of every sum, whatever the model predicts.
    """
    logits, _ = self.apply(params, batch, rng, train=False)
    return masked_eval_sums(logits, batch["labels"], batch["mask"])


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
