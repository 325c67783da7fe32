#!/usr/bin/env bash
# The GPU acceptance checks in one call, for a machine with one CUDA GPU and only torch, triton, transformers,
# pytest and pyarrow installed (no Ray, no Hydra, no network): the gpu-marked tests (kernels at real shapes,
# model logits at the 26B-A4B shape), then the benchmarks, each under its own time limit so that one slow part
# cannot eat the others. Logs and the results files are copied to $OUT (default ./gpu-out).
#
#   bash benchmarks/gpu_checks.sh                         # every step (about 17 minutes at most)
#   bash benchmarks/gpu_checks.sh tests vocab-head        # a subset: steps tests, vocab-head, generate, profile, llada
#   QUICK=1 bash benchmarks/gpu_checks.sh                 # small shapes: a smoke run of every step
#
# With a 10-minute limit per command (the device tool), run "tests vocab-head" and "generate profile" as two
# calls: each stays under 9 minutes (limits 240 + 150 s and 360 + 150 s); "llada" after, if time is left.
# `profile` traces one decoder step at batch 32 (torch.profiler table, ms per step vs the roofline floor).
#
# Exit status: 0 when every step passed, else the number of failed steps. Each step's table is in its log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
failed=0

step() {  # step NAME LIMIT_S COMMAND...: runs it with a time limit, logs to $OUT/NAME.log, counts failures
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local started=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - started))s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
    git rev-parse HEAD 2>/dev/null || true
} | tee "$OUT/device.txt"

steps=${*:-tests vocab-head generate profile llada}
for name in $steps; do
    case "$name:${QUICK:-0}" in
    tests:1) step tests 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels ;;
    tests:*) step tests 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/models ;;
    vocab-head:1) step vocab-head 120 python3 benchmarks/bench_vocab_head.py --quick ;;
    vocab-head:*) step vocab-head 150 python3 benchmarks/bench_vocab_head.py ;;
    generate:1) step generate 180 python3 benchmarks/bench_generate.py --shape small --batches 1 8 32 --adaptive-rows 32 ;;
    generate:*) step generate 360 python3 benchmarks/bench_generate.py --batches 1 8 16 32 48 64 --adaptive-rows 64 ;;
    profile:1) step profile 120 python3 benchmarks/profile_step_gpu.py --shape small ;;
    profile:*) step profile 150 python3 benchmarks/profile_step_gpu.py ;;
    llada:1) step llada 120 python3 benchmarks/bench_generate.py --family llada --shape small --batches 1 8 ;;
    llada:*) step llada 120 python3 benchmarks/bench_generate.py --family llada --batches 1 8 32 ;;
    *) echo "unknown step $name (steps: tests vocab-head generate profile llada)" >&2; exit 64 ;;
    esac
done

cp benchmarks/results/*.jsonl "$OUT"/ 2>/dev/null || true
echo "failed steps: $failed (logs and results in $OUT)"
exit "$failed"
