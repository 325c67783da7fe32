"""The GPU benchmark scripts run end to end before a GPU ever sees them: the step's roofline model on meta
tensors (every Triton launch recorded), and the CPU smoke modes of the measured step profile and the
vocabulary-head benchmark (the GPU runs are the same code with CUDA events, memory figures and the CUDA
profiler activity)."""

from __future__ import annotations

from benchmarks import (
    bench_experts,
    bench_finalize,
    bench_generate,
    bench_gil,
    bench_mask_decide,
    bench_prompt_sharing,
    bench_vocab_head,
    profile_step_gpu,
    step_profile,
)
from pipeline.kernels.experts.triton_gemm import TILE_CANDIDATES


def test_roofline_model_counts_the_fused_kernels(capsys):
    configs = ["--configs", "torch/torch", "triton/torch", "triton/triton/grouped_mm", "triton/triton"]
    assert step_profile.main(["--shape", "small", "--batch", "4", "--no-record", *configs]) == 0
    out = capsys.readouterr().out
    for kind in (
        "triton: attention_tail",
        "triton: canvas_attention",
        "triton: combine",
        "triton: expert_gemm",
        "triton: head_chunk",
    ):
        assert kind in out
    totals = [line for line in out.splitlines() if "TFLOP, matmul floor" in line]
    assert [line.split(" kernels:")[0] for line in totals] == configs[1:]
    # Each step of fusion lowers the floor, so raises the utilisation the op sequence allows: the sampler's
    # kernels, the forward's, the experts' products.
    best = [int(line.split("at most ")[1].split("%")[0]) for line in totals]
    assert best[0] < best[1] < best[2] < best[3]


def test_measured_profile_runs_on_cpu(capsys):
    args = ["--device", "cpu", "--shape", "tiny", "--backend", "torch", "--batch", "2", "--prompt", "16"]
    assert profile_step_gpu.main([*args, "--canvas", "32", "--rows", "5", "--no-record"]) == 0
    out = capsys.readouterr().out
    assert "aten::" in out and "ms per decoder step" in out and "roofline floor" in out


def test_generate_benchmark_runs_on_cpu_with_heterogeneous_stopping(capsys):
    args = ["--device", "cpu", "--shape", "tiny", "--batches", "2", "--canvas", "32", "--prompt", "24"]
    assert bench_generate.main([*args, "--adaptive-rows", "10", "--no-record"]) == 0
    out = capsys.readouterr().out
    assert "transformers     2" in out and "canvasflow       2" in out
    table = [line.split() for line in out.splitlines() if line.startswith(("  static  ", "  continuous  "))]
    rows = {cells[0]: cells for cells in table}
    assert len(table) == len(rows) == 2
    for batching in ("static", "continuous"):
        low, high = map(int, rows[batching][5].split("-"))  # canvases per row: min-max
        assert low < high, "rows end after different numbers of canvases"
        assert float(rows[batching][-1].rstrip(")")) < 16, "adaptive stopping ends canvases before 16 steps"
    assert int(rows["continuous"][3]) == int(rows["continuous"][4]), "continuous computes only what rows need"
    assert int(rows["static"][3]) > int(rows["static"][4]), "static computes the finished rows of a batch too"
    assert "fewer row-passes per token than static" in out


def test_vocab_head_benchmark_runs_on_cpu(capsys):
    bench_vocab_head.main(["--device", "cpu", "--n", "19"])
    out = capsys.readouterr().out
    for path in ("reference", "torch-chunked", "triton"):
        assert f"    19 {path}" in out


def test_experts_benchmark_runs_on_cpu_and_names_the_faster_path(capsys, tmp_path):
    choice = tmp_path / "moe_gemm.txt"
    bench_experts.main(["--device", "cpu", "--n", "23", "--choice", str(choice)])
    out = capsys.readouterr().out
    for path in ("transformers", "grouped_mm", "triton"):
        assert f"    23 {path}" in out
    for product in ("gate_up+gelu", "down"):  # each product alone, torch's and every tile candidate
        for impl in ["torch (gather + grouped_mm)", *(f"triton {t}" for t in TILE_CANDIDATES)]:
            assert f"{product:<14} {impl:<26} " in out
    assert choice.read_text().strip() in ("grouped_mm", "triton")


def test_shard_size_benchmark_streams_shards_without_their_drains(capsys):
    from benchmarks import bench_shard_size

    rows = bench_shard_size.main(["--rows", "24", "--batches", "4", "--shards", "6", "24", "--no-record"])
    passes = {(r["shard"], r["in_flight"]): r["passes"] for r in rows}
    # Four shards one at a time drain four times; in flight, once (the benchmark asserts equal completions).
    assert passes[6, 2] < passes[6, 1], passes
    assert "in flight" in capsys.readouterr().out


def test_mask_decide_benchmark_splits_the_rows_on_cpu(capsys):
    """8 positions of Dream's 152,064-token vocabulary are 4.6 MiB of logits a row: a 10 MiB budget runs the
    3 rows as 2 + 1, the split turned off as 3."""
    args = ["--rows", "3", "--positions", "8", "--hidden", "8", "--budget-mib", "10", "--no-record"]
    assert bench_mask_decide.main(args) == 0
    table = [line.split() for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith("3 ")]
    assert [(cells[1], cells[-3]) for cells in table] == [("10", "2"), ("off", "3")]


def test_prompt_sharing_benchmark_copies_each_prompt_once(capsys, tmp_path):
    args = [
        "--prompts",
        "3",
        "--completions",
        "3",
        "--prompt-tokens",
        "40",
        "--batch",
        "4",
        "--canvases",
        "1",
    ]
    args += ["--steps", "4", "--repeats", "1", "--cache", str(tmp_path), "--no-record"]
    assert bench_prompt_sharing.main(args) == 0
    out = capsys.readouterr().out
    assert "completions identical: True" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()}
    assert rows["encoded"][2] == "0"
    # Every row runs its 4 steps (36 row-steps), so the batch turns over whole: prompts (0, 0, 0, 1), then
    # (1, 1, 2, 2), then (2): two copies in each of the first two batches.
    assert rows["shared"][3] == rows["encoded"][3] == "36"
    assert rows["shared"][2] == str(4 * 40)
    assert int(rows["shared"][1]) < int(rows["encoded"][1])


def test_gil_benchmark_measures_the_sampler_beside_a_python_thread(capsys, tmp_path):
    args = ["--rows", "2", "--steps", "2", "--neighbours", "shard", "--cache", str(tmp_path)]
    assert bench_gil.main([*args, "--no-record"]) == 0
    table = [line.split() for line in capsys.readouterr().out.splitlines()]
    rows = {(cells[0], cells[2]): cells for cells in table if len(cells) == 6 and cells[1] == "ms"}
    assert set(rows) == {("5.0", "none"), ("5.0", "shard"), ("0.2", "none"), ("0.2", "shard")}
    assert all(float(cells[3]) > 0 for cells in rows.values())
    assert int(rows[("0.2", "shard")][5]) > 0, "the neighbour ran while the sampler did"


def test_finalize_benchmark_measures_markers_and_manifest(capsys):
    (row,) = bench_finalize.main(["--shards", "300", "--no-record"])
    assert (
        row["shards"] == 300 and row["manifest_mb"] > 0 and row["peak_rss_mb"] >= row["baseline_rss_mb"] > 0
    )
    assert "     300 " in capsys.readouterr().out
