"""The PyTorch peers in the same process: timm's ViT (eager; inference in the compute dtype,
training with autocast and fused AdamW on GPU, as timm trains) and the ToMe reference's timm
patch (facebookresearch/ToMe, `tome.patch.timm`, proportional attention) where installed.
Same shapes, random weights and inputs, the same windows-and-median timing as vitoken's.
"""
import statistics
import time
from typing import Any, Dict, List, Optional

from vitoken.convert.torch_reference import import_timm


def missing() -> Optional[str]:
  """Why the torch baselines cannot run here (None when they can)."""
  try:
    import_timm()
  except Exception as e:  # pylint: disable=broad-except
    return f"torch/timm not importable: {type(e).__name__}: {e}"
  return None


def _tome():
  try:
    import tome  # pylint: disable=import-outside-toplevel  (optional: the ToMe reference, with torch)
    return tome
  except ImportError:
    return None


def _timm_vit(fields: Dict[str, Any], image_size: int):
  timm = import_timm()
  width = fields["width"]
  return timm.models.vision_transformer.VisionTransformer(
      img_size=image_size, patch_size=fields["patch_size"][0], in_chans=fields["channels"],
      num_classes=fields["num_classes"], embed_dim=width, depth=fields["depth"],
      num_heads=fields["num_heads"], mlp_ratio=(fields.get("mlp_dim") or 4 * width) / width,
      class_token=True, global_pool="token")


def _timed(run, sync, batch: int, windows: int, iters: int, warmup: int) -> Dict[str, float]:
  for _ in range(warmup):
    run()
  sync()
  samples = []
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(iters):
      run()
    sync()
    samples.append(batch * iters / (time.perf_counter() - start))
  return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def bench(fields: Dict[str, Any], *, name: str, image_size: int, batch_sizes, modes, dtype: str,
          tome_rs=(), windows: int = 5, iters: int = 5, warmup: int = 2) -> List[Dict[str, Any]]:
  """Rows like vitoken.bench.core's for timm (and the ToMe reference at each r of `tome_rs`)."""
  import torch  # pylint: disable=import-outside-toplevel  (heavy and optional)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype or "", torch.float32)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  tome = _tome()
  rows = []
  for batch in batch_sizes:
    x = torch.randn(batch, fields["channels"], image_size, image_size, device=device)
    y = torch.randint(0, max(fields["num_classes"], 1), (batch,), device=device)
    for mode in modes:
      systems = [("timm", None)] + [(f"ToMe reference r={r}", r) for r in (tome_rs if mode == "inference" else ())]
      for system, r in systems:
        row = {"backbone": name, "variant": system, "mode": mode, "batch": batch}
        if r is not None and tome is None:
          rows.append({**row, "status": "facebookresearch/ToMe (tome) not installed"})
          continue
        try:
          model = _timm_vit(fields, image_size).to(device)
          if r is not None:
            tome.patch.timm(model, prop_attn=True)
            model.r = r
          if mode == "inference":
            model = model.eval().to(tdtype)
            xs = x.to(tdtype)

            def run(model=model, xs=xs):
              with torch.inference_mode():
                return model(xs)
          else:
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05,
                                    **({"fused": True} if device == "cuda" else {}))
            loss_fn = torch.nn.CrossEntropyLoss()

            def run(model=model, opt=opt, loss_fn=loss_fn):
              with torch.autocast(device_type=device, dtype=tdtype, enabled=tdtype != torch.float32):
                loss = loss_fn(model(x), y)
              loss.backward()
              opt.step()
              opt.zero_grad(set_to_none=True)
              return loss
          s = _timed(run, sync, batch, windows, iters, warmup)
          rows.append({**row, "status": "ok", "img/s": s["median"], "img/s min": s["min"],
                       "img/s max": s["max"]})
        except torch.cuda.OutOfMemoryError if device == "cuda" else MemoryError:
          rows.append({**row, "status": "out of memory"})
        finally:
          if device == "cuda":
            torch.cuda.empty_cache()
        print(rows[-1], flush=True)
  return rows
