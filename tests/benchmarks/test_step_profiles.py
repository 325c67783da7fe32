"""The step-profile scripts run end to end: the roofline model on meta tensors (both backends, every Triton
launch recorded) and the measured profile's smoke mode on the CPU (the GPU run is the same code with CUDA
events and the CUDA activity)."""

from __future__ import annotations

from benchmarks import profile_step_gpu, step_profile


def test_roofline_model_counts_the_fused_kernels(capsys):
    configs = ["--configs", "torch/torch", "triton/torch", "triton/triton"]
    assert step_profile.main(["--shape", "small", "--batch", "4", "--no-record", *configs]) == 0
    out = capsys.readouterr().out
    for kind in (
        "triton: attention_tail",
        "triton: canvas_attention",
        "triton: combine",
        "triton: head_chunk",
    ):
        assert kind in out
    totals = [line for line in out.splitlines() if "TFLOP, matmul floor" in line]
    assert [line.split(" kernels:")[0] for line in totals] == ["torch/torch", "triton/torch", "triton/triton"]
    # Each step of fusion lowers the floor: the sampler's kernels, then the forward's.
    floors = [float(line.split("floors ")[1].split(" ms")[0]) for line in totals]
    assert floors[0] > floors[1] > floors[2]


def test_measured_profile_runs_on_cpu(capsys):
    args = ["--device", "cpu", "--shape", "tiny", "--backend", "torch", "--batch", "2", "--prompt", "16"]
    assert profile_step_gpu.main([*args, "--canvas", "32", "--rows", "5", "--no-record"]) == 0
    out = capsys.readouterr().out
    assert "aten::" in out and "ms per decoder step" in out and "roofline floor" in out
