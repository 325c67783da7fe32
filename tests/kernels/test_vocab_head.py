"""The Triton vocabulary head against vocab_head_reference: small odd shapes on any device (the interpreter on
CPU), the real DiffusionGemma shape on a GPU.

Tolerances: entropy within one unit in the last place of the row's largest |z| (+1e-6) of its exact value
and two of the reference's; soft float32 1e-5 + 1e-4 relative; soft bf16 within two units in the last place
of the reference and no further from the exact value than the reference is. Tokens are equal except where the
reference's own top two scores are within rounding of each other (near ties): those are counted, and must be
rare (none at all in the small cases).
"""

import pytest
import torch

from pipeline.kernels import rng
from pipeline.kernels.vocab_head import vocab_head
from pipeline.kernels.vocab_head.reference import HeadOutput, softcap_logits, vocab_head_reference
from pipeline.kernels.vocab_head.triton_head import (
    _default_vocab_chunk,
    _vocab_head_forward,
    vocab_head_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
# rows not a multiple of anything, vocabulary not a power of two, D not a multiple of 64
N, V, D = 37, 1000, 72
# (vocabulary chunk, block): "chunked" = 3 chunks of 384/384/232 tokens in blocks of 256 (partial blocks and a
# partial chunk, statistics carried across chunks); "one-chunk" = the default, here one partial block of 1024.
LAYOUTS = {"chunked": (384, 256), "one-chunk": (None, None)}


def _inputs(num, vocab, dim, dtype, *, scale=5.0, seed=0, device=DEVICE):
    """hidden [N, D], embedding [V, D] (logits of standard deviation `scale`), temperature [N], states [N]."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num, dim, generator=g)
    embedding = torch.randn(vocab, dim, generator=g) * (scale / dim**0.5)
    temperature = 0.4 + 0.4 * torch.rand(num, generator=g)
    state = torch.randint(0, 2**32, (num,), generator=g)
    return hidden.to(device, dtype), embedding.to(device, dtype), temperature.to(device), state.to(device)


def _poisoned(num, dim, dtype, *, sample, soft, device=DEVICE) -> HeadOutput:
    return HeadOutput(
        argmax=torch.full((num,), -1, dtype=torch.int64, device=device),
        entropy=torch.full((num,), float("nan"), device=device),
        sampled=torch.full((num,), -1, dtype=torch.int64, device=device) if sample else None,
        soft=torch.full((num, dim), float("nan"), dtype=dtype, device=device) if soft else None,
    )


def _token_mismatches(got, want, scores_of, tolerance):
    """Rows whose tokens differ, each of which must be a near tie of the reference's scores: their count."""
    rows = (got != want).nonzero().flatten().tolist()
    for row in rows:
        scores = scores_of(row)  # [V] float32, the reference's z (or z + noise) of this row
        a, b = scores[got[row]].item(), scores[want[row]].item()
        assert abs(a - b) <= tolerance(b), f"row {row}: {got[row]} ({a}) vs {want[row]} ({b}) is no tie"
    return len(rows)


def _near_tie_tolerance(dtype):
    """How far two scores may be and still be a tie that rounding can break either way."""
    if dtype == torch.float32:
        return lambda score: 1e-5 * max(1.0, abs(score))
    # bf16 logits: one unit in the last place (2**-7 relative) may differ with the summation order
    return lambda score: 2.0**-7 * max(1.0, abs(score)) + 1e-5


def _exact(hidden, embedding, softcap, temperature, rows=256):
    """Entropy [N] and soft input [N, D] of the float32 z in float64 (float32 on a GPU: plenty at bf16, and
    the real shape's E would take 6 GB in float64), and a unit in the last place of each row's largest |z|
    [N]. Both implementations' entropies are within about half such a unit (measured)."""
    precision = torch.float64 if hidden.device.type == "cpu" else torch.float32
    table = embedding.to(precision)
    entropy, soft, unit = [], [], []
    for lo in range(0, hidden.shape[0], rows):
        z = softcap_logits(hidden[lo : lo + rows], embedding, softcap) / temperature[lo : lo + rows, None]
        entropy.append(torch.distributions.Categorical(logits=z.double()).entropy())
        soft.append(z.to(embedding.dtype).to(precision).softmax(dim=-1) @ table)  # the reference rounds z
        unit.append(2.0**-23 * z.abs().amax(dim=-1).double())
    return torch.cat(entropy), torch.cat(soft).double(), torch.cat(unit)


def _compare(out, ref, hidden, embedding, softcap, temperature, state, *, max_ties, entropy=True):
    """Asserts `out` equals `ref` within the stated tolerances; returns the near ties (argmax, sampled)."""
    exact_entropy, exact_soft, unit = _exact(hidden, embedding, softcap, temperature)
    if entropy:
        assert ((out.entropy.double() - exact_entropy).abs() <= unit + 1e-6).all()
        assert ((out.entropy.double() - ref.entropy.double()).abs() <= 2 * unit + 1e-6).all()
    vocab_ids = torch.arange(embedding.shape[0], device=hidden.device)

    def z_of(row):
        return (softcap_logits(hidden[row : row + 1], embedding, softcap) / temperature[row])[0]

    def y_of(row):
        return z_of(row) + rng.gumbel(state[row : row + 1], vocab_ids)[0]

    ties = [0, 0]
    pairs = ((out.argmax, ref.argmax, z_of), (out.sampled, ref.sampled, y_of))
    for k, (got, want, scores_of) in enumerate(pairs):
        if want is None:
            assert got is None
            continue
        tolerance = _near_tie_tolerance(embedding.dtype)
        ties[k] = _token_mismatches(got.cpu(), want.cpu(), scores_of, tolerance)
        assert ties[k] <= max_ties, f"{ties[k]} near ties in {got.numel()} rows"
    if ref.soft is None:
        assert out.soft is None
    elif embedding.dtype == torch.float32:
        torch.testing.assert_close(out.soft, ref.soft, atol=1e-5, rtol=1e-4)
    else:
        assert out.soft.dtype == embedding.dtype
        torch.testing.assert_close(out.soft.float(), ref.soft.float(), atol=2.0**-7, rtol=2.0**-6)
        ours = (out.soft.double() - exact_soft).abs().max()
        theirs = (ref.soft.double() - exact_soft).abs().max()
        assert ours <= 1.25 * theirs + 1e-6, f"soft error {ours:.3g} vs the reference's {theirs:.3g}"
    return ties


CASES = {
    # id: (dtype, softcap, logit scale, temperature factor, sample, soft, layout)
    "f32-softcap30-sample-soft-chunked": ("f32", 30.0, 5.0, 1.0, True, True, "chunked"),
    "bf16-softcap30-sample-soft-chunked": ("bf16", 30.0, 5.0, 1.0, True, True, "chunked"),
    # temperatures 0.04-0.08: confident rows (mean entropy 0.08), where about half the blocks skip the noise
    "bf16-softcap30-cold-sample-soft-chunked": ("bf16", 30.0, 5.0, 0.1, True, True, "chunked"),
    "f32-softcap30-stats-only-chunked": ("f32", 30.0, 5.0, 1.0, False, False, "chunked"),
    "f32-nocap-sample-soft-one-chunk": ("f32", None, 5.0, 1.0, True, True, "one-chunk"),
    "bf16-nocap-sample-soft-one-chunk": ("bf16", None, 5.0, 1.0, True, True, "one-chunk"),
    "bf16-softcap30-sample-only-one-chunk": ("bf16", 30.0, 5.0, 1.0, True, False, "one-chunk"),
}


def _blocks_without_exact_noise(z, noise, chunk, block):
    """Replays the kernel's scan: (row, block) pairs skipped by the noise bound, and those left out by the
    noise estimate (approximated here by the exact noise, which is within 1e-4 of it)."""
    by_bound = by_estimate = 0
    for row in range(z.shape[0]):
        best = float("-inf")
        for lo in range(0, z.shape[1], chunk):
            for start in range(lo, min(z.shape[1], lo + chunk), block):
                stop = min(start + block, lo + chunk, z.shape[1])
                y_max = (z[row, start:stop] + noise[row, start:stop]).max().item()
                if z[row, start:stop].max().item() + 16.7 < best:
                    by_bound += 1
                elif y_max < best - 0.01:
                    by_estimate += 1
                else:
                    best = max(best, y_max)
    return by_bound, by_estimate


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_matches_reference(case):
    dtype_name, softcap, scale, cold, sample, soft, layout = CASES[case]
    dtype = DTYPES[dtype_name]
    hidden, embedding, temperature, state = _inputs(N, V, D, dtype, scale=scale)
    temperature = temperature * cold
    state = state if sample else None
    ref = vocab_head_reference(
        hidden, embedding, softcap=softcap, temperature=temperature, sample_state=state, want_soft=soft
    )
    out = _poisoned(N, D, dtype, sample=sample, soft=soft)
    chunk, block = LAYOUTS[layout]
    _vocab_head_forward(hidden, embedding, softcap, temperature, state, out, vocab_chunk=chunk, block_v=block)
    assert (out.argmax >= 0).all() and torch.isfinite(out.entropy).all()
    if sample:
        assert (out.sampled >= 0).all()
    if soft:
        assert torch.isfinite(out.soft).all()
    _compare(out, ref, hidden, embedding, softcap, temperature, state, max_ties=0)
    if sample and layout == "chunked":  # both shortcuts of the sampling are taken in these cases
        z = softcap_logits(hidden, embedding, softcap) / temperature[:, None]
        noise = rng.gumbel(state, torch.arange(V, device=hidden.device))
        by_bound, by_estimate = _blocks_without_exact_noise(z.cpu(), noise.cpu(), chunk, block)
        assert by_estimate > 0 and (by_bound > 0 or cold == 1.0)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=list(DTYPES))
