"""Timing ViT inference and train steps: images/s, FLOPs (XLA's and analytic) and MFU.

Every case compiles once (`jit(...).lower(...).compile()`, whose cost analysis gives XLA's
FLOPs), warms up, then runs in timed windows of `iters` calls ended by `block_until_ready`;
the variants of one (backbone, mode, batch) group run interleaved, window by window, so a
noisy machine's drift hits them alike, and each reports the median over windows with the
spread. A train step is the whole of one: forward, backward and the AdamW update, bf16 compute
(`dtype`) on fp32 master weights, with the train state donated. MFU is the model's analytic
FLOPs at the measured rate over the device's peak (dense bf16 tensor-core FLOP/s, by device
kind, or `peak_tflops`).
"""
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitoken import settings as settings_lib
from vitoken.bench import flops as flops_lib
from vitoken.models import variants as variants_lib, vit
from vitoken.tasks.base import model_rngs

MODES = ("inference", "train")
# Dense bf16 peak TFLOP/s by device kind (first substring that matches).
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4),
               ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("TPU v6", 918.0),
               ("TPU v5 lite", 197.0), ("TPU v5", 459.0), ("TPU v4", 275.0))


def device_peak_tflops(device=None) -> Optional[float]:
  kind = getattr(device or jax.devices()[0], "device_kind", "")
  return next((peak for name, peak in PEAK_TFLOPS if name in kind), None)


def backbone_fields(backbone: Any, base: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
  """(name, ViT fields) of a backbone: a variant string like "B/16" or a dict of fields."""
  if isinstance(backbone, str):
    return backbone, {**base, **variants_lib.decode_variant(backbone)}
  fields = settings_lib.as_dict(backbone, "bench backbone")
  name = fields.pop("name", None) or "custom"
  return name, {**base, **variants_lib.decode_variant(fields.pop("variant", None)), **fields}


class TimedProgram:
  """One compiled program (inference or train step) of one variant, ready to time."""

  def __init__(self, model, params, mode: str, batch: int, image_size: int, channels: int):
    self.model, self.mode, self.batch = model, mode, batch
    key = jax.random.key(0)
    self.images = jax.random.normal(key, (batch, image_size, image_size, channels), jnp.float32)
    t0 = time.perf_counter()
    if mode == "inference":
      fn = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
      self.args = (params, self.images)
      self.compiled = fn.lower(*self.args).compile()
    else:
      tx = optax.adamw(1e-4, weight_decay=0.05)
      labels = jax.random.randint(key, (batch,), 0, max(model.num_classes, 1))

      def step(state, x, y):
        def loss_fn(p):
          logits, _ = model.apply({"params": p}, x, train=True,
                                 rngs=model_rngs(model, jax.random.key(1), train=True))
          return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(state[0])
        updates, opt_state = tx.update(grads, state[1], state[0])
        return (optax.apply_updates(state[0], updates), opt_state), loss

      # A copy of the params: the donated state is consumed by every call.
      self.state = (jax.tree.map(jnp.copy, params), tx.init(params))
      self.labels = labels
      self.compiled = jax.jit(step, donate_argnums=0).lower(self.state, self.images, labels).compile()
    self.compile_s = time.perf_counter() - t0
    self.xla_flops = flops_lib.compiled_flops(self.compiled) / batch

  def run(self):
    if self.mode == "inference":
      return self.compiled(*self.args)
    self.state, loss = self.compiled(self.state, self.images, self.labels)
    return loss


def interleaved_throughput(fns: Dict[str, Callable], *args, batch: int, windows: int = 5,
                           iters: int = 5, warmup: int = 2) -> Dict[str, Dict[str, float]]:
  """Items/s of each `fns[name](*args)`, timed in interleaved windows (each window runs every
  variant once, so drifts of a shared, noisy machine hit all alike): median and spread."""
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn(*args))
  samples: Dict[str, List[float]] = {name: [] for name in fns}
  for _ in range(windows):
    for name, fn in fns.items():
      start = time.perf_counter()
      for _ in range(iters):
        out = fn(*args)
      jax.block_until_ready(out)
      samples[name].append(batch * iters / (time.perf_counter() - start))
  return {n: {"median": statistics.median(v), "min": min(v), "max": max(v)} for n, v in samples.items()}


