#!/usr/bin/env bash
# The one prepared script for a GPU machine (docs/DESIGN.md §7, §9): H100/H200, Python 3.12,
# torch 2.11, triton 3.6, peft preinstalled, no network. Run from anywhere:
#
#     OUT=/some/dir bash bench/gpu_check.sh           # default OUT: bench/results
#     bash bench/gpu_check.sh --dry-run               # every step's plumbing on CPU, tiny shapes
#
# Installs the package from this working tree (offline), prints versions, runs the backend
# self-check, the op benchmark (the priority: N=8192 bf16 on the LLaMA-7B layer shapes at ranks
# 16 and 64), the GPU-marked tests, the op benchmark with dropout and with torch.compile (one
# shape), the LLaMA-7B initialiser benchmark and one DDP and FSDP2 training step under torchrun
# (NCCL, one process per GPU, checked against one process), and a batch mixing 1, 8 and 64
# adapters (bench --adapters; the plan step predicts it too). Each step has a budget: it is
# interrupted (SIGINT, as Ctrl-C: a benchmark then prints and saves what it measured; its CSV
# rows are on disk as each case finishes) GRACE seconds before its budget and killed at it.
# The budgets add up to under 5 minutes on a cold H100 (empty Triton and Inductor caches). A
# failing step does not stop the later ones; the exit status is that of the first failure.
#
# Everything printed goes to $OUT/gpu_check.log, the benchmarks' CSV/JSON to $OUT, and after
# every step $OUT/gpu_check_summary.json is rewritten: per step its name, budget, elapsed time,
# exit status and the files it wrote under $OUT.
#
# --dry-run: on CPU in about a minute, into a fresh temporary OUT unless OUT is set; no install
# (the install step only imports the package), the Triton backend in its interpreter, pytest
# only collects, benchmarks on tiny shapes. tests/test_gpu_check.py runs it.
# GPU_CHECK_BUILD_CUDA=1 also builds the optional CUDA extension (nvcc, a minute or two: the
# install budget grows by that much and the whole run takes longer than 5 minutes).
# PYTHON names the interpreter (default: python3).
set -euo pipefail

DRY_RUN=0
if [ "$#" -eq 1 ] && [ "$1" = "--dry-run" ]; then
    DRY_RUN=1
elif [ "$#" -ne 0 ]; then
    echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2
    exit 2
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
# Every step imports this working tree, whether the install step worked or not (an editable
# install points here too).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY_RUN" = 1 ]; then
    RUN="dry run"
    OUT=${OUT:-$(mktemp -d -t gpu_check_dry_run.XXXXXX)}
    export TRITON_INTERPRET=1
    # As on the GPU, where the benchmarks run on CUDA, no CPU benchmark re-executes itself to set
    # the policy: a second start-up each would be most of its time here.
    export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
else
    RUN=run
    OUT=${OUT:-bench/results}
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/gpu_check_summary.json"
exec > >(tee -a "$LOG") 2>&1

# Budgets in seconds. A step never runs past its own, so the run takes at most their sum (under
# 5 minutes, printed first) plus a few seconds of preamble.
GRACE=3
B_INSTALL=15 B_INFO=10 B_CHECK=15 B_BENCH=60 B_TESTS=40 B_DROPOUT=15 B_COMPILE=30 B_INIT=20
B_PLAN=15 B_HOST=15 B_DIST=25 B_TMA=15 B_ADAPTERS=15
if [ "${GPU_CHECK_BUILD_CUDA:-0}" = "1" ] && [ "$DRY_RUN" = 0 ]; then
    export EDORA_BUILD_CUDA=1
    B_INSTALL=150
else
    export EDORA_SKIP_CUDA_BUILD=1
fi
BUDGET=$((B_INSTALL + B_INFO + B_CHECK + B_BENCH + B_TESTS + B_DROPOUT + B_COMPILE + B_INIT
        + B_PLAN + B_HOST + B_DIST + B_TMA + B_ADAPTERS))

