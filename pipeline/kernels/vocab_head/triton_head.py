"""Fused vocabulary head (Triton): argmax, Gumbel-max sample, entropy and softmax(z) @ E per position, with
the semantics of reference.py and no [N, V] tensor: extra memory is one vocabulary chunk of logits [N, C] in
E's dtype, two [N, D] float32 accumulators and O(N).

Design, for the target N = 8,192, V = 262,144, D = 2,816, bf16 (H200: 724 TFLOP/s measured for bf16 matmul):

* The two products, z = h E^T and softmax(z) E, are 2 x 2NVD = 24.2 TFLOP, about 33 ms. They stay in cuBLAS,
  over vocabulary chunks of C = 2**27 / N tokens (16,384 here): 256 MiB of chunk logits + 2 x 92 MiB of
  accumulators, 0.45 GiB in all (the transformers sequence: 51.5 GB).
* Between them ONE Triton kernel per chunk, one program per row, does all the float32 work: soft-capping and
  temperature, an online max / normaliser / entropy (flash attention's rescaling, over vocabulary blocks),
  the argmax and the Gumbel-max sample with the keyed noise generated in-kernel; for the self-conditioning
  input it rewrites the chunk in place as p = exp(z - m) in E's dtype and returns exp(m_old - m_new) per row,
  and the host adds p @ E_chunk (float32 output) to the rescaled accumulator. Memory traffic: each logit is
  read once and written twice (z rounded to E's dtype, then p; the re-read mostly hits L2): 9-17 GB, 2-4 ms.
* The exact noise costs ~80 PTX instructions per logit (two libdevice logf and the hash), as much as all the
  rest (~90: tanh, an IEEE division, exp, reductions, the soft pass). Only a block that can hold the sample
  needs it: a block is skipped when its max + 16.7 (the largest noise) is below the best noisy logit so far,
  else when a cheap estimate (two hardware log2, ~20 instructions, error < 2**-13) stays below it by more than
  16x that error. Over a row's 128 blocks of 2,048 tokens, i.i.d. logits set a new best in ~ln(128) + 0.6 = 5
  blocks; the result is unchanged. Estimate: ~120 instructions per logit, ~15 ms for 2.1e9 logits on an H100
  at 2.5 warp-instructions per clock per SM, so ~50 ms in all, ~65% of the matmul rate (to be measured:
  benchmarks/bench_vocab_head.py).
* A GEMM with the head as its epilogue would save the 2-4 ms of traffic, not the ALU work, and cannot hold the
  softmax(z) E accumulator: 64 rows x 2,816 float32 are 720 KB, over an SM's registers and shared memory, so
  it would split D (recomputing the logits per split) or spill; and a Triton GEMM at this shape reaches less
  of the tensor-core peak than cuBLAS, which costs more than the traffic saved.

Bit-level contract: z is rounded as torch rounds it on the same device (CUDA: x * float32(1 / softcap),
libdevice tanhf and logf, IEEE division by T; CPU: IEEE divisions), the noise words equal rng.py's, ties go to
the first index within and across chunks. `soft` rounds z to E's dtype before the softmax, as the reference;
it then rounds p unnormalised where the reference rounds p / S: within two units in the last place of E's
dtype of the reference, and no further from the exact value. Entropy: H = log S - sum_v e^(z_v-m) (z_v-m) / S.
"""

from __future__ import annotations

import functools
import logging
import struct

import torch
import triton
import triton.language as tl

from pipeline.kernels.rng_triton import GUMBEL_ESTIMATE_ERROR, absorb, gumbel, gumbel_estimate
from pipeline.kernels.triton_math import device_flags, tanh, to_elem
from pipeline.kernels.vocab_head.reference import HeadOutput

logger = logging.getLogger(__name__)

