"""The training loop: one jitted step for every task, model and method, driven by a config.

The task (`config.task`, see `vitoken.tasks`) owns the models, the objective and the eval
metrics, and may own its update (k-means learns without gradients); the step never branches
on the task or the token-reduction method (reducers' auxiliary losses arrive in the model's
`aux["losses"]` and the tasks add them). State is created sharded, the step donates it and
pins its in/out shardings, and the host reads metrics only every `log_every_steps` (that is
also where a NaN loss is caught, naming its exact step, before any checkpoint can store it).
"""
import contextlib
import functools
import json
import logging
import os
import time
from typing import Any, Dict, List, Tuple

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitoken import errors, paths, tasks as tasks_lib
from vitoken.data import config as data_config_lib, pipeline
from vitoken.engine import (
  checkpoint as ckpt_lib,
  distributed,
  metrics as metrics_lib,
  optim,
  sharding,
)
from vitoken.tasks import base as task_base, runs
from vitoken.train import config as config_lib

log = logging.getLogger(__name__)


class TrainingDiverged(errors.UserError, RuntimeError):
  """The loss became NaN or infinite (a setting to change, usually the learning rate)."""


def check_workdir(workdir: str) -> str:
  """The workdir, absolute (local, `~` expanded) or a bucket URI (gs://...), checked writable."""
  try:
    path = paths.resolve(workdir)
  except ValueError as e:
    raise errors.ConfigError(f"workdir {e}") from None
  for folder in [path, *path.parents]:
    if folder.is_file():
      raise errors.ConfigError(
          f"workdir {path} is not writable: {folder} is a file, not a folder. Pass a --workdir "
          "that is a folder or does not exist yet (it is created)")
  ckpt_lib.check_writable(path, "workdir")
  return os.fspath(path)


# Metrics logged as their value at the logged step; every other one is the window's mean.
_AT_STEP = ("lr",)


def _window_metrics(records: List[Dict[str, float]]) -> Dict[str, float]:
  return {k: float(records[-1][k]) if k in _AT_STEP else float(np.mean([r[k] for r in records]))
          for k in records[0]}


