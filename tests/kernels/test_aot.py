"""Every launch the Triton launchers make at the supported shapes compiles for the H100/H200 (sm_90) with
Triton's own compiler and ptxas, without spills, within the SM's registers and shared memory: what the
interpreter cannot show. Runs `python -m pipeline.kernels.aot` in a process without TRITON_INTERPRET."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.kernels.aot import KERNELS

ROOT = Path(__file__).resolve().parents[2]


def _ptxas_available() -> bool:
    try:
        import triton.backends.nvidia
    except Exception:
        return False
    return (Path(triton.backends.nvidia.__file__).parent / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="triton's NVIDIA backend (ptxas) is not installed")
def test_every_supported_launch_builds_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "builds.json"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.kernels.aot", "--arch", "90", "--json", str(report)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    builds = json.loads(report.read_text())
    assert {b["kernel"] for b in builds} == {name for names in KERNELS.values() for name in names}
    for b in builds:
        assert not b["problems"], (b["kernel"], b["variant"], b["problems"])
        assert b["registers"] * 32 * b["num_warps"] <= 65536 and b["local_bytes"] == 0
    # The hot loads of the vocabulary head at the real shape are 16 bytes wide (8 bf16 logits a thread).
    real = [
        b for b in builds if b["kernel"] == "_head_chunk_kernel" and any("N=8192" in c for c in b["cases"])
    ]
    assert real and all(b["opcodes"].get("LDG.E.128", 0) > 0 for b in real)
    assert "builds, 0 with problems" in result.stdout


def test_the_kernel_list_names_every_triton_kernel_of_the_package():
    """A new kernel module must join KERNELS, or the build check and the step's sync test would miss it."""
    import importlib
    import pkgutil

    import pipeline.kernels

    found = {}
    for info in pkgutil.walk_packages(pipeline.kernels.__path__, "pipeline.kernels."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            jit = type(value).__name__ in ("JITFunction", "InterpretedFunction")
            if jit and name.endswith("_kernel") and value.fn.__module__ == module.__name__:  # defined here
                found.setdefault(info.name, set()).add(name)
    assert found == {module: set(names) for module, names in KERNELS.items()}
