"""FLOPs of a ViT: counted by XLA from the compiled program, and analytically from the model.

The analytic count is the matmuls of the network at the token counts that reach each block
(2 FLOPs per multiply-add, as XLA counts; papers often quote multiply-adds): the patch
embedding, per block the QKV and output projections, the attention logits and the weighted
sum of values at the tokens entering the block, the MLP at the tokens leaving it (reducers
between attention and MLP, as ToMe and EViT, shrink it), and the head. Norms, softmax and
activations, and a reducer's own small matmuls (ToMe's similarities), are left out, so the
count is a lower bound that XLA's should exceed by a few percent for a dense model. A train
step is counted as three forward passes (forward, and a backward of twice its cost).
"""
from typing import Dict, List, Tuple

import jax


def compiled_flops(compiled) -> float:
  """FLOPs XLA's cost analysis gives a compiled program (nan when it gives none)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", float("nan")))


def token_counts(model, params, images) -> Tuple[List[int], List[int]]:
  """(tokens of each example entering each block and after the last, tokens in each block's
  attention, per sequence), from shapes alone (no computation)."""
  probe = model.clone(return_attention=True)
  _, aux = jax.eval_shape(lambda p, x: probe.apply({"params": p}, x), params, images)
  blocks, attention = aux["blocks"], aux["attention"]
  if not isinstance(blocks, dict):  # scanned: stacked arrays, every block the same size
    counts = [int(blocks.shape[2])] * int(blocks.shape[0])
    attended = [int(attention.shape[-1])] * int(attention.shape[0])
  else:
    # Per example: a reducer may run frames as sequences of their own (TempMe).
    counts = [int(v.shape[0]) * int(v.shape[1]) // int(images.shape[0])
              for _, v in sorted(blocks.items())]
    attended = [int(v.shape[-1]) for _, v in sorted(attention.items())]
  return [model.patch_grid(images.shape[1:-1]).num_patches + model.num_prefix] + counts, attended


def tokens_string(counts: List[int]) -> str:
  return ">".join(str(c) for c in counts)


def analytic_forward_flops(model, counts: List[int], attended: List[int], channels: int) -> float:
  """Per-image forward FLOPs of the ViT's matmuls: each block's attention at the tokens it
  attends over, its MLP at the fewer of those and the tokens leaving the block (a reducer
  between attention and MLP, as ToMe and EViT, shrinks the MLP; TokenFuser restores tokens
  only after it)."""
  d = model.width
  mlp = model.mlp_dim or 4 * d
  ph, pw = model.patch_size
  patches = counts[0] - model.num_prefix
  total = 2.0 * patches * ph * pw * channels * d
  for n_attn, n_out in zip(attended, counts[1:]):
    n_mlp = min(n_attn, n_out)
    total += 2.0 * n_attn * d * 3 * d  # qkv
    total += 2.0 * 2 * n_attn * n_attn * d  # logits and weighted values
    total += 2.0 * n_attn * d * d  # output projection
    total += 2.0 * 2 * n_mlp * d * mlp  # the MLP's two matmuls
  if model.num_classes:
    total += 2.0 * d * model.num_classes
  return total


def summary(model, params, images) -> Dict[str, object]:
  """{"tokens": "197>189>...", "analytic GFLOPs/img": forward}"""
  counts, attended = token_counts(model, params, images)
  return {"tokens": tokens_string(counts),
          "analytic GFLOPs/img": analytic_forward_flops(model, counts, attended,
                                                        images.shape[-1]) / 1e9}


TRAIN_FACTOR = 3.0  # forward + backward (twice the forward's matmuls)
