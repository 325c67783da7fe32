"""Keyed, counter-based random numbers: the same definition in torch (here) and in Triton (`rng_triton.py`).

Every draw of a row is a pure function of (seed, row id, stream, canvas, step, position[, vocabulary id]),
so a row's output never depends on its batch, its neighbours, the actor or a resumed run.

Definition (all arithmetic on unsigned 32-bit words, multiplication modulo 2**32):

    mix32(x)      = lowbias32 (C. Wellons): x ^= x>>16; x *= 0x7feb352d; x ^= x>>15; x *= 0x846ca68b; x ^= x>>16
    absorb(h, w)  = mix32(h ^ w ^ 0x9e3779b9)
    row key       = (k0, k1): the first 8 bytes of blake2b(f"{seed}:{row_id}"), little-endian words; for the
                    completion c > 0 of a prompt (sampler.completions_per_prompt) blake2b with person
                    f"completion{c}" (a different hash: no row id and completion can give another's key)
    row state     = absorb(absorb(absorb(absorb(absorb(0, k0), k1), stream), canvas), step)
    position state= absorb(row state, position)
    token in [0,n)= (position state * n) >> 32                       (initial canvas, re-noising)
    Gumbel(v)     = -log(-log(u)), u = ((absorb(position state, v) >> 9) + 0.5) / 2**23   (sampling)

u keeps 23 bits so that the + 0.5 is exact in float32: u lies strictly inside (0, 1) and the noise is finite
(with 24 bits, word >> 8 = 2**24 - 1 rounds to u = 1.0 and gives +inf noise once in 2**24 draws).

torch has no uint32, so words live in int64 tensors holding values in [0, 2**32); products are split into
16-bit halves so that no intermediate exceeds 2**49.
"""

from __future__ import annotations

import hashlib

import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
MIX_C1 = 0x7FEB352D
MIX_C2 = 0x846CA68B

STREAM_INIT = 1
STREAM_SAMPLE = 2
STREAM_RENOISE = 3
STREAM_MASK_SAMPLE = 4  # mask sampler: Gumbel noise of the predictions (canvas = block, step = step in block)
STREAM_MASK_ORDER = 5  # mask sampler: uniform confidences of remasking="random", draws of "origin"
STREAM_MASK_PICK = 6  # mask sampler: Gumbel noise of the positions drawn with alg_temp > 0


def row_key(seed: int, row_id: str, completion: int = 0) -> tuple[int, int]:
    person = f"completion{completion}".encode() if completion else b""
    digest = hashlib.blake2b(f"{seed}:{row_id}".encode(), digest_size=8, person=person).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_C1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX_C2)
    return x ^ (x >> 16)


def absorb(h: torch.Tensor, w: torch.Tensor | int) -> torch.Tensor:
    return mix32(h ^ w ^ GOLDEN)


def row_state(
    k0: torch.Tensor, k1: torch.Tensor, stream: int, canvas: torch.Tensor, step: torch.Tensor | int
) -> torch.Tensor:
    """[B] int64 words from per-row keys [B], canvas indices [B] and steps ([B] or a scalar)."""
    h = absorb(torch.zeros_like(k0), k0)
    h = absorb(h, k1)
    h = absorb(h, stream)
    h = absorb(h, canvas)
    return absorb(h, step)


def position_state(row: torch.Tensor, length: int) -> torch.Tensor:
    """[B, L] words for positions 0..L-1 of each row state [B]."""
    positions = torch.arange(length, device=row.device, dtype=torch.int64)
    return absorb(row[:, None], positions[None, :])


def uniform_tokens(state: torch.Tensor, n: int) -> torch.Tensor:
    """Tokens in [0, n) from words (Lemire's multiply-shift)."""
    if not 0 < n < 2**30:
        raise ValueError(f"vocabulary size {n} out of range for the keyed generator")
    return (state * n) >> 32


def uniform(state: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in (0, 1), float32 (23 bits, none equal to 0 or 1), one per word of `state`."""
    return ((state >> 9).to(torch.float32) + 0.5) * (1.0 / 8388608.0)


def gumbel(state: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """Gumbel noise [..., V] float32 for position words `state` [...] and vocabulary ids `vocab` [V]."""
    return -torch.log(-torch.log(uniform(absorb(state[..., None], vocab))))
