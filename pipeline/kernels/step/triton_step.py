"""Fused denoising-step update (Triton): one kernel, one program per row, with the semantics of reference.py
(entropy-bound acceptance, re-noising, stability against the argmax history, mean-entropy confidence) and no
host synchronisation.

The row's entropies are sorted as (entropy, position) pairs packed into int64 keys, so equal entropies keep
position order (a stable sort; the reference keeps transformers' unstable torch.sort, so the two may accept
different ones of several exactly equal entropies straddling the bound, and agree otherwise). The running sum
of the sorted entropies is accumulated in float64 and rounded to float32, which is what torch.cumsum does on
CPU; on CUDA torch accumulates in float32 in a scan order of its own, so a position whose `cumsum - entropy`
lands within a float32 rounding of `entropy_bound` may flip there (with bounds placed exactly on a cumulative
sum, a float32 running sum flips 4 in 32 rows; this kernel, 0). The mean entropy is summed in float64 too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pipeline.kernels.step.reference import StepOutput

# One program sorts a whole row: 4,096 int64 keys in 16 warps take 128 registers a thread, without spills.
MAX_CANVAS_LENGTH = 4096
_INT64_MAX = tl.constexpr(0x7FFFFFFFFFFFFFFF)


@triton.jit
def _step_kernel(
    entropy_ptr,  # [B, L] float32
    sampled_ptr,  # [B, L] int64
    noise_ptr,  # [B, L] int64
    argmax_ptr,  # [B, L] int64
    history_ptr,  # [B, S, L] int64
    canvas_ptr,  # [B, L] int64 out
    accepted_ptr,  # [B, L] uint8 out (0/1, returned as bool)
    new_history_ptr,  # [B, S, L] int64 out
    stable_ptr,  # [B] uint8 out
    confident_ptr,  # [B] uint8 out
    length,
    depth,
    entropy_bound,
    confidence_threshold,
    BLOCK_L: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_L)
    mask = offs < length
    base = row * length
    entropy = tl.load(entropy_ptr + base + offs, mask=mask, other=0.0)

    # Sort (entropy, position) ascending. Float bits -> int32 with the same order (negative floats have their
    # magnitude bits flipped); -0.0 is folded into +0.0 first, as torch compares them equal.
    entropy = tl.where(entropy == 0.0, 0.0, entropy)
    bits = entropy.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    packed = (key.to(tl.int64) << 32) | offs.to(tl.int64)
    packed = tl.where(mask, packed, _INT64_MAX)  # padding sorts last
    packed = tl.sort(packed, dim=0)
    order = (packed & 0xFFFFFFFF).to(tl.int32)  # position of the k-th smallest entropy
    sorted_key = (packed >> 32).to(tl.int32)
    sorted_entropy = (sorted_key ^ ((sorted_key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    sorted_entropy = tl.where(mask, sorted_entropy, 0.0)  # slot k < L holds a real entry

    cumulative = tl.cumsum(sorted_entropy.to(tl.float64), axis=0).to(tl.float32)
    selected = (cumulative - sorted_entropy) <= entropy_bound

    # Scatter back through the permutation: slot k writes position order[k].
    target = base + order
    sampled = tl.load(sampled_ptr + target, mask=mask, other=0)
    noise = tl.load(noise_ptr + target, mask=mask, other=0)
    tl.store(canvas_ptr + target, tl.where(selected, sampled, noise), mask=mask)
    tl.store(accepted_ptr + target, selected.to(tl.uint8), mask=mask)

    # Stability: argmax equals every canvas of the history; the history shifts by one.
    argmax = tl.load(argmax_ptr + base + offs, mask=mask, other=0)
    mismatches = 0
    for s in range(0, depth):
        past = tl.load(history_ptr + (row * depth + s) * length + offs, mask=mask, other=0)
        mismatches += tl.sum(tl.where(mask & (past != argmax), 1, 0), axis=0)
        if s > 0:
            tl.store(new_history_ptr + (row * depth + s - 1) * length + offs, past, mask=mask)
    if depth > 0:
        tl.store(new_history_ptr + (row * depth + depth - 1) * length + offs, argmax, mask=mask)
    tl.store(stable_ptr + row, (mismatches == 0).to(tl.uint8))

    mean = (tl.sum(entropy.to(tl.float64), axis=0) / length).to(tl.float32)
    tl.store(confident_ptr + row, (mean < confidence_threshold).to(tl.uint8))


def step_triton(
    current: torch.Tensor,
    sampled: torch.Tensor,
    argmax: torch.Tensor,
    entropy: torch.Tensor,
    noise: torch.Tensor,
    history: torch.Tensor,
    *,
    entropy_bound: float,
    confidence_threshold: float,
) -> StepOutput:
    """current/sampled/argmax/noise [B, L] int64, entropy [B, L] float32, history [B, S, L] int64.

    Returns canvas [B, L], accepted [B, L] bool, stable [B] bool, confident [B] bool and the shifted history
    [B, S, L] (the input itself when S = 0), as step_reference without `frozen`.
    """
    _check_inputs(current, sampled, argmax, entropy, noise, history)
    batch, length = current.shape
    out = StepOutput(
        canvas=torch.empty_like(current),
        accepted=torch.empty(batch, length, dtype=torch.uint8, device=current.device),
        stable=torch.empty(batch, dtype=torch.uint8, device=current.device),
        confident=torch.empty(batch, dtype=torch.uint8, device=current.device),
        history=torch.empty_like(history) if history.shape[1] > 0 else history,
    )
    if batch > 0 and length > 0:
        bounds = dict(entropy_bound=entropy_bound, confidence_threshold=confidence_threshold)
        _step_forward(sampled, argmax, entropy, noise, history, out, **bounds)
    elif batch > 0:  # an empty canvas: nothing to accept, trivially stable; the mean of nothing is NaN
        out.stable.fill_(1)
        out.confident.fill_(0)
    return StepOutput(
        canvas=out.canvas,
        accepted=out.accepted.view(torch.bool),
        stable=out.stable.view(torch.bool),
        confident=out.confident.view(torch.bool),
        history=out.history,
    )


def _step_forward(
    sampled: torch.Tensor,
    argmax: torch.Tensor,
    entropy: torch.Tensor,
    noise: torch.Tensor,
    history: torch.Tensor,
    out: StepOutput,
    *,
    entropy_bound: float,
    confidence_threshold: float,
) -> None:
    """Writes every element of `out` (uint8 accepted/stable/confident, preallocated; tests poison them)."""
    batch, length = entropy.shape
    block_l = triton.next_power_of_2(length)
    _step_kernel[(batch,)](
        entropy.contiguous(),
        sampled.contiguous(),
        noise.contiguous(),
        argmax.contiguous(),
        history.contiguous(),
        out.canvas,
        out.accepted,
        out.history,
        out.stable,
        out.confident,
        length,
        history.shape[1],
        float(entropy_bound),
        float(confidence_threshold),
        BLOCK_L=block_l,
        num_warps=4 if block_l <= 1024 else (8 if block_l <= 2048 else 16),
    )


def _check_inputs(
    current: torch.Tensor,
    sampled: torch.Tensor,
    argmax: torch.Tensor,
    entropy: torch.Tensor,
    noise: torch.Tensor,
    history: torch.Tensor,
) -> None:
    if current.ndim != 2:
        raise ValueError(f"current must be [B, L]; got {tuple(current.shape)}")
    for name, tensor in (("sampled", sampled), ("argmax", argmax), ("noise", noise), ("entropy", entropy)):
        if tensor.shape != current.shape:
            raise ValueError(f"{name} must be [B, L]={tuple(current.shape)}; got {tuple(tensor.shape)}")
    for name, tensor in (("current", current), ("sampled", sampled), ("argmax", argmax), ("noise", noise)):
        if tensor.dtype != torch.int64:
            raise ValueError(f"{name} must be int64; got {tensor.dtype}")
    if entropy.dtype != torch.float32:
        raise ValueError(f"entropy must be float32; got {entropy.dtype}")
    batch, length = current.shape
    if (
        history.ndim != 3
        or history.shape[0] != batch
        or history.shape[2] != length
        or history.dtype != torch.int64
    ):
        raise ValueError(
            f"history must be int64 [B, S, L] with B={batch}, L={length}; "
            f"got {history.dtype} {tuple(history.shape)}"
        )
    if length > MAX_CANVAS_LENGTH:
        raise ValueError(f"canvas length {length} exceeds {MAX_CANVAS_LENGTH}, the longest one program sorts")
    devices = {t.device for t in (current, sampled, argmax, entropy, noise, history)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device; got {sorted(str(d) for d in devices)}")
