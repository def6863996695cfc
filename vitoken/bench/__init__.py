"""`python -m vitoken.bench --config=configs/bench.py[:arg]`: ViT throughput and MFU.

Images/s for inference and for a full train step, for every backbone x variant (any
`token_reduction`, attention implementation, scan/remat) x batch size of the config, with
XLA's and the analytic FLOPs and the MFU they imply; with torch present, timm's ViT and the
ToMe reference patch in the same process. Writes `<out>/bench_<platform>.{json,md}`.
"""
import json
import os
from typing import Any, Dict, List, Tuple

from vitoken.bench import core, torch_baselines

COLUMNS = ["backbone", "variant", "mode", "batch", "tokens", "analytic GFLOPs/img",
           "XLA / analytic", "img/s (min-max)", "x dense", "TFLOP/s", "MFU", "status"]


def run(config) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
  """Runs the benchmark a config describes; (rows, meta). Writes files when `config.out`."""
  rows, meta = core.bench(config)
  if config.torch.enabled:
    why = torch_baselines.missing()
    meta["torch"] = why or "timm and the ToMe reference (where installed), same process"
    if why is None:
      base = dict(config.model)
      for backbone in config.backbones:
        name, fields = core.backbone_fields(backbone, base)
        fields.setdefault("num_classes", config.num_classes)
        fields.setdefault("channels", config.channels)
        torch_rows = torch_baselines.bench(
            fields, name=name, image_size=config.image_size, batch_sizes=config.batch_sizes,
            modes=config.modes, dtype=config.dtype, tome_rs=tuple(config.torch.tome_rs),
            windows=config.windows, iters=config.iters, warmup=config.warmup)
        rows.extend(_relative_to_dense(torch_rows, rows))
  table = markdown(rows)
  if config.out:
    write(config.out, rows, meta, table)
  return rows, meta


def _relative_to_dense(torch_rows, rows):
  dense = {(r["backbone"], r["mode"], r["batch"]): r.get("img/s") for r in rows
           if r.get("x dense") == 1.0}
  for r in torch_rows:
    d = dense.get((r["backbone"], r["mode"], r["batch"]))
    if r["status"] == "ok" and d:
      r["x dense"] = r["img/s"] / d
  return torch_rows


def markdown(rows) -> str:
  def cell(row, col):
    if col == "img/s (min-max)":
      return (f"{row['img/s']:,.0f} ({row['img/s min']:,.0f}-{row['img/s max']:,.0f})"
              if "img/s" in row else "-")
    v = row.get(col, "-")
    if isinstance(v, float):
      if v != v:  # nan: not measured (MFU without a known peak)
        return "-"
      return f"{v:.1%}" if col == "MFU" else f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(cell(r, c) for c in COLUMNS) + " |" for r in rows]
  return "\n".join(lines)


def write(out: str, rows, meta, table: str) -> str:
  os.makedirs(out, exist_ok=True)
  platform = meta["device"].split(":")[0]
  stem = os.path.join(out, f"bench_{platform}")
  with open(stem + ".json", "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
  with open(stem + ".md", "w") as f:
    f.write(f"<!-- {json.dumps(meta, default=str)} -->\n{table}\n")
  return stem
