#!/usr/bin/env bash
# The one prepared script for a GPU machine (docs/DESIGN.md §7): H100/H200, Python 3.12,
# torch 2.11, triton 3.6, peft preinstalled, no network. Run from anywhere:
#
#     OUT=/some/dir bash bench/gpu_check.sh
#
# Installs the package from this working tree (offline), runs the GPU-marked tests, the backend
# self-check, the forward / forward+backward op benchmark and the LLaMA-7B initialiser benchmark.
# Everything it prints goes to $OUT/gpu_check.log; the benchmarks write their CSV/JSON into $OUT.
# Each step has its own time limit (they add up to under 9 minutes); a failing step does not stop
# the later ones, and the exit status is that of the first failure.
#
# GPU_CHECK_BUILD_CUDA=1 also builds the optional CUDA extension (nvcc, about a minute or two).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, remember the first failure
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)"
    local start=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start))s"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

echo "=== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
git rev-parse --short HEAD 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true

# Offline install: no dependency resolution, the installed setuptools/torch, no downloads.
if [ "${GPU_CHECK_BUILD_CUDA:-0}" = "1" ]; then
    export EDORA_BUILD_CUDA=1
else
    export EDORA_SKIP_CUDA_BUILD=1
fi
step install 60 python3 -m pip install --no-deps --no-build-isolation --no-index -q -e .
if ! python3 -c "import edora_kernels" 2>/dev/null; then
    echo "editable install unavailable: using the working tree on PYTHONPATH"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

step info 20 python3 -m edora_kernels info
# The GPU-marked files only: the rest may import dev-only packages (hypothesis, ...) the GPU
# machine does not have.
step "gpu tests" 100 python3 -m pytest -m gpu -q -rs tests/test_triton_gpu.py \
    tests/test_cuda_backend.py
step check 40 python3 -m edora_kernels check
step bench 130 python3 -m edora_kernels bench --tokens 8192 \
    --shapes 4096x4096,4096x11008,11008x4096 --ranks 16,64 --dtype bfloat16 \
    --modes fwd,fwd+bwd --compile --out "$OUT"
step "bench dropout" 60 python3 -m edora_kernels bench --tokens 8192 --shapes 4096x4096 \
    --ranks 16 --dtype bfloat16 --modes fwd+bwd --dropout 0.1 --out "$OUT"
step "init llama7b" 120 python3 -m edora_kernels bench --init --init-llama7b --out "$OUT"

echo
echo "=== gpu_check done in ${SECONDS}s, exit $status; results in $OUT"
ls -l "$OUT"
exit "$status"
