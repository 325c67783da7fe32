"""Tolerances of the kernel tests: float32 close, bfloat16 within one unit in the last place."""

from __future__ import annotations

import torch


def assert_close_ulp(
    got: torch.Tensor, want: torch.Tensor, name: str, *, max_fraction: float = 0.01, atol: float = 0.0
) -> None:
    """float32: within 1e-5 relative (+ max(atol, 1e-6)). bfloat16: every element equal to `want` or one unit
    in the last place away (or within `atol`, which forgives near-zero results of a cancellation), and at most
    `max_fraction` of them different."""
    assert got.shape == want.shape and got.dtype == want.dtype, name
    assert not torch.isnan(got).any(), f"{name}: unwritten (NaN) elements"
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=max(atol, 1e-6), msg=name)
        return
    g, w = got.float(), want.float()
    ulp = torch.where(w == 0, torch.full_like(w, 2.0**-133), 2.0 ** (torch.floor(torch.log2(w.abs())) - 7))
    far = (g - w).abs() > torch.clamp(ulp, min=atol)
    assert not far.any(), (
        f"{name}: {int(far.sum())} elements more than one ulp off, e.g. {g[far][:4]} vs {w[far][:4]}"
    )
    fraction = (g != w).float().mean().item()
    assert fraction <= max_fraction, (
        f"{name}: {fraction:.2%} of elements one ulp off (at most {max_fraction:.0%})"
    )