# Vocabulary tokens per chunk: the [N, C] chunk of logits holds about this many elements (256 MiB in bf16).
VOCAB_CHUNK_ELEMENTS = 1 << 27
MIN_VOCAB_CHUNK = 2048
MAX_BLOCK_V = 2048
# Upper bound of the keyed Gumbel noise: -log(-log(1 - 2**-24)) = 16.6355 (see rng_triton.gumbel).
_GUMBEL_MAX = tl.constexpr(16.7)
# A block needs its exact noise only if z + estimated noise comes within this margin of the best so far: 16x
# the estimate's error bound, plus the float32 rounding of the sums (relative to |best|).
_ESTIMATE_MARGIN = tl.constexpr(16 * GUMBEL_ESTIMATE_ERROR.value)
_ROUNDING_MARGIN = tl.constexpr(2.0**-20)
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Rows of the [6, N] float32 statistics buffer.
_MAX = tl.constexpr(0)  # running max of z
_SUM = tl.constexpr(1)  # sum of e^(z - max)
_ENT = tl.constexpr(2)  # sum of e^(z - max) (z - max)
_BEST = tl.constexpr(3)  # running max of z + Gumbel noise
_SOFT_MAX = tl.constexpr(4)  # running max of z rounded to E's dtype
_SOFT_SUM = tl.constexpr(5)  # sum of e^(zq - soft max)


@triton.jit
def _scaled_logits(x, softcap, inv_softcap, temperature, HAS_SOFTCAP: tl.constexpr, CUDA: tl.constexpr):
    """z = tanh(x / softcap) * softcap / temperature, rounded step by step as torch does on the device."""
    if HAS_SOFTCAP:
        if CUDA:
            x = x * inv_softcap  # torch on CUDA divides by a Python scalar as a product with its reciprocal
        else:
            x = tl.math.div_rn(x, softcap)
        x = tanh(x, CUDA) * softcap
    return tl.math.div_rn(x, temperature)


