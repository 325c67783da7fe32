"""Mixture-of-experts forward over transformers' packed expert weights, without a per-expert Python loop.

Weights: gate_up_proj [E, 2I, D], down_proj [E, D, I] (DiffusionGemmaTextExperts). Two paths:

- dense: every expert on every token, weighted by a dense [N, E] routing matrix. Used on CPU and for few
  experts: each token's result is computed the same way whatever else is in the batch (batch invariance),
  at E/k times the expert FLOPs, which tiny models do not notice.
- grouped: assignments sorted by expert and two grouped GEMMs, the GPU path. No host synchronisation: group
  offsets are computed on the device. `gemm` picks the products: "grouped_mm" gathers the rows and calls
  `torch._grouped_mm` (CUTLASS); "triton" runs kernels/experts' grouped GEMM, which reads the rows through
  the token index and fuses gelu x up into the gate/up product (no [N*k, D] gathered copy, no [N*k, 2I]
  product in memory). With backend="triton" (gelu-tanh experts, as DiffusionGemma's) the activation and the
  weighted combination of each token's k outputs run fused (kernels/experts): no [N*k, D] weighted copy, no
  scatter-add with atomics. gemm="auto": "triton" with the Triton backend, else "grouped_mm".
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pipeline.kernels import experts as expert_kernels

logger = logging.getLogger(__name__)
DENSE_MAX_EXPERTS = 8
GEMMS = ("auto", "grouped_mm", "triton")
_grouped_mm_broken: set[tuple[str, torch.dtype]] = set()


def moe_forward(
    experts: nn.Module,
    x: torch.Tensor,
    top_index: torch.Tensor,
    top_weight: torch.Tensor,
    *,
    path: str = "auto",
    backend: str = "torch",
    gemm: str = "auto",
) -> torch.Tensor:
    """x [N, D], top_index/top_weight [N, k] -> [N, D] in x's dtype. `backend` "triton" fuses the grouped
    path's elementwise work and requires gelu-tanh experts; `gemm` (auto, grouped_mm, triton) picks the
    grouped path's products (gemm="triton" requires backend="triton")."""
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend={backend!r} is not one of torch, triton")
    gemm = check_gemm(gemm)
    if gemm == "auto":
        gemm = "triton" if backend == "triton" else "grouped_mm"
    if gemm == "triton" and backend != "triton":
        raise ValueError("moe gemm='triton' fuses gelu-tanh experts and needs backend='triton'")
    if path == "auto":
        path = "dense" if x.device.type == "cpu" or experts.num_experts <= DENSE_MAX_EXPERTS else "grouped"
    if path == "dense":
        return _dense(experts, x, top_index, top_weight)
    if path == "grouped":
        return _grouped(experts, x, top_index, top_weight, backend, gemm)
    raise ValueError(f"unknown MoE path {path!r}; use auto, dense or grouped")


def _dense(
    experts: nn.Module, x: torch.Tensor, top_index: torch.Tensor, top_weight: torch.Tensor
) -> torch.Tensor:
    num_experts = experts.num_experts
    gate_up = torch.matmul(x.unsqueeze(0), experts.gate_up_proj.transpose(1, 2))  # [E, N, 2I]
    gate, up = gate_up.chunk(2, dim=-1)
    hidden = experts.act_fn(gate) * up
    out = torch.matmul(hidden, experts.down_proj.transpose(1, 2))  # [E, N, D]
    routing = torch.zeros(x.shape[0], num_experts, dtype=top_weight.dtype, device=x.device)
    routing.scatter_(1, top_index, top_weight)  # [N, E]
    weighted = out * routing.t().unsqueeze(-1).to(out.dtype)
    return weighted.sum(dim=0).to(x.dtype)


def check_gemm(gemm: str) -> str:
    if gemm not in GEMMS:
        raise ValueError(f"moe gemm={gemm!r} is not one of {', '.join(GEMMS)}")
    return gemm


def _grouped(
    experts: nn.Module,
    x: torch.Tensor,
    top_index: torch.Tensor,
    top_weight: torch.Tensor,
    backend: str,
    gemm: str,
) -> torch.Tensor:
    num_tokens, top_k = top_index.shape
    num_experts = experts.num_experts
    flat_expert = top_index.reshape(-1)  # [N*k]
    order = torch.argsort(flat_expert, stable=True)
    token_of = order // top_k
    counts = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
    counts.index_add_(0, flat_expert, torch.ones_like(flat_expert, dtype=torch.int32))
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    if gemm == "triton":  # gather and gelu x up inside the gate/up product
        hidden = expert_kernels.expert_gemm(
            x, token_of, experts.gate_up_proj, offsets, gelu=True, backend=backend
        )
        ys = expert_kernels.expert_gemm(hidden, None, experts.down_proj, offsets, gelu=False, backend=backend)
        return expert_kernels.combine(ys, _inverse(order), top_weight, backend=backend).to(x.dtype)
    xs = x.index_select(0, token_of)  # [N*k, D], grouped by expert
    gate_up = _grouped_linear(xs, experts.gate_up_proj, offsets, counts)
    gate, up = gate_up.chunk(2, dim=-1)
    if backend == "triton":
        hidden = expert_kernels.gelu_mul(gate, up, backend=backend)
        ys = _grouped_linear(hidden, experts.down_proj, offsets, counts)  # [N*k, D]
        return expert_kernels.combine(ys, _inverse(order), top_weight, backend=backend).to(x.dtype)
    hidden = experts.act_fn(gate) * up
    ys = _grouped_linear(hidden, experts.down_proj, offsets, counts)  # [N*k, D]
    ys = ys * top_weight.reshape(-1)[order].unsqueeze(-1).to(ys.dtype)
    out = torch.zeros(num_tokens, x.shape[1], dtype=ys.dtype, device=x.device)
    out.index_add_(0, token_of, ys)
    return out.to(x.dtype)


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """Where assignment n*k+j sits in the expert-sorted rows."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor):
    """x [M, K] grouped by expert, weight [E, out, K] -> [M, out]. torch._grouped_mm where the device and
    dtype support it (bf16 on Hopper); otherwise one product per expert, which needs the group sizes on
    the host (one synchronisation) and says so once."""
    key = (x.device.type, x.dtype)
    if key not in _grouped_mm_broken:
        try:
            return torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)
        except (RuntimeError, NotImplementedError) as e:
            _grouped_mm_broken.add(key)
            logger.warning(
                "grouped GEMM unavailable for %s on %s (%s); using one product per expert",
                x.dtype,
                x.device.type,
                str(e).splitlines()[0][:200],
            )
    parts = torch.split(x, counts.tolist())
    return torch.cat([part @ weight[e].t() for e, part in enumerate(parts)])