class Trainer:
  """Builds everything a run needs from its config; `run()` trains, evaluates, checkpoints."""

  def __init__(self, config, workdir: str):
    config_lib.check_keys(config)
    self.config = config
    self.workdir = check_workdir(workdir)
    self.mesh = sharding.make_mesh(config.mesh)
    self._check_batch()
    self.info = pipeline.dataset_info(config.data)
    self.task = tasks_lib.build(config, self.info)
    if self.task.uses_optimizer:
      # Built before anything is traced: building may read files (BEiT's tokenizer), which
      # must not happen inside `jax.eval_shape`.
      self.task.models()

    self.example = self.task.example_batch()
    abstract_params = jax.eval_shape(self.task.init_params, jax.random.key(0), self.example)
    self.tx, self.schedule = (optim.make_optimizer(
        config.optim, config.schedule, abstract_params, config.total_steps,
        depth=self.task.depth(), groups=self.task.layer_decay_groups())
                              if self.task.uses_optimizer else (None, None))
    self.trainable = optim.trainable_mask(abstract_params, config.optim.get("trainable_regex"))
    self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))

    self.rules = sharding.combined_rules(config.sharding.rules, self.task.sharding_rules())
    self.abstract_state = jax.eval_shape(self._init_state)
    self.state_shardings = sharding.tree_shardings(self.abstract_state, self.mesh, self.rules)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    # Which input shard this process reads: replicas of the same batch rows (a model-parallel
    # axis across processes) read the same shard.
    self.data_index, self.data_count = sharding.data_shard(self.batch_sharding, config.batch_size)
    repl = sharding.replicated(self.mesh)
    # Arrays the step reads but never trains (a teacher): sharded by the same rules, not donated.
    frozen = self.task.frozen_params()
    frozen_shardings = sharding.tree_shardings(frozen, self.mesh, self.rules)
    self.frozen = jax.device_put(frozen, frozen_shardings)
    # Scheduled token counts (EViT's keep-rate shrink) are static per compiled program: the
    # step takes the phase it runs in as a static argument, one compile per phase.
    self.phase_starts = self.task.phase_starts()
    self.train_step = jax.jit(
        self._train_step, donate_argnums=(0,), static_argnums=(3,),
        in_shardings=(self.state_shardings, self.batch_sharding, frozen_shardings),
        out_shardings=(self.state_shardings, repl))
    params_shardings = self.state_shardings["params"]
    self.eval_step = jax.jit(self._eval_step,
                             in_shardings=(params_shardings, self.batch_sharding, frozen_shardings,
                                           repl),
                             out_shardings=repl)
    self.preview_step = jax.jit(self.task.preview, in_shardings=(params_shardings, self.batch_sharding),
                                out_shardings=repl)
    self._preview_batch = None
    self.checkpointer = ckpt_lib.Checkpointer(
        os.path.join(self.workdir, "checkpoints"), every_steps=config.checkpoint.every_steps,
        keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)

  @property
  def model(self):
    """The task's train model (a k-means task has none: this raises there)."""
    return self.task.model

  def _check_batch(self):
    c = self.config
    batch_devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    micro = c.batch_size // max(c.grad_accum_steps, 1)
    if c.grad_accum_steps < 1 or c.batch_size % c.grad_accum_steps:
      raise errors.ConfigError(f"batch_size {c.batch_size} is not divisible by grad_accum_steps "
                               f"{c.grad_accum_steps}")
    if micro % batch_devices:
      raise errors.ConfigError(
          f"batch_size {c.batch_size} (micro-batch {micro}) is not divisible by the "
          f"{batch_devices} devices that split the batch (mesh data x fsdp)")
    if c.batch_size % jax.process_count():
      raise errors.ConfigError(f"batch_size {c.batch_size} is not divisible by the "
                               f"{jax.process_count()} processes")

  # ---- state and steps -------------------------------------------------------------------
  def _init_state(self, loaded=None):
    """The state at step 0; `loaded` ({"/"-path: array}) replaces those params."""
    params = self.task.init_params(jax.random.key(self.config.seed), self.example)
    if loaded:
      params = traverse_util.unflatten_dict(
          {**traverse_util.flatten_dict(params, sep="/"), **loaded}, sep="/")
    state = {"step": jnp.zeros((), jnp.int32), "params": params}
    if self.tx is not None:
      state["opt_state"] = self.tx.init(params)
    if self.config.ema_decay:
      state["ema_params"] = params
    return state

  def _grads(self, params, batch, frozen, rng, step, progress=None):
    if progress is None:
      progress = task_base.Progress(step.astype(jnp.float32) / self.config.total_steps)

    def loss_fn(p, mb, r):
      # Params the optimizer freezes (optim.train_only) get no gradient either, so a linear
      # probe differentiates only its head, not back through the encoder.
      p = jax.tree.map(lambda x, t: x if t else jax.lax.stop_gradient(x), p, self.trainable)
      return self.task.loss(p, frozen, mb, r, step, progress)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    accum = self.config.grad_accum_steps
    if accum == 1:
      (_, metrics), grads = grad_fn(params, batch, rng)
      return grads, metrics

    def split(x):
      # Strided micro-batches: every device contributes to each of them.
      x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(
          x, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES)))

    micro = jax.tree.map(split, batch)

    def micro_grads(i, mb):
      (_, m), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
      return g, m

    def body(carry, xs):
      return jax.tree.map(jnp.add, carry, micro_grads(*xs)), None

    first = jax.tree.map(lambda x: x[0], micro)
    init = jax.tree.map(jnp.zeros_like, jax.eval_shape(micro_grads, 0, first))
    (grads, metrics), _ = jax.lax.scan(body, init, (jnp.arange(accum), micro))
    return jax.tree.map(lambda x: x / accum, (grads, metrics))

  def phase(self, step: int) -> float:
    """The start of the schedule phase that optimizer step `step` (0-based) trains in."""
    done = step / self.config.total_steps
    return max([0.0] + [s for s in self.phase_starts if done >= s])

  def _train_step(self, state, batch, frozen, phase=0.0):
    step = state["step"]
    rng = jax.random.fold_in(jax.random.key(self.config.seed + 1), step)
    progress = task_base.Progress(step.astype(jnp.float32) / self.config.total_steps, phase)
    return self.task.update(state, batch, frozen, rng, progress, self._gradient_step)

  def _gradient_step(self, state, batch, frozen, rng, progress):
    """The default `Task.update`: gradients of the task's loss, one optimizer step, EMA."""
    step = state["step"]
    grads, metrics = self._grads(state["params"], batch, frozen, rng, step, progress)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"step": step + 1, "params": params, "opt_state": opt_state}
    if "ema_params" in state:
      new["ema_params"] = optax.incremental_update(params, state["ema_params"],
                                                   step_size=1.0 - self.config.ema_decay)
    metrics.update(grad_norm=optax.tree.norm(grads), lr=self.schedule(step))
    return new, metrics

  def _eval_step(self, params, batch, frozen, rng):
    return self.task.eval_sums(params, frozen, batch, rng)

  # ---- pieces of the loop ---------------------------------------------------------------
  def initial_state(self, train_iter):
    """Resumes from the workdir's latest readable checkpoint, else a fresh (or init_from) state."""
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state, self.state_shardings)
    step, state = self.checkpointer.restore_latest(abstract, train_iter, self.config)
    if state is not None:
      log.info("resumed from the checkpoint at step %d in %s", step, self.checkpointer.directory)
      return int(step), state
    if self.config.init_from.path:
      return 0, self._init_from()
    state, _ = sharding.init_sharded(self._init_state, self.mesh, self.rules)
    return 0, state

  def _init_from(self):
    """A fresh state whose params are those of `config.init_from`, read once to the host
    (params only, whatever devices wrote them), placed by this run's shardings and handed to
    the sharded init, which keeps them (donated, not copied) and initialises only the rest:
    the fresh values they replace are never made, so the host holds one extra copy of the
    params at most."""
    c = self.config.init_from
    backbone = self.task.backbone()  # the ViT that knows how to fit loaded params (posemb)
    try:
      if c.get("inflate"):
        loaded = runs.inflated_params(c.path, backbone, self.info.image_shape, kernel=c.inflate)
      else:
        loaded = ckpt_lib.load_params(c.path, image_size=self.info.image_shape[-3:-1])
    except errors.UserError as e:
      raise type(e)(f"init_from.path: {e}") from e
    loaded = ckpt_lib.subtree(loaded, c.subtree, c.path)
    adapt = functools.partial(backbone.adapt_loaded, image_size=self.info.image_shape[-3:-1],
                              method=c.posemb_resize)
    merged, kept = ckpt_lib.merge_params(self.abstract_state["params"], loaded,
                                         exclude=c.exclude or None, adapt=adapt)
    del loaded
    log.info("init_from %s (kept fresh: %s)", c.path, kept)
    placements = traverse_util.flatten_dict(self.state_shardings["params"], sep="/")
    placed = {k: jax.device_put(v, placements[k])
              for k, v in traverse_util.flatten_dict(merged, sep="/").items() if k not in kept}
    del merged
    init = jax.jit(self._init_state, donate_argnums=0, out_shardings=self.state_shardings)
    return init(placed)

  def evaluate(self, params, split=None) -> Dict[str, float]:
    """The task's metrics over the whole eval split (or `split`, a split spec such as
    "train[99%:]"); every eval draws the same randomness (random reducers get a key per batch
    index), so evals of one run are comparable."""
    totals = None
    key = jax.random.key(self.config.seed + 2)
    for i, batch in enumerate(self._eval_batches(split)):
      out = self.eval_step(params, self._global(batch), self.frozen, jax.random.fold_in(key, i))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    return self.task.eval_summary(jax.device_get(totals))

  def write_preview(self, params, step: int):
    """The task's picture (e.g. reconstructions) of the first eval batch, by process 0."""
    if self._preview_batch is None:
      self._preview_batch = self._global(next(iter(self._eval_batches())))
    arrays = self.preview_step(params, self._preview_batch)
    if jax.process_index() == 0:
      self.task.write_preview(jax.device_get(arrays), self.workdir, step)

  def _global(self, local_batch):
    return sharding.global_batch(local_batch, self.batch_sharding, self.config.batch_size)

  def _eval_batches(self, split=None):
    return pipeline.eval_iterator(self.config.data, global_batch_size=self.config.batch_size,
                                  process_index=self.data_index, process_count=self.data_count,
                                  labels=self.task.uses_labels,
                                  batch_fields=self.task.batch_fields(), seed=self.config.seed,
                                  split=split)

  def eval_splits(self) -> Dict[str, Any]:
    """{logged name: split spec} of every evaluation: "eval" is `data.eval_split` (None here),
    each of `data.eval_splits` is "eval/<name>"."""
    named = data_config_lib.Settings.parse(self.config.data).eval_splits
    return {"eval": None, **{f"eval/{name}": split for name, split in named}}

  def _drain(self, pending: List[Tuple[int, Any]]) -> Dict[str, float]:
    """Brings queued step metrics to the host; stops at the first non-finite loss."""
    records = jax.device_get([m for _, m in pending])
    for (step, _), rec in zip(pending, records):
      if not np.isfinite(rec["loss"]):
        self.checkpointer.wait()
        last = self.checkpointer.last_good_step
        raise TrainingDiverged(
            f"loss is {float(rec['loss'])} at step {step}; stopping. The last good checkpoint is "
            + (f"step {last} in {self.checkpointer.directory}" if last is not None
               else "none (this run saved or restored none)")
            + ". Lower the learning rate or raise the warmup, then resume from it")
    pending.clear()
    return _window_metrics([{k: float(v) for k, v in r.items()} for r in records])

  def _evaluate_all(self, state, step: int, logger) -> Dict[str, Dict[str, float]]:
    """The eval metrics of the params (and the EMA params) on every eval split, logged;
    previews written. The EMA's are "eval_ema" and "eval_ema/<name>"."""
    results = {}
    for name, split in self.eval_splits().items():
      results[name] = self.evaluate(state["params"], split)
      if "ema_params" in state:
        results[name.replace("eval", "eval_ema", 1)] = self.evaluate(state["ema_params"], split)
    for split, values in results.items():
      logger.write(step, values, split=split)
      log.info("%s at step %d: %s", split, step,
               ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    if self.task.previews:
      self.write_preview(state["params"], step)
    return results

  def _meta(self, step: int) -> Dict[str, Any]:
    return {"step": step, "config": json.loads(self.config.to_json_best_effort()),
            "process_count": jax.process_count(), "format_version": ckpt_lib.FORMAT_VERSION}

  def describe(self) -> str:
    """The run's key facts, in one line."""
    c, info = self.config, self.info
    model = self.task.describe_model()
    data = c.data.folder or c.data.name
    return (f"task {self.task.task_name} | {model}, {self.num_params:,} params | data {data}: "
            f"{info.train_examples:,} train / {info.eval_examples:,} eval, "
            f"{'x'.join(map(str, info.image_shape))} | batch {c.batch_size}, {c.total_steps} steps, "
            + (f"{c.optim.name} lr {c.optim.lr}" if self.tx is not None else "no optimizer")
            + f" | mesh {dict(self.mesh.shape)} over "
            f"{jax.device_count()} {jax.devices()[0].platform} devices, {jax.process_count()} "
            f"process(es) | workdir {self.workdir}")

  def run(self) -> Dict[str, Any]:
    log.info("%s", self.describe())
    claim = distributed.PrimaryClaim(self.workdir) if jax.process_index() == 0 else None
    try:
      if claim is not None:
        claim.check()
      return self._run(claim)
    finally:
      if claim is not None:
        claim.release()

  def _run(self, claim) -> Dict[str, Any]:
    c = self.config
    train_iter = pipeline.train_iterator(c.data, global_batch_size=c.batch_size, seed=c.seed,
                                         process_index=self.data_index,
                                         process_count=self.data_count,
                                         labels=self.task.uses_labels,
                                         batch_fields=self.task.batch_fields())
    start_step, state = self.initial_state(train_iter)
    primary = jax.process_index() == 0
    logger = metrics_lib.MetricLogger(self.workdir, total_steps=c.total_steps, start_step=start_step,
                                      is_primary=primary, progress=c.progress_bar,
                                      global_batch_size=c.batch_size)
    pending: List[Tuple[int, Any]] = []
    train_metrics: Dict[str, float] = {}
    eval_metrics: Dict[str, Dict[str, float]] = {}
    t_start, steps_run = time.time(), 0
    throughput = metrics_lib.Throughput(c.batch_size)
    compiled_phases = set()
    try:
      for step in range(start_step + 1, c.total_steps + 1):
        batch = self._global(next(train_iter))
        phase = self.phase(step - 1)
        # The first call of each phase's program compiles it (synchronously): not training.
        with throughput.paused() if phase not in compiled_phases else contextlib.nullcontext():
          state, metrics = self.train_step(state, batch, self.frozen, phase)
        compiled_phases.add(phase)
        throughput.count()
        self.checkpointer.poll()  # a background save that failed stops the run now
        pending.append((step, metrics))
        steps_run += 1
        last = step == c.total_steps
        do_eval = last or (c.eval_every_steps and step % c.eval_every_steps == 0)
        do_save = last or step % max(c.checkpoint.every_steps, 1) == 0
        if last or do_eval or do_save or step % c.log_every_steps == 0:
          train_metrics = self._drain(pending)
          rate = throughput.read()
          if rate is not None:
            train_metrics["images_per_s"] = rate
          if claim is not None:
            claim.check()
          logger.write(step, train_metrics, split="train")
          logger.progress(step, loss=train_metrics["loss"])
        with throughput.paused():
          if do_eval:
            eval_metrics = self._evaluate_all(state, step, logger)
          if do_save:  # reported saved by the checkpointer once committed
            self.checkpointer.save(step, state, train_iter, self._meta(step), force=True)
    finally:
      self.checkpointer.close()
      logger.close()

    wall = time.time() - t_start
    if steps_run == 0:
      # Already finished: its summary (training time, metrics) stays as the run wrote it.
      saved = metrics_lib.read_summary(self.workdir)
      if saved is not None:
        return saved
    summary = {
        "task": self.task.task_name, "headline": self.task.headline,
        "final_step": c.total_steps, "start_step": start_step, "train": train_metrics,
        **eval_metrics, "wall_time_s": wall, "steps_run": steps_run,
        # Training only: compilation, evaluation and saves left out.
        "images_per_s": throughput.overall,
        "num_params": self.num_params, "devices": jax.device_count(),
        "processes": jax.process_count(), "mesh": dict(self.mesh.shape),
    }
    if primary:
      metrics_lib.write_summary(self.workdir, summary)
    return summary


def run(config, workdir: str) -> Dict[str, Any]:
  """Trains per `config` in `workdir` (resuming from its checkpoints); returns the summary."""
  distributed.maybe_initialize(config.distributed)
  return Trainer(config, workdir).run()