@pytest.mark.parametrize("huge", [False, True], ids=["argmax-ties", "argmax-and-sample-ties"])
def test_exact_ties_go_to_the_first_index(dtype, huge):
    """Five tokens with identical embeddings are the maximum of every row: in one block (5, 6), a later block
    (300) and later chunks (700, 999). The logits are exact integers, so the ties are exact whatever the
    summation order. With logits of 2**30 even z + noise ties (the noise is below half a unit in the last
    place), so the sample is the first of them too and the entropy is log 5; the reference's own entropy is
    lost to rounding there (its logsumexp rounds to the max), so it is not compared."""
    hot = [5, 6, 300, 700, 999]
    num = 13
    hidden, embedding, temperature, state = _inputs(num, V, D, dtype, scale=2.0, seed=3)
    hidden, embedding = hidden.float(), embedding.float()
    value = 2.0**15 if huge else 8.0
    hidden[:, 0] = value
    embedding[:, 0] = 0.0
    embedding[hot] = 0.0
    embedding[hot, 0] = value if huge else 4.0
    hidden, embedding = hidden.to(dtype), embedding.to(dtype)
    softcap = None if huge else 30.0
    ref = vocab_head_reference(
        hidden, embedding, softcap=softcap, temperature=temperature, sample_state=state, want_soft=True
    )
    out = _poisoned(num, D, dtype, sample=True, soft=True)
    chunk, block = LAYOUTS["chunked"]
    _vocab_head_forward(hidden, embedding, softcap, temperature, state, out, vocab_chunk=chunk, block_v=block)
    assert (ref.argmax == hot[0]).all() and (out.argmax == hot[0]).all()
    if huge:
        assert (ref.sampled == hot[0]).all() and (out.sampled == hot[0]).all()
        torch.testing.assert_close(out.entropy, torch.full_like(out.entropy, 5.0).log(), atol=1e-6, rtol=1e-6)
    _compare(out, ref, hidden, embedding, softcap, temperature, state, max_ties=0, entropy=not huge)