RECORDS=$(mktemp)  # one line per finished step, tab-separated; the summary is built from it
MARK=$(mktemp)     # touched as a step starts: the files newer than it are the step's
trap 'rm -f "$RECORDS" "$MARK"' EXIT
START=$(date +%s.%N)
status=0

write_summary() {  # write_summary FINISHED: $SUMMARY from the steps recorded so far
    "$PYTHON" - "$RECORDS" "$SUMMARY" "$1" "$DRY_RUN" "$OUT" "$BUDGET" "$START" "$status" <<'EOF'
import json, sys, time
records, summary, finished, dry_run, out, budget, start, status = sys.argv[1:]
steps = []
for line in open(records):
    name, step_budget, elapsed, rc, *files = line.rstrip("\n").split("\t")
    steps.append({"name": name, "budget_s": int(step_budget), "elapsed_s": float(elapsed),
                  "exit_status": int(rc), "timed_out": int(rc) in (124, 137),
                  "files": [f for f in files if f]})
with open(summary, "w") as f:
    json.dump({"dry_run": dry_run == "1", "finished": finished == "1", "out": out,
               "budget_s": int(budget), "elapsed_s": round(time.time() - float(start), 1),
               "exit_status": int(status), "steps": steps}, f, indent=1)
    f.write("\n")
EOF
}

step() {  # step NAME BUDGET COMMAND...: run under the budget, record it, rewrite the summary
    local name=$1 budget=$2
    shift 2
    echo
    echo "=== $name: budget ${budget}s, started $(date -u +%H:%M:%S)"
    touch "$MARK"
    local start rc=0 elapsed files
    start=$(date +%s.%N)
    timeout --signal=INT --kill-after="$GRACE" "$((budget - GRACE))" "$@" || rc=$?
    elapsed=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    files=$(cd "$OUT" && find . -type f -newer "$MARK" ! -name gpu_check.log \
        ! -name gpu_check_summary.json | sed 's|^\./||' | sort | paste -sd '\t' -)
    echo "=== $name: exit $rc after ${elapsed}s of ${budget}s"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$budget" "$elapsed" "$rc" "$files" >> "$RECORDS"
    write_summary 0
}

if [ "$DRY_RUN" = 1 ]; then
    INSTALL=("$PYTHON" -c "import edora_kernels; print('using', edora_kernels.__file__)")
    COLLECT=(--collect-only)
    OP=(--tokens 16 --shapes 32x48 --ranks 4 --repeats 1 --warmup 0)
    ONE_SHAPE=("${OP[@]}")
    INIT=(--init-shrink 64 --init-device cpu --ranks 4 --repeats 1 --warmup 0)
    HOST=(--repeats 5 --warmup 1)
    ADAPTERS=(--adapters 1,2 --tokens 4 --repeats 1 --warmup 0)
    DIST=(--nproc_per_node 2 tests/distributed_worker.py step --device cpu)
else
    # Offline install: no dependency resolution, the installed setuptools/torch, no downloads.
    INSTALL=("$PYTHON" -m pip install --no-deps --no-build-isolation --no-index -q -e .)
    COLLECT=()
    # 10 rounds after 2 warm-up ones; on CUDA each round is a burst of calls lasting ~10 ms.
    OP=(--tokens 8192 --shapes 4096x4096,4096x11008,11008x4096 --ranks 16,64 --dtype bf16
        --repeats 10 --warmup 2)
    ONE_SHAPE=(--tokens 8192 --shapes 4096x4096 --ranks 16 --dtype bf16 --repeats 10 --warmup 2)
    INIT=(--repeats 1 --warmup 1)
    HOST=(--repeats 100 --warmup 10)
    # The small Llama (hidden 2048, 4 blocks, bf16), 64 rows of 128 tokens.
    ADAPTERS=(--adapters 1,8,64 --repeats 5 --warmup 1)
    DIST=(--nproc_per_node "$(nvidia-smi -L 2>/dev/null | wc -l | awk '{print ($1 > 0) ? $1 : 1}')"
          tests/distributed_worker.py step --device cuda)
fi

echo "=== gpu_check $RUN $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
echo "=== budget ${BUDGET}s; results in $OUT"
git rev-parse --short HEAD 2>/dev/null || true
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
fi