@triton.jit
def _head_chunk_kernel(
    chunk_ptr,  # [N, C] logits of vocabulary ids [vocab_offset, vocab_offset + C), E's dtype; p when SOFT
    temperature_ptr,  # [N] float32
    state_ptr,  # [N] int64 position words (SAMPLE)
    stats_ptr,  # [6, N] float32 running statistics, carried from chunk to chunk
    argmax_ptr,  # [N] int64
    sampled_ptr,  # [N] int64 (SAMPLE)
    entropy_ptr,  # [N] float32, written by the LAST chunk
    rescale_ptr,  # [N] float32 exp(m_old - m_new) for the soft accumulator (SOFT)
    num_rows,
    width,
    vocab_offset,
    softcap,
    inv_softcap,
    HAS_SOFTCAP: tl.constexpr,
    SAMPLE: tl.constexpr,
    SOFT: tl.constexpr,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    CUDA: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = chunk_ptr + row.to(tl.int64) * width
    dtype = chunk_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_V)
    temperature = tl.load(temperature_ptr + row)
    if FIRST:
        run_max = float("-inf")
        run_sum = 0.0
        run_ent = 0.0  # sum_v e^(z_v - run_max) (z_v - run_max), <= 0
        best = float("-inf")  # max_v z_v + g_v
        soft_max = float("-inf")
        soft_sum = 0.0
        arg = 0
        smp = 0
    else:
        run_max = tl.load(stats_ptr + _MAX * num_rows + row)
        run_sum = tl.load(stats_ptr + _SUM * num_rows + row)
        run_ent = tl.load(stats_ptr + _ENT * num_rows + row)
        best = tl.load(stats_ptr + _BEST * num_rows + row)
        soft_max = tl.load(stats_ptr + _SOFT_MAX * num_rows + row)
        soft_sum = tl.load(stats_ptr + _SOFT_SUM * num_rows + row)
        arg = tl.load(argmax_ptr + row).to(tl.int32)
        smp = 0
        if SAMPLE:
            smp = tl.load(sampled_ptr + row).to(tl.int32)
    if SAMPLE:
        word = tl.load(state_ptr + row).to(tl.uint32)

    # Pass 1: statistics, argmax and sample; z rounded to E's dtype kept in place for pass 2.
    for start in range(0, width, BLOCK_V):
        offs = start + cols
        mask = offs < width
        x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = _scaled_logits(x, softcap, inv_softcap, temperature, HAS_SOFTCAP, CUDA)
        z = tl.where(mask, z, float("-inf"))
        b_max = tl.max(z, axis=0)
        if b_max > run_max:  # strict: the earlier index keeps ties; rare after the first blocks
            arg = vocab_offset + start + tl.argmax(z, axis=0, tie_break_left=True)
        new_max = tl.maximum(run_max, b_max)
        alpha = tl.exp(run_max - new_max)
        shifted = tl.where(mask, z - new_max, 0.0)
        e = tl.where(mask, tl.exp(shifted), 0.0)
        delta = tl.where(run_sum > 0.0, run_max - new_max, 0.0)  # re-bases the old terms (none at first)
        run_ent = alpha * (run_ent + delta * run_sum) + tl.sum(e * shifted, axis=0)
        run_sum = alpha * run_sum + tl.sum(e, axis=0)
        run_max = new_max
        # The exact noise (two libdevice logs per token) is half the cost of the pass; most blocks cannot hold
        # the sample: skipped when even the largest noise cannot lift their max to `best`, else when the cheap
        # estimate of z + noise stays below `best` by more than its error. The result is the same.
        if SAMPLE:  # noqa: SIM102 - a compile-time branch around run-time ones
            if b_max + _GUMBEL_MAX >= best:
                words = absorb(word, (vocab_offset + offs).to(tl.uint32))
                rough = tl.where(mask, z + gumbel_estimate(words, CUDA), float("-inf"))
                if tl.max(rough, axis=0) >= best - (_ESTIMATE_MARGIN + _ROUNDING_MARGIN * tl.abs(best)):
                    y = tl.where(mask, z + gumbel(words, CUDA), float("-inf"))
                    y_max, y_arg = tl.max(y, axis=0, return_indices=True, return_indices_tie_break_left=True)
                    smp = tl.where(y_max > best, vocab_offset + start + y_arg, smp)
                    best = tl.maximum(best, y_max)
        if SOFT:
            tl.store(row_ptr + offs, to_elem(z, dtype, ROUND_BF16), mask=mask)

    # Pass 2: p = exp(zq - max zq) in E's dtype; max zq = rounded max z, since rounding is monotonic.
    if SOFT:
        new_soft_max = to_elem(run_max, dtype, ROUND_BF16).to(tl.float32)
        total = 0.0
        for start in range(0, width, BLOCK_V):
            offs = start + cols
            mask = offs < width
            zq = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            p = tl.where(mask, tl.exp(zq - new_soft_max), 0.0)
            total += tl.sum(p, axis=0)
            tl.store(row_ptr + offs, to_elem(p, dtype, ROUND_BF16), mask=mask)
        rescale = tl.exp(soft_max - new_soft_max)  # 0 on the first chunk
        soft_sum = soft_sum * rescale + total
        soft_max = new_soft_max
        tl.store(rescale_ptr + row, rescale)

    tl.store(stats_ptr + _MAX * num_rows + row, run_max)
    tl.store(stats_ptr + _SUM * num_rows + row, run_sum)
    tl.store(stats_ptr + _ENT * num_rows + row, run_ent)
    tl.store(stats_ptr + _BEST * num_rows + row, best)
    tl.store(stats_ptr + _SOFT_MAX * num_rows + row, soft_max)
    tl.store(stats_ptr + _SOFT_SUM * num_rows + row, soft_sum)
    tl.store(argmax_ptr + row, arg.to(tl.int64))
    if SAMPLE:
        tl.store(sampled_ptr + row, smp.to(tl.int64))
    if LAST:
        tl.store(entropy_ptr + row, tl.log(run_sum) - tl.math.div_rn(run_ent, run_sum))


