"""Supervised classification: cross-entropy on (smoothed, mixed) labels, accuracy in eval."""
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
    logits, _ = self.apply(params, batch, rng, train=False)
    mask = batch["mask"].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
    return {"loss_sum": jnp.sum(ce * mask), "accuracy_sum": jnp.sum(correct * mask),
            "count": jnp.sum(mask)}