def _is_oom(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def bench(config) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
  """Rows of images/s, FLOPs and MFU for every backbone x variant x mode x batch size."""
  c = config
  bad = [m for m in c.modes if m not in MODES]
  if bad:
    raise ValueError(f"bench modes must be among {MODES}, got {bad}")
  peak = float(c.peak_tflops) if c.peak_tflops else device_peak_tflops()
  rows: List[Dict[str, Any]] = []
  parity = {}
  for backbone in c.backbones:
    name, fields = backbone_fields(backbone, settings_lib.as_dict(c.model, "bench model"))
    fields.setdefault("num_classes", c.num_classes)
    fields.setdefault("channels", c.channels)
    if c.dtype:
      fields["dtype"] = jnp.dtype(c.dtype)
    variants = settings_lib.as_dict(c.variants, "bench variants")
    if c.baseline not in variants:
      raise ValueError(f"bench baseline {c.baseline!r} is not among the variants {sorted(variants)}")
    order = [c.baseline] + sorted(v for v in variants if v != c.baseline)
    models = {v: vit.VisionTransformer(**{**fields, **settings_lib.as_dict(variants[v], f"variant {v}")})
              for v in order}
    probe = jnp.zeros((1, c.image_size, c.image_size, c.channels), jnp.float32)
    params = _init_params(models, probe)
    if c.check_parity:
      parity[name] = attention_parity(fields, params[next(iter(models))], probe)
    for batch in c.batch_sizes:
      images = jax.ShapeDtypeStruct((batch, c.image_size, c.image_size, c.channels), jnp.float32)
      for mode in c.modes:
        cases, failed = {}, {}
        for v, model in models.items():
          try:
            cases[v] = TimedProgram(model, params[v], mode, batch, c.image_size, c.channels)
          except Exception as e:  # pylint: disable=broad-except
            if not _is_oom(e):
              raise
            failed[v] = "out of memory"
        try:
          speed = (interleaved_throughput({v: case.run for v, case in cases.items()}, batch=batch,
                                          windows=c.windows, iters=c.iters, warmup=c.warmup)
                   if cases else {})
        except Exception as e:  # pylint: disable=broad-except
          if not _is_oom(e):
            raise
          speed, failed = {}, {**failed, **{v: "out of memory" for v in cases}}
        dense = speed.get(next(iter(models)), {}).get("median")
        for v, model in models.items():
          row = {"backbone": name, "variant": v, "mode": mode, "batch": batch}
          row.update(flops_lib.summary(model, params[v], images))
          if mode == "train":
            row["analytic GFLOPs/img"] *= flops_lib.TRAIN_FACTOR
          if v in failed or v not in speed:
            row.update(status=failed.get(v, "not run"))
          else:
            s, case = speed[v], cases[v]
            achieved = row["analytic GFLOPs/img"] * 1e9 * s["median"]
            row.update(status="ok", **{
                "img/s": s["median"], "img/s min": s["min"], "img/s max": s["max"],
                "x dense": s["median"] / dense if dense else float("nan"),
                "XLA GFLOPs/img": case.xla_flops / 1e9,
                "XLA / analytic": case.xla_flops / (row["analytic GFLOPs/img"] * 1e9),
                "TFLOP/s": achieved / 1e12,
                "MFU": achieved / (peak * 1e12) if peak else float("nan"),
                "compile s": case.compile_s})
          rows.append(row)
          print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()}, flush=True)
        del cases
  meta = {"device": f"{jax.devices()[0].platform}:{getattr(jax.devices()[0], 'device_kind', '')}",
          "devices": jax.device_count(), "jax": jax.__version__, "peak TFLOP/s": peak,
          "dtype": c.dtype or "float32", "image_size": c.image_size, "windows": c.windows,
          "iters": c.iters, "warmup": c.warmup, "attention parity (max |logit diff| vs XLA)": parity,
          "flops": "XLA: cost analysis of the compiled program; analytic: the ViT's matmuls "
                   "(vitoken.bench.flops); both 2 per multiply-add; MFU from the analytic count"}
  return rows, meta


def _init_params(models, probe) -> Dict[str, Any]:
  """Params per variant; variants with the same parameter shapes share one set."""
  out, by_shape = {}, {}
  for v, model in models.items():
    shapes = jax.eval_shape(lambda x, m=model: m.init(jax.random.key(0), x), probe)["params"]
    key = str(jax.tree.map(lambda a: (a.shape, str(a.dtype)), shapes))
    if key not in by_shape:
      by_shape[key] = jax.jit(lambda x, m=model: m.init(jax.random.key(0), x)["params"])(probe)
    out[v] = by_shape[key]
  return out


def attention_parity(fields, params, probe, batch: int = 4) -> float:
  """Max |logit difference| between the configured attention and plain XLA attention."""
  images = jax.random.normal(jax.random.key(3), (batch, *probe.shape[1:]), jnp.float32)
  outs = []
  for impl in (fields.get("attention_impl"), "xla"):
    model = vit.VisionTransformer(**{**fields, "attention_impl": impl})
    outs.append(np.asarray(jax.jit(lambda p, x, m=model: m.apply({"params": p}, x)[0])(params, images),
                           np.float32))
  return float(np.abs(outs[0] - outs[1]).max())
