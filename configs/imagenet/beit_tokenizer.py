"""BEiT's visual tokenizer, fitted first: vitoken's own k-means over ImageNet's contrast-normalised
16 px patches, 8192 codes, one per patch of the BEiT encoder. It is not BEiT's DALL-E dVAE
(vitoken ships no DALL-E weights); configs/imagenet/beit_pretrain.py predicts its codes.

  python -m vitoken.tokenizers --config=configs/imagenet/beit_tokenizer.py --workdir=gs://bucket/beit_tok

Should reproduce: a tokenizer has no accuracy of its own; BEiT's reference is 83.2% top-1 for
ViT-B/16 fine-tuned after 800 pretraining epochs against DALL-E's codes (Bao et al. 2022, "BEiT:
BERT Pre-Training of Image Transformers", Table 1), which this k-means tokenizer is not expected
to match exactly. The fit logs the codebook's usage and the patches' distance to their codes.

Recipe: mini-batch k-means (the kmeans_tokenizer task, configs/visual_tokenizer.py's at ImageNet
scale): 2000 mini-batches of 256 images (50,176 patches each; 512,000 images, 0.4 of an epoch),
patches normalised per patch (eps 0.1), random-resized crops and flips as BEiT's pretraining
sees them.

Hardware: k-means is a distance matmul and a scatter a step: one accelerator with >= 16 GB (or
one host's) fits it in well under an hour.

Arguments: folder, data_dir, runlocal (configs/imagenet/common.py).
"""
import os
import sys

# Config files are loaded by path: the repository root goes on the path so that the shared
# recipe module imports whatever directory the command runs from.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
from configs.imagenet import common  # noqa: E402

SMOKE = ("runlocal",)


def get_config(arg=None):
  arg = common.parse(arg)
  c = common.start(arg)
  c.task = dict(name="kmeans_tokenizer", codebook_size=64 if arg.runlocal else 8192,
                patch_size=common.TOY_MODEL["patch_size"][0] if arg.runlocal else 16, eps=0.1)
  c.model = {}
  c.batch_size = 256
  c.total_steps = 2000
  c.eval_every_steps = 0  # k-means evaluates its codebook once, at the end
  c.checkpoint.every_steps = 500
  return common.runlocal(c, arg)
