"""Pure-torch pieces of the grouped mixture of experts around its two grouped products, in transformers' op
order (DiffusionGemmaTextExperts): the semantics of the fused kernels (triton_experts.py).

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
