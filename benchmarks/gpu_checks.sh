#!/usr/bin/env bash
# The GPU acceptance checks in one call, for a machine with one CUDA GPU and only torch, triton, transformers,
# pytest and pyarrow installed (no Ray, no Hydra, no network): the gpu-marked tests (kernels at real shapes,
# model logits at the 26B-A4B shape), then the benchmarks, each under its own time limit so that one slow part
# cannot eat the others. Logs and the results files are copied to $OUT (default ./gpu-out).
#
#   bash benchmarks/gpu_checks.sh                         # every step (about 20 minutes at most)
#   bash benchmarks/gpu_checks.sh vocab-head generate     # a subset, in the order given: steps tests,
#                                                         # vocab-head, experts, generate, profile, llada,
#                                                         # mask-decide (the mask sampler's step memory),
#                                                         # sharing (prompts copied between slots: identical
#                                                         # completions in bf16 with CUDA graphs?), gil (the
#                                                         # sampler's step beside a Python thread)
#   BUDGET_S=570 bash benchmarks/gpu_checks.sh ...         # every step's limit cut to what is left of 570 s;
#                                                         # a step with under 30 s left is skipped
#   QUICK=1 bash benchmarks/gpu_checks.sh                 # small shapes: a smoke run of every step
#   CANVASFLOW_COMMIT=<sha> ...                           # the commit the results rows name (the GPU
#                                                         # machine's copy has no .git)
#
# The device tool gives a session 15 minutes of GPU time, the machine's start included, and 10 minutes a
# command. The plan, most needed first (acceptance of issues 6 and 7):
#   call 1 (timeout_s 590): BUDGET_S=570 ... vocab-head generate tests   (limits 150 + 300 + 150 s)
#   call 2, at once, while the machine is warm, if 3 minutes are left: BUDGET_S=<left - 30> ... experts profile
#   (limits 90 + 120 s)
# `experts` writes the faster of the experts' products (grouped_mm or triton) to $OUT/moe_gemm.txt and
# benchmarks/results/moe_gemm.txt (git-ignored, so a warm device keeps it between calls); generate and
# profile run with it when it exists (MOE_GEMM=grouped_mm or triton overrides; else auto, i.e. triton).
# `generate` stops its batch sweep before a batch that would not fit its limit (bench_generate --budget-s).
# `profile` traces one decoder step at batch 32 (torch.profiler table, ms per step vs the roofline floor).
#
# Exit status: 0 when every step that ran passed, else the number of failed steps. Each step's table is in its
# log; output is unbuffered, so a step stopped at its limit keeps what it printed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
failed=0
skipped=
export PYTHONUNBUFFERED=1
marker=$(mktemp)  # results files written after it come back in $OUT (the device tool returns 8 files)

step() {  # step NAME LIMIT_S COMMAND...: runs it with a time limit, logs to $OUT/NAME.log, counts failures;
    # in COMMAND, STEP_S stands for the limit it runs under less 20 s (for a script's own budget)
    local name=$1 limit=$2
    shift 2
    if [ -n "${BUDGET_S:-}" ]; then
        local left=$((BUDGET_S - SECONDS - 5))
        if [ "$left" -lt 30 ]; then
            echo "=== $name: skipped, ${left}s of the ${BUDGET_S}s budget left"
            skipped="$skipped $name"
            return
        fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    local args=("${@/STEP_S/$((limit - 20))}")
    echo "=== $name (limit ${limit}s): ${args[*]}"
    local started=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "${args[@]}" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - started))s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
    git rev-parse HEAD 2>/dev/null || echo "commit ${CANVASFLOW_COMMIT:-unknown (no .git; set CANVASFLOW_COMMIT)}"
} | tee "$OUT/device.txt"

choice_file=benchmarks/results/moe_gemm.txt
moe_gemm() {  # the experts' products for generate / profile: $MOE_GEMM, else the experts step's choice, else auto
    if [ -n "${MOE_GEMM:-}" ]; then echo "$MOE_GEMM"; elif [ -s "$choice_file" ]; then cat "$choice_file"; else echo auto; fi
}

steps=${*:-tests vocab-head experts generate profile llada mask-decide sharing gil}
for name in $steps; do
    case "$name:${QUICK:-0}" in
    tests:1) step tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="-ra --strict-markers" tests/kernels ;;
    tests:*) step tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="-ra --strict-markers" tests/kernels tests/models ;;
    vocab-head:1) step vocab-head 120 python3 benchmarks/bench_vocab_head.py --quick ;;
    vocab-head:*) step vocab-head 150 python3 benchmarks/bench_vocab_head.py ;;
    experts:1) step experts 60 python3 benchmarks/bench_experts.py --quick --choice "$choice_file" ;;
    experts:*) step experts 90 python3 benchmarks/bench_experts.py --choice "$choice_file" ;;
    generate:1) step generate 180 python3 benchmarks/bench_generate.py --shape small --batches 1 8 32 --adaptive-rows 32 --budget-s STEP_S --moe-gemm "$(moe_gemm)" ;;
    generate:*) step generate 300 python3 benchmarks/bench_generate.py --budget-s STEP_S --moe-gemm "$(moe_gemm)" ;;
    profile:1) step profile 120 python3 benchmarks/profile_step_gpu.py --shape small --moe-gemm "$(moe_gemm)" ;;
    profile:*) step profile 120 python3 benchmarks/profile_step_gpu.py --moe-gemm "$(moe_gemm)" ;;
    llada:1) step llada 120 python3 benchmarks/bench_generate.py --family llada --shape small --batches 1 8 ;;
    llada:*) step llada 120 python3 benchmarks/bench_generate.py --family llada --batches 1 8 32 ;;
    mask-decide:1) step mask-decide 60 python3 benchmarks/bench_mask_decide.py --rows 4 16 --positions 64 ;;
    mask-decide:*) step mask-decide 90 python3 benchmarks/bench_mask_decide.py ;;
    sharing:1) step sharing 60 python3 benchmarks/bench_prompt_sharing.py --prompts 8 --completions 4 --batch 32 --repeats 1 ;;
    sharing:*) step sharing 90 python3 benchmarks/bench_prompt_sharing.py --prompts 32 --completions 8 --prompt-tokens 2048 --batch 64 ;;
    gil:1) step gil 60 python3 benchmarks/bench_gil.py --rows 8 ;;
    gil:*) step gil 90 python3 benchmarks/bench_gil.py --rows 32 --steps 16 ;;
    *) echo "unknown step $name (steps: tests vocab-head experts generate profile llada mask-decide sharing gil)" >&2; exit 64 ;;
    esac
done

find benchmarks/results -name '*.jsonl' -newer "$marker" -exec cp {} "$OUT"/ \;
[ -s "$choice_file" ] && cp "$choice_file" "$OUT"/
echo "failed steps: $failed; skipped:${skipped:- none} (logs and results in $OUT)"
exit "$failed"
