"""Fitting a tokenizer into a workdir, and loading one from it.

FSQ trains with the ordinary trainer. k-means runs its own loop here: mini-batch updates over
the streamed training set, checkpointed with the data position (so an interrupted fit
resumes where it stopped), then codebook usage on the eval split and `summary.json`, as a
trainer run writes them.
"""
import json
import logging
import os
import time
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

from vitoken import paths

log = logging.getLogger("vitoken")
TOKENIZER_TASKS = ("kmeans_tokenizer", "fsq_tokenizer")


def _task_name(config) -> str:
  name = (config.get("task") or {}).get("name")
  if name not in TOKENIZER_TASKS:
    raise ValueError(f"config.task.name {name!r} is not a tokenizer; tokenizers: {TOKENIZER_TASKS}")
  return name


def fit(config, workdir: str) -> Dict[str, Any]:
  """Fits (k-means) or trains (FSQ) the tokenizer `config.task` describes; its summary."""
  if _task_name(config) == "fsq_tokenizer":
    from vitoken.train import trainer  # pylint: disable=import-outside-toplevel
    return trainer.run(config, workdir)
  return _fit_kmeans(config, workdir)


def _fit_kmeans(config, workdir: str) -> Dict[str, Any]:
  # pylint: disable=import-outside-toplevel
  from vitoken import tasks
  from vitoken.data import pipeline
  from vitoken.engine import checkpoint as ckpt_lib, metrics as metrics_lib
  from vitoken.train import config as config_lib, trainer
  config_lib.check_keys(config)
  if jax.process_count() > 1:
    raise ValueError("k-means fitting runs in one process (its updates are not reduced across "
                     "hosts); fit it on one host and share the workdir")
  workdir = trainer.check_workdir(workdir)
  c = config
  info = pipeline.dataset_info(c.data)
  task = tasks.build(c, info)
  tok = task.tokenizer()
  train_iter = pipeline.train_iterator(c.data, global_batch_size=c.batch_size, seed=c.seed,
                                       labels=False)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       every_steps=c.checkpoint.every_steps, keep=c.checkpoint.keep,
                                       async_save=False)
  k, dim = tok.codebook_size, tok.patch_dim(info.image_shape[-1])
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32),
              "params": {"centroids": jax.ShapeDtypeStruct((k, dim), jnp.float32),
                         "counts": jax.ShapeDtypeStruct((k,), jnp.float32)}}
  start, state = checkpointer.restore_latest(abstract, train_iter, c)
  start = int(start or 0)
  meta = lambda step: {"step": step, "config": json.loads(c.to_json_best_effort()),
                       "process_count": jax.process_count()}
  logger = metrics_lib.MetricLogger(workdir, total_steps=c.total_steps, start_step=start,
                                    progress=c.progress_bar, global_batch_size=c.batch_size)
  update = jax.jit(tok.update, donate_argnums=0)
  params = state["params"] if state is not None else None
  t0, steps_run = time.time(), 0
  train = {}
  try:
    for step in range(start + 1, c.total_steps + 1):
      images = jnp.asarray(next(train_iter)["image"])
      if params is None:
        params = jax.jit(tok.init)(jax.random.key(c.seed), images)
      params, inertia = update(params, images)
      steps_run += 1
      if step % c.log_every_steps == 0 or step == c.total_steps:
        train = {"loss": float(inertia)}
        logger.write(step, train, split="train")
        logger.progress(step, loss=train["loss"])
      if step % max(c.checkpoint.every_steps, 1) == 0 or step == c.total_steps:
        checkpointer.save(step, {"step": jnp.asarray(step, jnp.int32), "params": params},
                          train_iter, meta(step), force=True)
  finally:
    checkpointer.close()
  wall = time.time() - t0
  if steps_run == 0:
    logger.close()
    saved = metrics_lib.read_summary(workdir)
    if saved is not None:
      return saved
  evaluation = evaluate(task, params, c)
  logger.write(c.total_steps, evaluation, split="eval")
  logger.close()
  log.info("k-means tokenizer: %s", evaluation)
  summary = {"task": task.task_name, "headline": task.headline, "final_step": c.total_steps,
             "start_step": start, "train": train, "eval": evaluation, "wall_time_s": wall,
             "steps_run": steps_run,
             "images_per_s": steps_run * c.batch_size / wall if wall > 0 else None}
  metrics_lib.write_summary(workdir, summary)
  return summary


def evaluate(task, params, config) -> Dict[str, float]:
  """The tokenizer task's eval metrics (error, codebook usage) over the eval split."""
  from vitoken.data import pipeline  # pylint: disable=import-outside-toplevel
  step = jax.jit(lambda p, b: task.eval_sums(p, {}, b, None))
  totals = None
  for batch in pipeline.eval_iterator(config.data, global_batch_size=config.batch_size,
                                      labels=False, seed=config.seed):
    out = step(params, batch)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  return task.eval_summary(jax.device_get(totals))


def load(path, info=None) -> Tuple[Any, Any]:
  """(tokenizer, params) of a tokenizer's workdir or checkpoint; `tokenizer.encode(params,
  images)` gives the codes. `info` (a pipeline.DataInfo) defaults to the run's own data."""
  # pylint: disable=import-outside-toplevel
  from vitoken import tasks
  from vitoken.data import pipeline
  from vitoken.engine import checkpoint as ckpt_lib
  if not path:
    raise ValueError("the tokenizer needs a `path`: the workdir of `python -m vitoken.tokenizers`")
  if not paths.resolve(path).exists():
    raise FileNotFoundError(f"tokenizer: {path} does not exist (fit one with `python -m "
                            "vitoken.tokenizers --config=configs/visual_tokenizer.py --workdir=...`)")
  config = ckpt_lib.load_run_config(path)
  name = (config.get("task") or {}).get("name")
  if name not in TOKENIZER_TASKS:
    raise ValueError(f"{path} holds a {name!r} run, not a tokenizer ({TOKENIZER_TASKS})")
  if info is None:
    info = pipeline.DataInfo(num_classes=0, image_shape=_image_shape(config), train_examples=0,
                             eval_examples=0)
  task = tasks.build(config, info)
  params = jax.tree.map(jnp.asarray, ckpt_lib.load_params(path))
  # Enough images for k-means++ to have a patch per code; eval_shape only traces.
  tok = task.tokenizer()
  gh, gw = info.image_shape[0] // tok.patch_size[0], info.image_shape[1] // tok.patch_size[1]
  images = jax.ShapeDtypeStruct((-(-tok.codebook_size // (gh * gw)), *info.image_shape), jnp.float32)
  want = jax.tree.map(lambda a: a.shape, jax.eval_shape(task.init_params, jax.random.key(0),
                                                        {"image": images}))
  got = jax.tree.map(jnp.shape, params)
  if jax.tree.structure(got) != jax.tree.structure(want) or got != want:
    raise ValueError(f"the tokenizer checkpoint at {path} does not fit the tokenizer its config "
                     f"describes (params {got} vs {want}): a different or damaged checkpoint")
  return task.tokenizer(), params


def _image_shape(config):
  size = int(config.data.image_size)
  channels = int(config.get("model", {}).get("channels", 0) or 0)
  return (size, size, channels or _data_channels(config))


def _data_channels(config) -> int:
  from vitoken.data import pipeline  # pylint: disable=import-outside-toplevel
  return pipeline.dataset_info(config.data).image_shape[-1]
