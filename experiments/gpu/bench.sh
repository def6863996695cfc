#!/usr/bin/env bash
# The GPU performance table (ViT-S/16, B/16, L/16 at 224 px, bf16) beside timm and the ToMe
# reference, in about 8 minutes on one H100. Prepare once, here (where pip works):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl ml-collections==1.1.0
# then run it on the GPU machine from the repository root, carrying .whl:
#   bash experiments/gpu/bench.sh            # writes $OUT (or experiments/results/gpu)
# (BENCH_EXTRA=,tiny OUT=/tmp/x bash experiments/gpu/bench.sh checks the script on a CPU.)
# The ToMe reference rows need facebookresearch/ToMe importable as `tome` (e.g. a checkout
# on PYTHONPATH); without it they say "not installed".
set -uo pipefail
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
out=${OUT:-experiments/results/gpu}
runs=/tmp/vitoken_bench  # one folder per run; merged into $out at the end ($OUT keeps 8 files)
mkdir -p "$out" "$runs"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
python3 -c "import jax, flax, optax, torch, timm; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'timm', timm.__version__, jax.devices())" | tee -a "$out/device.txt"

bench() {  # name, config argument
  local name=$1; shift
  timeout 170 python3 -m vitoken.bench --config="configs/bench.py:gpu,$1${BENCH_EXTRA:-}" --config.out="$runs/$name" \
    2>&1 | tee -a "$out/bench.log" | grep -v "^I[0-9]" | tail -25
}
# ViT-B/16: every inference variant beside timm and the ToMe reference (r = 0, 8, 16).
bench b16_inference "variant=B/16,modes=inference,only=dense_xla_attention+tome_r8+tome_r16+tome_r16_onehot"
# ViT-B/16 train step: cuDNN (padded) against XLA attention, and timm's AMP + fused AdamW.
bench b16_train "variant=B/16,modes=train,only=dense_xla_attention"
# ViT-S/16 and ViT-L/16: dense and ToMe r=16, then the largest batches that fit.
bench s16 "variant=S/16,only=tome_r16,batch=256+1024"
bench l16 "variant=L/16,only=tome_r16+dense_scan_remat,batch=128+256"
# One table: bench_gpu.json and bench_gpu.md in $out.
python3 - "$runs" "$out" <<'PY'
import glob, json, os, sys
from vitoken import bench
runs, out = sys.argv[1:]
rows, metas = [], {}
for path in sorted(glob.glob(os.path.join(runs, "*", "bench_*.json"))):
  data = json.load(open(path))
  rows += data["rows"]
  metas[os.path.basename(os.path.dirname(path))] = data["meta"]
meta = {"runs": metas, "device": next(iter(metas.values()))["device"] if metas else "none"}
bench.write(out, rows, meta, bench.markdown(rows))
print(bench.markdown(rows))
PY
ls -la "$out"
