"""rng_triton against its definition in rng.py: equal uint32 words, equal (CUDA) or close (CPU) noise."""

import math

import pytest
import torch
import triton
import triton.language as tl

from pipeline.kernels import rng
from pipeline.kernels.rng_triton import GUMBEL_ESTIMATE_ERROR, absorb, gumbel, gumbel_estimate, mix32
from pipeline.kernels.vocab_head.triton_head import _GUMBEL_MAX

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On CUDA both sides call libdevice logf. On CPU the interpreter takes numpy's log and torch its own
# vectorised one: a third of the draws differ, by at most 2 units in the last place of max(1, |noise|).
NOISE_TOL = 0.0 if DEVICE == "cuda" else 2.0**-21


@triton.jit
def _draw_kernel(
    state_ptr,  # [M] int64 words
    vocab_ptr,  # [V] int64 ids
    mixed_ptr,  # [M] int64 out: mix32(state)
    words_ptr,  # [M, V] int64 out: absorb(state, vocab)
    noise_ptr,  # [M, V] float32 out: gumbel(words)
    num_vocab,
    CUDA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < num_vocab
    state = tl.load(state_ptr + row).to(tl.uint32)
    vocab = tl.load(vocab_ptr + cols, mask=mask, other=0).to(tl.uint32)
    words = absorb(state, vocab)
    tl.store(mixed_ptr + row, mix32(state).to(tl.int64))
    tl.store(words_ptr + row * num_vocab + cols, words.to(tl.int64), mask=mask)
    tl.store(noise_ptr + row * num_vocab + cols, gumbel(words, CUDA), mask=mask)


def _triton_draws(
    states: torch.Tensor, vocab: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, v = states.numel(), vocab.numel()
    mixed = torch.full((m,), -1, dtype=torch.int64, device=DEVICE)
    words = torch.full((m, v), -1, dtype=torch.int64, device=DEVICE)
    noise = torch.full((m, v), float("nan"), dtype=torch.float32, device=DEVICE)
    _draw_kernel[(m,)](
        states, vocab, mixed, words, noise, v, CUDA=DEVICE == "cuda", BLOCK=triton.next_power_of_2(v)
    )
    return mixed, words, noise


@triton.jit
def _estimate_error_kernel(error_ptr, CUDA: tl.constexpr, BLOCK: tl.constexpr):
    """Largest |gumbel_estimate - gumbel| over the words (m << 9), for this program's BLOCK values of m."""
    m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    words = m.to(tl.uint32) << 9
    error = tl.abs(gumbel_estimate(words, CUDA) - gumbel(words, CUDA))
    tl.store(error_ptr + tl.program_id(0), tl.max(error, axis=0))


def _assert_noise_close(noise: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.isfinite(noise).all() and torch.isfinite(expected).all()
    error = (noise - expected).abs() / expected.abs().clamp_min(1.0)
    assert error.max().item() <= NOISE_TOL, f"noise differs by {error.max().item():.3g} relative"


def _mix32_inverse(x: int) -> int:
    """Inverse of lowbias32 (C. Wellons), to build states whose word is a chosen value."""
    x ^= x >> 16
    x = (x * 0x43021123) & 0xFFFFFFFF
    x ^= (x >> 15) ^ (x >> 30)
    x = (x * 0x1D69E2A5) & 0xFFFFFFFF
    return x ^ (x >> 16)


@pytest.mark.parametrize("num_vocab", [1, 777], ids=["V1", "V777"])
def test_words_and_noise_match_torch(num_vocab):
    g = torch.Generator().manual_seed(0)
    states = torch.cat([torch.tensor([0, 1, 2**31, 2**32 - 1]), torch.randint(0, 2**32, (9,), generator=g)])
    states, vocab = states.to(DEVICE), torch.arange(num_vocab, device=DEVICE) * 3 + 1
    mixed, words, noise = _triton_draws(states, vocab)

    assert torch.equal(mixed, rng.mix32(states))
    assert torch.equal(words, rng.absorb(states[:, None], vocab[None, :]))
    _assert_noise_close(noise, rng.gumbel(states, vocab))  # [M, V]


def test_extreme_words_give_finite_noise():
    """Words at both ends of the range: u stays inside (0, 1), the noise inside [-2.82, 16.64]."""
    targets = [0, 1, 0x1FF, 0x200, 0x7FFFFFFF, 0xFFFFFDFF, 0xFFFFFE00, 0xFFFFFFFF]
    assert all(rng.mix32(torch.tensor([_mix32_inverse(t)])).item() == t for t in targets)
    # absorb(state, 0) = mix32(state ^ GOLDEN) = target
    states = torch.tensor([_mix32_inverse(t) ^ rng.GOLDEN for t in targets], device=DEVICE)
    vocab = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    _, words, noise = _triton_draws(states, vocab)
    assert words[:, 0].tolist() == targets
    expected = rng.gumbel(states, vocab)
    _assert_noise_close(noise, expected)
    lowest, highest = -math.log(-math.log(2.0**-24)), -math.log(-math.log1p(-(2.0**-24)))
    assert expected.min().item() >= lowest - 1e-4 and expected.max().item() <= highest + 1e-4
    assert expected[0, 0].item() == pytest.approx(lowest, abs=1e-5)
    assert expected[-1, 0].item() == pytest.approx(highest, abs=1e-5)
    # the vocabulary head skips the noise of blocks that cannot win by this margin: it must bound every draw
    assert max(expected.max().item(), noise.max().item()) < _GUMBEL_MAX.value


def test_noise_is_standard_gumbel():
    """Mean Euler's gamma, variance pi^2 / 6 over 2**20 draws (standard errors 1e-3 and 2e-3)."""
    states = torch.randint(0, 2**32, (256,), generator=torch.Generator().manual_seed(1))
    noise = rng.gumbel(states, torch.arange(4096)).double()
    assert noise.mean().item() == pytest.approx(0.5772156649, abs=6e-3)
    assert noise.var().item() == pytest.approx(math.pi**2 / 6, abs=2e-2)


def test_estimate_is_within_its_bound_for_every_word():
    """All 2**23 values of the 23 bits that make u (the low 9 bits of a word do not enter the noise)."""
    block = 4096 if DEVICE == "cuda" else 65536
    errors = torch.full((2**23 // block,), float("nan"), device=DEVICE)
    _estimate_error_kernel[(errors.numel(),)](errors, CUDA=DEVICE == "cuda", BLOCK=block)
    assert torch.isfinite(errors).all()
    assert errors.max().item() <= GUMBEL_ESTIMATE_ERROR.value
