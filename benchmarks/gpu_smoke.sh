#!/usr/bin/env bash
# Every stage on CUDA once (bf16 autocast, tf32 head, pinned copies, chunked loss): the quick
# demo end to end on a lent GPU machine. Usage there: bash benchmarks/gpu_smoke.sh
set -eu
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
mkdir -p /tmp/kd/kdcache
for d in storage stages pipeline; do ln -sfn "$PWD/$d" "/tmp/kd/kdcache/$d"; done
export PYTHONPATH=/tmp/site:/tmp/kd HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
python3 -m kdcache.pipeline.cli demo --quick --workdir /tmp/dq --no-progress 2>&1 | tee "$OUT/gpu_demo_quick.txt"
python3 -m kdcache.pipeline.cli inspect /tmp/dq/cache | tee -a "$OUT/gpu_demo_quick.txt"
python3 -m kdcache.pipeline.cli verify /tmp/dq/cache | tee -a "$OUT/gpu_demo_quick.txt"
python3 -c "import json; print(json.load(open('/tmp/dq/runs/kd-nano/metrics.json'))['eval'])" | tee -a "$OUT/gpu_demo_quick.txt"
