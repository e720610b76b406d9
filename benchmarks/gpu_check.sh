#!/usr/bin/env bash
# The GPU checks of the capture issue, as one script for a lent GPU machine (no network there):
# wheels carried in .whl/ (zarr and its needs), the repo put on PYTHONPATH as the kdcache package.
# Usage there: bash benchmarks/gpu_check.sh   (writes its figures under $OUT if set)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
mkdir -p /tmp/kd/kdcache
for d in storage stages pipeline; do ln -sfn "$PWD/$d" "/tmp/kd/kdcache/$d"; done
export PYTHONPATH=/tmp/site:/tmp/kd
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, zarr; print('torch', torch.__version__, 'transformers', transformers.__version__, 'zarr', zarr.__version__)" | tee -a "$OUT/gpu.txt"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
for backend in ${BACKENDS:-zarr arrow}; do
  timeout ${BENCH_TIMEOUT:-240} python3 benchmarks/capture_bench.py --hf-gpt2 --seq-len 1024 --docs ${DOCS:-300} \
    --batch-tokens 65536 --rounds ${ROUNDS:-3} --backend "$backend" 2>&1 | grep -v "Loading weights" | tee "$OUT/capture_$backend.txt"
done
