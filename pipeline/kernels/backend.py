"""Chooses the kernel backend once, at construction: Triton on CUDA, the torch reference elsewhere."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def check_backend(requested: str) -> str:
    """`requested` if it names a backend (auto|torch|triton), else a ValueError naming it."""
    if requested not in ("auto", "torch", "triton"):
        raise ValueError(f"sampler.backend={requested!r} is not one of auto, torch, triton")
    return requested


def resolve_backend(requested: str, device_type: str) -> str:
    """Returns "torch" or "triton" for `requested` in auto|torch|triton on `device_type` (cpu/cuda; "meta",
    shapes only, stands in for a GPU: the tools that record launches without one run on it)."""
    check_backend(requested)
    if device_type == "meta":
        chosen = "torch" if requested == "torch" else "triton"
        why = "meta tensors stand in for a GPU"
    elif requested == "auto":
        chosen = "triton" if device_type == "cuda" and triton_available() else "torch"
        why = "CUDA device with Triton" if chosen == "triton" else f"no Triton path on {device_type}"
    elif requested == "triton":
        if device_type != "cuda":
            import os

            if os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError(
                    "sampler.backend=triton needs a CUDA device (or TRITON_INTERPRET=1 for testing); "
                    "use sampler.backend=auto"
                )
        if not triton_available():
            raise ValueError(
                "sampler.backend=triton but triton is not installed: pip install 'canvasflow[triton]'"
            )
        chosen, why = "triton", "requested"
    else:
        chosen, why = "torch", "requested"
    if (chosen, device_type) not in _logged:
        _logged.add((chosen, device_type))
        logger.info("sampler kernels: %s backend on %s (%s)", chosen, device_type, why)
    return chosen
