#!/usr/bin/env bash
# Every CUDA path of alfk on a real GPU, then the GPU figures (issue 22), as one bounded run.
#
#   OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh [CARRY]
#
# Run from the repository root on a fresh GPU machine whose python3 has torch, torchvision, h5py,
# typer, rich, pillow and timm. CARRY (default .gpu) holds what that machine cannot download:
# the faiss wheel(s) (*.whl, installed with --no-deps into /tmp/site) and CIFAR-10's
# cifar10-jpg.tar.gz. Everything is logged to $OUT/gpu_check.log; the CUDA tests' own report goes
# to $OUT/test_cuda.txt. Each step has its own time limit, so one hang costs that step only.
set -u
OUT=${OUT:-/tmp/gpu-check}
CARRY=${1:-.gpu}
DATA=/tmp/alfk-gpu-data
mkdir -p "$OUT" "$DATA"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
step() { echo; echo "=== $1 ($(date -u +%FT%TZ))"; }

step "set-up"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$CARRY"/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 - <<'EOF'
import faiss, h5py, numpy, PIL, timm, torch, torchvision, typer
print(f"python {__import__('sys').version.split()[0]}, torch {torch.__version__} (CUDA "
      f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), torchvision "
      f"{torchvision.__version__}, faiss {faiss.__version__} ({faiss.get_num_gpus()} GPUs), "
      f"timm {timm.__version__}, h5py {h5py.__version__}, numpy {numpy.__version__}, "
      f"pillow {PIL.__version__}, typer {typer.__version__}; {torch.cuda.get_device_name()}")
EOF

step "data: CIFAR-10 JPEGs (32 px) and a 224-px JPEG folder made from them"
tar -xzf "$CARRY/cifar10-jpg.tar.gz" -C "$DATA" || exit 1
python3 - "$DATA" <<'EOF'
# 500 training images per class, upscaled to 224 px (bicubic) and saved as quality-90 JPEGs:
# photo-sized files for the decode side of the embed benchmark.
import sys
from multiprocessing import Pool
from pathlib import Path
from PIL import Image

root = Path(sys.argv[1])
src = sorted((root / "cifar10/train").glob("*/*.jpg"))
by_class = {}
for p in src:
    by_class.setdefault(p.parent.name, []).append(p)
jobs = [(p, root / "c224" / c / p.name) for c, ps in by_class.items() for p in ps[:500]]

def resize(job):
    a, b = job
    b.parent.mkdir(parents=True, exist_ok=True)
    Image.open(a).convert("RGB").resize((224, 224), Image.BICUBIC).save(b, quality=90)

with Pool(16) as pool:
    pool.map(resize, jobs, chunksize=64)
print(f"{len(src)} CIFAR-10 training JPEGs; {len(jobs)} 224-px JPEGs")
EOF

step "tests/test_cuda.py"
timeout 200 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.txt"

step "embed: CIFAR-10 (32 px), resnet10, 16 workers; alfk embed as a child; torchrun, 1 process"
timeout 150 python3 benchmarks/bench_embed_rates.py --images "$DATA/cifar10/train" --arch resnet10 \
    --workers 16 --cli --torchrun

step "embed: 224-px JPEGs, resnet18, 16 workers"
timeout 90 python3 benchmarks/bench_embed_rates.py --images "$DATA/c224" --arch resnet18 --workers 16

step "score: 1M-row pool store (virtual over 131,072 real rows), L768, P 1250; cuda then cpu"
timeout 200 python3 benchmarks/bench_bigpool.py --n 1000000 --virtual-from 131072 \
    --device cuda,cpu --bare --root /tmp/alfk-bigpool --min-free-gb 5

step "descriptor precision and speed: float32 vs TF32 vs bf16"
timeout 60 python3 benchmarks/bench_gpu_precision.py --seconds 0.5

step "done"
nvidia-smi --query-gpu=name,memory.used,temperature.gpu --format=csv