step install "$B_INSTALL" "${INSTALL[@]}"
step info "$B_INFO" "$PYTHON" -m edora_kernels info
# The cost model's predictions for this step list, beside the measurements that follow.
step plan "$B_PLAN" sh -c "\"\$0\" -m edora_kernels plan --json \"\$1/plan_h100.json\" &&
    \"\$0\" -m edora_kernels plan --adapters 1,8,64 --json \"\$1/plan_adapters_h100.json\"" \
    "$PYTHON" "$OUT"
# Correctness steps take one Triton config per launch (EDORA_TRITON_FIXED_CONFIG): compiling
# every autotuning candidate on a cold cache costs seconds each and proves nothing more here.
step check "$B_CHECK" env EDORA_TRITON_FIXED_CONFIG=1 "$PYTHON" -m edora_kernels check
step bench "$B_BENCH" "$PYTHON" -m edora_kernels bench "${OP[@]}" --out "$OUT"
# The forward's TMA path (opt-in until measured): the same shape as the pointer loads above.
step "bench tma" "$B_TMA" env EDORA_TRITON_TMA=1 "$PYTHON" -m edora_kernels bench \
    "${ONE_SHAPE[@]}" --modes fwd --providers frozen,triton --out "$OUT"
# The GPU-marked files only: the rest may import dev-only packages (hypothesis, ...) the GPU
# machine does not have.
step "gpu tests" "$B_TESTS" env EDORA_TRITON_FIXED_CONFIG=1 "$PYTHON" -m pytest -m gpu -q -rs \
    -p no:cacheprovider "${COLLECT[@]}" tests/test_triton_gpu.py tests/test_cuda_backend.py
step "bench dropout" "$B_DROPOUT" "$PYTHON" -m edora_kernels bench "${ONE_SHAPE[@]}" \
    --modes fwd+bwd --dropout 0.1 --out "$OUT"
# torch.compile on one shape only: a cold Inductor compile of forward and backward takes most
# of this step's budget.
step "bench compile" "$B_COMPILE" "$PYTHON" -m edora_kernels bench "${ONE_SHAPE[@]}" \
    --modes fwd+bwd --providers frozen,torch --compile --out "$OUT"
# Many adapters in one batch against one adapter and PEFT LoRA's mixed batch; the mixed
# kernel's tile fixed (autotuning its variant on a cold cache would take the whole budget).
step "bench adapters" "$B_ADAPTERS" env EDORA_TRITON_FIXED_CONFIG=1 "$PYTHON" -m edora_kernels \
    bench "${ADAPTERS[@]}" --out "$OUT"
# The host's share of a step (kernels stubbed, on this machine's CPU).
step "bench host" "$B_HOST" "$PYTHON" -m edora_kernels bench --host "${HOST[@]}" --out "$OUT"
step "init llama7b" "$B_INIT" "$PYTHON" -m edora_kernels bench --init --init-llama7b \
    "${INIT[@]}" --out "$OUT"
# Distributed training as users launch it (tests/test_distributed.py runs it on CPU with gloo).
# Run once more if a worker died by a signal (torchrun then prints "Signal N"): gloo on a shared
# 2-core CI machine aborted a worker at teardown once in dozens of runs, never on a rerun;
# tests/test_distributed.py reruns the same way. Any other failure stands.
RERUN_IF_SIGNALLED='log=$(mktemp)
for attempt in 1 2; do
    "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ] || [ "$attempt" -eq 2 ] || ! grep -q "Signal " "$log"; then break; fi
    echo "=== a worker died by a signal: once more"
done
rm -f "$log"
exit "$rc"'
step "torchrun ddp fsdp2" "$B_DIST" bash -c "$RERUN_IF_SIGNALLED" rerun "$PYTHON" \
    -m torch.distributed.run --standalone "${DIST[@]}" --modes ddp fsdp2 --compare \
    --out "$OUT/distributed"

write_summary 1
echo
echo "=== gpu_check done in ${SECONDS}s of a ${BUDGET}s budget, exit $status; results in $OUT"
ls -l "$OUT"
exit "$status"
