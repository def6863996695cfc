"""Imports timm for parity checks on a CPU-only torch (no torchvision C++ ops).

torchvision's CPU-less wheel registers fake kernels for `nms`/`qnms` at import; without the
compiled ops those registrations fail, so declare the two schemas first. Only tests, demos and
benchmarks import this; vitoken itself never needs torch.
"""
import importlib


def import_timm():
  import torch  # pylint: disable=import-outside-toplevel  (heavy and optional)
  try:
    torch.ops.torchvision.nms  # noqa: B018  (present when torchvision's C++ ops load)
  except (AttributeError, RuntimeError):
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
      if not hasattr(torch.ops.torchvision, op):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import_timm._keepalive = lib  # the schemas live only as long as the Library object
  return importlib.import_module("timm")
