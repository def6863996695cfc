"""The identity reducer: keeps every token. The baseline, and the contract's simplest proof."""
from typing import Optional, Sequence

from vitoken.models.reducers import base


@base.register("identity")
class Identity(base.Reducer):
  stages = (base.POST_ATTN,)
  changes_shape = False

  @classmethod
  def layer_settings(cls, depth: int, layers: Optional[Sequence[int]] = None):
    return {i: {} for i in (range(depth) if layers is None else layers)}

  def __call__(self, state, info, *, train=False):
    return state, {}
