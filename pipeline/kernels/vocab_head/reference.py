"""Pure-torch vocabulary head: the semantics every fused implementation must reproduce.

Per position n, with z = softcap(h_n E^T) / T_n (product in E's dtype, then float32, as transformers does):
  argmax[n]  = argmax_v z[v]                      (first index on ties)
  sampled[n] = argmax_v z[v] + Gumbel(n, v)       (keyed noise, pipeline.kernels.rng; first index on ties)
  entropy[n] = H(softmax(z))                      (torch.distributions.Categorical, as the reference)
  soft[n]    = softmax(z) @ E                     (self-conditioning input, E's dtype; optional)

It works on chunks of positions so that memory stays at chunk x V, never N x V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.kernels import rng

# Positions per chunk are chosen so that one chunk's [chunk, V] float32 logits stay near this many elements.
CHUNK_ELEMENTS = 1 << 22


@dataclass
class HeadOutput:
    argmax: torch.Tensor  # [N] int64
    entropy: torch.Tensor  # [N] float32
    sampled: torch.Tensor | None = None  # [N] int64, when sample_state is given
    soft: torch.Tensor | None = None  # [N, D] in E's dtype, when want_soft


def softcap_logits(hidden: torch.Tensor, embedding: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = F.linear(hidden, embedding).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def vocab_head_reference(
    hidden: torch.Tensor,
    embedding: torch.Tensor,
    *,
    softcap: float | None,
    temperature: torch.Tensor,
    sample_state: torch.Tensor | None = None,
    want_soft: bool = False,
    chunk_size: int | None = None,
) -> HeadOutput:
    """hidden [N, D], embedding [V, D], temperature [N] float32 (> 0), sample_state [N] int64 words."""
    num, _ = hidden.shape
    vocab = embedding.shape[0]
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // vocab)
    vocab_ids = torch.arange(vocab, device=hidden.device, dtype=torch.int64)
    argmax = torch.empty(num, dtype=torch.int64, device=hidden.device)
    entropy = torch.empty(num, dtype=torch.float32, device=hidden.device)
    sampled = torch.empty_like(argmax) if sample_state is not None else None
    soft = (
        torch.empty(num, embedding.shape[1], dtype=embedding.dtype, device=hidden.device)
        if want_soft
        else None
    )
    for lo in range(0, num, chunk):
        hi = min(num, lo + chunk)
        z = softcap_logits(hidden[lo:hi], embedding, softcap) / temperature[lo:hi, None]
        argmax[lo:hi] = z.argmax(dim=-1)
        entropy[lo:hi] = torch.distributions.Categorical(logits=z, validate_args=False).entropy()
        if sampled is not None:
            sampled[lo:hi] = (z + rng.gumbel(sample_state[lo:hi], vocab_ids)).argmax(dim=-1)
        if soft is not None:
            # transformers casts the processed logits to the embedding dtype before the float32 softmax.
            probs = z.to(embedding.dtype).softmax(dim=-1, dtype=torch.float32).to(embedding.dtype)
            soft[lo:hi] = probs @ embedding
    return HeadOutput(argmax=argmax, entropy=entropy, sampled=sampled, soft=soft)
