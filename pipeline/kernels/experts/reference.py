"""Pure-torch pieces of the grouped mixture of experts around its two grouped products, in transformers' op
order (DiffusionGemmaTextExperts): the semantics of the fused kernels (triton_experts.py, triton_gemm.py).

  expert_gemm(x, rows, weight, offsets, gelu) = the grouped product of x[rows] (rows sorted by expert,
      offsets: each expert's end row) with weight[e].T [K, OUT] per expert; with gelu, gelu_mul of its halves

  gelu_mul(gate, up)            = gelu_tanh(gate) * up, each rounded to the input's dtype
  combine(ys, inverse, weights) [n] = sum_j weights[n, j] * ys[inverse[n * k + j]]
      ys [N*k, D]: the expert outputs grouped by expert; inverse: where token n's j-th assignment sits in ys;
      weights [N, k] float32. transformers rounds each weighted term to the model's dtype and adds them in
      expert order; this reference adds them in float32 in rank order and rounds once (the kernel does the
      same), which is closer to the exact sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gelu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh") * up


def combine(ys: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    num, top_k = weights.shape
    picked = ys.index_select(0, inverse).view(num, top_k, -1).float()  # [N, k, D]
    return (picked * weights[:, :, None]).sum(dim=1).to(ys.dtype)


def expert_gemm(
    x: torch.Tensor, rows: torch.Tensor | None, weight: torch.Tensor, offsets: torch.Tensor, *, gelu: bool
) -> torch.Tensor:
    """The grouped product of the rows (x[rows], or x itself when rows is None), sorted by expert, with their
    experts' weights [E, OUT, K]: rows offsets[e-1]..offsets[e] times weight[e].T, rounded to x's dtype; with
    `gelu`, the product's two halves [gate | up] go through gelu_mul. One product per expert (the row counts
    are read on the host: a reference, not a GPU path)."""
    xs = x if rows is None else x.index_select(0, rows)
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    parts = [xs[a:b] @ weight[e].t() for e, (a, b) in enumerate(zip(starts, ends, strict=True))]
    product = torch.cat(parts) if parts else xs.new_empty(0, weight.shape[1])
    return gelu_mul(*product.chunk(2, dim=-1)) if gelu else product