def vocab_head_triton(
    hidden: torch.Tensor,
    embedding: torch.Tensor,
    *,
    softcap: float | None,
    temperature: torch.Tensor,
    sample_state: torch.Tensor | None = None,
    want_soft: bool = False,
    vocab_chunk: int | None = None,
) -> HeadOutput:
    """hidden [N, D], embedding [V, D] (one float dtype), temperature [N] float32 > 0, sample_state [N] int64.

    Returns argmax [N] int64, entropy [N] float32, sampled [N] int64 (with sample_state) and soft [N, D] in
    E's dtype (with want_soft), as vocab_head_reference. `vocab_chunk` overrides the tokens per chunk.
    """
    _check_inputs(hidden, embedding, temperature, sample_state, vocab_chunk)
    num, dim = hidden.shape
    device = hidden.device
    out = HeadOutput(
        argmax=torch.empty(num, dtype=torch.int64, device=device),
        entropy=torch.empty(num, dtype=torch.float32, device=device),
        sampled=torch.empty(num, dtype=torch.int64, device=device) if sample_state is not None else None,
        soft=torch.empty(num, dim, dtype=embedding.dtype, device=device) if want_soft else None,
    )
    if num > 0:
        _vocab_head_forward(
            hidden, embedding, softcap, temperature, sample_state, out, vocab_chunk=vocab_chunk
        )
    return out


def _vocab_head_forward(
    hidden: torch.Tensor,
    embedding: torch.Tensor,
    softcap: float | None,
    temperature: torch.Tensor,
    sample_state: torch.Tensor | None,
    out: HeadOutput,
    *,
    vocab_chunk: int | None = None,
    block_v: int | None = None,
) -> None:
    """Writes every element of `out` (its tensors preallocated: the tests poison them first)."""
    num = hidden.shape[0]
    vocab = embedding.shape[0]
    chunk = min(vocab, vocab_chunk or _default_vocab_chunk(num))
    block_v = block_v or min(MAX_BLOCK_V, triton.next_power_of_2(chunk))
    num_warps = 8 if block_v >= 2048 else 4
    flags = device_flags(embedding)
    want_soft = out.soft is not None
    has_softcap = bool(softcap)
    # float32(1 / float32(softcap)): the factor torch on CUDA multiplies by when it divides by the softcap
    inv_softcap = _f32(1.0 / _f32(softcap)) if has_softcap else 1.0
    temperature = temperature.contiguous()  # [N]
    state = sample_state.contiguous() if sample_state is not None else out.argmax  # [N]; unused if not SAMPLE
    buffer = torch.empty(num * chunk, dtype=embedding.dtype, device=hidden.device)
    # The first chunk initialises the statistics; NaN here makes a missed initialisation visible.
    stats = torch.full((6, num), float("nan"), dtype=torch.float32, device=hidden.device)  # [6, N]
    rescale = torch.empty(num, dtype=torch.float32, device=hidden.device) if want_soft else stats[0]  # [N]
    sampled = out.sampled if out.sampled is not None else out.argmax  # [N]; unused if not SAMPLE
    acc = None  # [N, D] float32: sum over chunks of p @ E_chunk, re-based to the running max
    for lo in range(0, vocab, chunk):
        hi = min(vocab, lo + chunk)
        e_chunk = embedding[lo:hi]  # [C, D]
        logits = buffer[: num * (hi - lo)].view(num, hi - lo)  # [N, C]
        torch.mm(hidden, e_chunk.t(), out=logits)  # F.linear's product, in E's dtype
        _head_chunk_kernel[(num,)](
            logits,
            temperature,
            state,
            stats,
            out.argmax,
            sampled,
            out.entropy,
            rescale,
            num,
            hi - lo,
            lo,
            float(softcap) if has_softcap else 1.0,
            inv_softcap,
            HAS_SOFTCAP=has_softcap,
            SAMPLE=sample_state is not None,
            SOFT=want_soft,
            FIRST=lo == 0,
            LAST=hi == vocab,
            **flags,
            BLOCK_V=block_v,
            num_warps=num_warps,
        )
        if want_soft:
            if acc is None:
                acc = _matmul_f32(None, logits, e_chunk)
            else:
                acc.mul_(rescale[:, None])
                acc = _matmul_f32(acc, logits, e_chunk)
    if want_soft:
        out.soft.copy_(acc.div_(stats[_SOFT_SUM.value][:, None]))


