"""ToMe trained: MAE's ViT-B/16 fine-tuned on ImageNet-1k with token merging on, r=16 in every
block, from configs/imagenet/mae_pretrain.py's encoder.

  python -m vitoken.train --config=configs/imagenet/tome_trained.py:init=gs://bucket/mae_b16 --workdir=gs://bucket/mae_b16_tome16

Should reproduce: 81.91% top-1 on ImageNet-1k val at r=16 (83.62% dense), about 2x the
throughput (the ToMe reference README, "results after training" with MAE's fine-tuning; Bolya
et al. 2023, "Token Merging: Your ViT but Faster"). Off the shelf, the same r costs more: see
configs/imagenet/tome_off_the_shelf.py.

Recipe: configs/imagenet/mae_finetune.py's (100 epochs of 1024, layer decay 0.65, ...) with
ToMe merging r tokens in each block during training and evaluation, proportional attention on:
the README says its trained checkpoints (these numbers) used prop_attn=True, and that
prop_attn=False is for off-the-shelf MAE models (tome/patch/mae.py's "prop_attn should be set to
false" is that off-the-shelf case).

Hardware: as mae_finetune.py (8+ accelerators with >= 32 GB); merging makes each step faster.

Arguments: init (the MAE pretraining workdir), r (default 16), variant (B/16 | L/16), and
folder, data_dir, runlocal (configs/imagenet/common.py).
"""
import os
import sys

# Config files are loaded by path: the repository root goes on the path so that the shared
# recipe module imports whatever directory the command runs from.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
from configs.imagenet import common  # noqa: E402

# ToMe merges r of the 65 tokens runlocal's toy encoder starts with in each of its 4 blocks.
TOY_R = 2
SMOKE = ("init=<mae_pretrain.py:runlocal>,runlocal",)


def get_config(arg=None):
  arg = common.parse(arg, variant="B/16", init="", r=16)
  c = common.start(arg, variant=arg.variant)
  common.mae_finetune(c, arg, arg.variant)
  c.model.token_reduction = {"method": "tome", "r": TOY_R if arg.runlocal else arg.r,
                             "prop_attn": True}
  return common.runlocal(c, arg)
