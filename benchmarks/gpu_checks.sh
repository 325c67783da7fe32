#!/usr/bin/env bash
# The GPU acceptance checks in one call, for a machine with one CUDA GPU and only torch, triton, transformers,
# pytest and pyarrow installed (no Ray, no Hydra, no network): the gpu-marked tests (kernels at real shapes,
# model logits at the 26B-A4B shape), then the benchmarks, each under its own time limit so that one slow part
# cannot eat the others. Logs and the results files are copied to $OUT (default ./gpu-out).
#
#   bash benchmarks/gpu_checks.sh                         # every step (about 20 minutes at most)
#   bash benchmarks/gpu_checks.sh tests vocab-head        # a subset: steps tests, vocab-head, experts, generate,
#                                                         # profile, llada
#   QUICK=1 bash benchmarks/gpu_checks.sh                 # small shapes: a smoke run of every step
#
# With a 10-minute limit per command (the device tool), run "tests vocab-head experts" and "generate profile"
# as two calls: each stays under 9 minutes (limits 240 + 150 + 120 s and 360 + 150 s); "llada" after, if time
# is left. `experts` writes the faster of the experts' products (grouped_mm or triton) to $OUT/moe_gemm.txt
# and benchmarks/results/moe_gemm.txt (git-ignored, so a warm device keeps it between calls); generate and
# profile then run with it (MOE_GEMM=grouped_mm or triton overrides).
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

choice_file=benchmarks/results/moe_gemm.txt
moe_gemm() {  # the experts' products for generate / profile: $MOE_GEMM, else the experts step's choice, else auto
    if [ -n "${MOE_GEMM:-}" ]; then echo "$MOE_GEMM"; elif [ -s "$choice_file" ]; then cat "$choice_file"; else echo auto; fi
}

steps=${*:-tests vocab-head experts generate profile llada}
for name in $steps; do
    case "$name:${QUICK:-0}" in
    tests:1) step tests 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels ;;
    tests:*) step tests 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/models ;;
    vocab-head:1) step vocab-head 120 python3 benchmarks/bench_vocab_head.py --quick ;;
    vocab-head:*) step vocab-head 150 python3 benchmarks/bench_vocab_head.py ;;
    experts:1) step experts 60 python3 benchmarks/bench_experts.py --quick --choice "$choice_file" ;;
    experts:*) step experts 120 python3 benchmarks/bench_experts.py --choice "$choice_file" ;;
    generate:1) step generate 180 python3 benchmarks/bench_generate.py --shape small --batches 1 8 32 --adaptive-rows 32 --moe-gemm "$(moe_gemm)" ;;
    generate:*) step generate 360 python3 benchmarks/bench_generate.py --batches 1 8 16 32 48 64 --adaptive-rows 64 --moe-gemm "$(moe_gemm)" ;;
    profile:1) step profile 120 python3 benchmarks/profile_step_gpu.py --shape small --moe-gemm "$(moe_gemm)" ;;
    profile:*) step profile 150 python3 benchmarks/profile_step_gpu.py --moe-gemm "$(moe_gemm)" ;;
    llada:1) step llada 120 python3 benchmarks/bench_generate.py --family llada --shape small --batches 1 8 ;;
    llada:*) step llada 120 python3 benchmarks/bench_generate.py --family llada --batches 1 8 32 ;;
    *) echo "unknown step $name (steps: tests vocab-head experts generate profile llada)" >&2; exit 64 ;;
    esac
done

cp benchmarks/results/*.jsonl "$OUT"/ 2>/dev/null || true
[ -s "$choice_file" ] && cp "$choice_file" "$OUT"/
echo "failed steps: $failed (logs and results in $OUT)"
exit "$failed"