def _f32(x: float) -> float:
    """x rounded to float32 (a double-precision quotient rounded so is the correctly rounded float32 one)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _default_vocab_chunk(num: int) -> int:
    """Largest power of two with num x chunk <= VOCAB_CHUNK_ELEMENTS (16,384 tokens at N = 8,192)."""
    return max(MIN_VOCAB_CHUNK, 1 << max(0, (VOCAB_CHUNK_ELEMENTS // max(1, num)).bit_length() - 1))


def _matmul_f32(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[acc +] a @ b in float32 for a [N, C] and b [C, D] in E's dtype (half products summed in float32)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b) if acc is None else acc.addmm_(a, b)
    if a.device.type != "cpu" and _has_out_dtype(a.device):  # CUDA (and meta, for the step profile)
        if acc is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.addmm(acc, a, b, out_dtype=torch.float32)
    # CPU (the interpreter) and torch < 2.8: the same arithmetic through float32 copies of the chunk.
    return torch.mm(a.float(), b.float()) if acc is None else acc.addmm_(a.float(), b.float())


@functools.cache
def _has_out_dtype(device: torch.device) -> bool:
    """Whether torch.mm/addmm take out_dtype=float32 for half inputs on `device` (torch >= 2.8 on CUDA)."""
    a = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
    try:
        torch.mm(a, a, out_dtype=torch.float32)
        torch.addmm(torch.zeros(1, 1, device=device), a, a, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        logger.warning(
            "torch %s has no float32-output half matmul on %s: the soft-embedding product runs in float32 "
            "copies (slow); torch >= 2.8 avoids it",
            torch.__version__,
            device,
        )
        return False
    return True


def _check_inputs(
    hidden: torch.Tensor,
    embedding: torch.Tensor,
    temperature: torch.Tensor,
    sample_state: torch.Tensor | None,
    vocab_chunk: int | None,
) -> None:
    if hidden.ndim != 2 or embedding.ndim != 2 or hidden.shape[1] != embedding.shape[1]:
        raise ValueError(
            f"hidden must be [N, D] and embedding [V, D] with the same D; got {tuple(hidden.shape)} and "
            f"{tuple(embedding.shape)}"
        )
    if hidden.dtype != embedding.dtype or embedding.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            "hidden and embedding must share a dtype among float32, float16, bfloat16; got "
            f"{hidden.dtype} and {embedding.dtype}"
        )
    if not 0 < embedding.shape[0] < 2**31:
        raise ValueError(f"vocabulary size {embedding.shape[0]} must be in [1, 2**31)")
    if hidden.device != embedding.device or temperature.device != hidden.device:
        raise ValueError(
            "hidden, embedding and temperature must be on one device; got "
            f"{hidden.device}, {embedding.device}, {temperature.device}"
        )
    if temperature.shape != (hidden.shape[0],) or temperature.dtype != torch.float32:
        raise ValueError(
            f"temperature must be a float32 [N]={hidden.shape[0]} tensor; got {temperature.dtype} "
            f"{tuple(temperature.shape)}"
        )
    if sample_state is not None and (
        sample_state.shape != (hidden.shape[0],)
        or sample_state.dtype != torch.int64
        or sample_state.device != hidden.device
    ):
        raise ValueError(
            f"sample_state must be an int64 [N]={hidden.shape[0]} tensor on {hidden.device}; got "
            f"{sample_state.dtype} {tuple(sample_state.shape)} on {sample_state.device}"
        )
    if vocab_chunk is not None and vocab_chunk < 1:
        raise ValueError(f"vocab_chunk={vocab_chunk} must be a positive number of tokens")