def test_dispatcher_and_public_function():
    hidden, embedding, temperature, state = _inputs(N, V, D, torch.float32)
    kwargs = dict(softcap=30.0, temperature=temperature, sample_state=state, want_soft=True)
    ref = vocab_head_reference(hidden, embedding, **kwargs)
    out = vocab_head(hidden, embedding, backend="triton", **kwargs)
    _compare(out, ref, hidden, embedding, 30.0, temperature, state, max_ties=0)
    empty = vocab_head_triton(
        hidden[:0], embedding, softcap=30.0, temperature=temperature[:0], want_soft=True
    )
    assert empty.argmax.shape == (0,) and empty.soft.shape == (0, D) and empty.sampled is None


def test_rejects_bad_inputs():
    hidden, embedding, temperature, state = _inputs(4, 10, 8, torch.float32)
    with pytest.raises(ValueError, match=r"\(4, 8\) and \(10, 7\)"):
        vocab_head_triton(hidden, embedding[:, :7], softcap=None, temperature=temperature)
    with pytest.raises(ValueError, match="torch.float32 and torch.bfloat16"):
        vocab_head_triton(hidden, embedding.bfloat16(), softcap=None, temperature=temperature)
    with pytest.raises(ValueError, match="torch.float64"):
        vocab_head_triton(hidden, embedding, softcap=None, temperature=temperature.double())
    with pytest.raises(ValueError, match=r"torch.int32 \(4,\)"):
        vocab_head_triton(hidden, embedding, softcap=None, temperature=temperature, sample_state=state.int())
    with pytest.raises(ValueError, match="vocab_chunk=0"):
        vocab_head_triton(hidden, embedding, softcap=None, temperature=temperature, vocab_chunk=0)


def test_default_chunk_bounds_memory():
    assert _default_vocab_chunk(8192) == 16384  # [8192, 16384] bf16 logits: 256 MiB
    assert _default_vocab_chunk(2048) == 65536
    assert _default_vocab_chunk(37) == 2**21  # capped at V by the caller
    assert _default_vocab_chunk(10**6) == 2048
    for num in (1, 37, 256, 5000, 8192, 65536):
        assert num * _default_vocab_chunk(num) <= max(2**27, num * 2048)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("num", [256, 2048, 8192], ids=lambda n: f"N{n}")
def test_real_shape_matches_reference(num):
    """DiffusionGemma 26B-A4B: V = 262,144, D = 2,816, bf16; extra memory of the fused path under 2 GiB."""
    vocab, dim = 262144, 2816
    hidden, embedding, temperature, state = _inputs(num, vocab, dim, torch.bfloat16, scale=5.0, device="cuda")
    kwargs = dict(softcap=30.0, temperature=temperature, sample_state=state, want_soft=True)
    ref = vocab_head_reference(hidden, embedding, **kwargs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = vocab_head_triton(hidden, embedding, **kwargs)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 2 * 2**30, f"extra memory {extra / 2**30:.2f} GiB"
    ties = _compare(out, ref, hidden, embedding, 30.0, temperature, state, max_ties=max(1, num // 1000))
    print(f"N={num}: near ties argmax {ties[0]}, sampled {ties[1]}; extra memory {extra / 2**20:.0f} MiB")
