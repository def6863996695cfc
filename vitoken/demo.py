"""Converts a timm ViT into vitoken and checks that both give the same logits.

    python -m vitoken.demo [--model vit_small_patch16_224] [--batch 8]

No download: the timm model is randomly initialised (every weight perturbed, so no zero-init
hides a conversion mistake). Exits non-zero when the logits differ by more than --tol.
"""
import argparse
import sys
import time

import jax
import numpy as np

from vitoken.convert import from_timm
from vitoken.convert.torch_reference import import_timm


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="vit_small_patch16_224", help="a timm vit_* model name")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--tol", type=float, default=1e-4, help="max abs logit difference allowed")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  import torch  # pylint: disable=import-outside-toplevel  (heavy; only the demo needs it)
  timm = import_timm()

  torch.manual_seed(args.seed)
  model = timm.create_model(args.model, pretrained=False).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  h, w = model.patch_embed.img_size
  images = np.random.RandomState(args.seed).randn(args.batch, 3, h, w).astype(np.float32)

  t0 = time.perf_counter()
  module, params = from_timm(model)
  convert_s = time.perf_counter() - t0
  apply = jax.jit(module.apply)
  nhwc = images.transpose(0, 2, 3, 1)
  logits = np.asarray(apply({"params": params}, nhwc)[0])  # compiles
  t0 = time.perf_counter()
  logits = np.asarray(jax.block_until_ready(apply({"params": params}, nhwc)[0]))
  jax_s = time.perf_counter() - t0
  with torch.no_grad():
    t0 = time.perf_counter()
    ref = model(torch.from_numpy(images)).numpy()
    torch_s = time.perf_counter() - t0

  diff = float(np.abs(logits - ref).max())
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(f"model        {args.model}: {n_params / 1e6:.1f}M params, {h}x{w} images, "
        f"pool={module.pool_type}, converted in {convert_s:.1f}s")
  print(f"parity       max |logits_vitoken - logits_timm| = {diff:.2e} (tolerance {args.tol:.0e}, "
        f"logits up to {np.abs(ref).max():.2f})")
  print(f"throughput   vitoken (jit, {jax.devices()[0].platform}) {args.batch / jax_s:.1f} img/s, "
        f"timm eager {args.batch / torch_s:.1f} img/s, batch {args.batch}")
  ok = diff <= args.tol
  print("PASS" if ok else "FAIL")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
