"""The fused step kernel against step_reference: exact equality over odd shapes, signed zeros, bounds that
fall exactly on a cumulative entropy (where a float32 running sum would flip acceptances), and exact ties.

The reference keeps transformers' unstable torch.sort, so which of several equal entropies straddling the
bound it accepts is unspecified; the kernel takes them in position order. Rows with such ties are compared
with the reference's arithmetic under a stable sort, all other rows with the reference itself."""

import numpy as np
import pytest
import torch

from pipeline.kernels.step import denoise_step
from pipeline.kernels.step.reference import StepOutput, step_reference
from pipeline.kernels.step.triton_step import _step_forward, step_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
POISON = 0xAB  # neither 0 nor 1 in the uint8 flags


def _inputs(batch, length, depth, *, seed=0, device=DEVICE):
    """Entropies like a denoiser's (most near 0, some large), exact ties and both signed zeros in row 0,
    argmax rows that match their history, but for row 0."""
    g = torch.Generator().manual_seed(seed)
    entropy = torch.rand(batch, length, generator=g) ** 4 * 0.08
    entropy[0, : length // 2] = entropy[0, 0]
    if length >= 4:
        entropy[0, 1], entropy[0, 2], entropy[0, 3] = -0.0, 0.0, -0.0
    current, sampled, noise = (torch.randint(0, 1000, (batch, length), generator=g) for _ in range(3))
    argmax = torch.randint(0, 3, (batch, length), generator=g)
    history = argmax[:, None, :].repeat(1, depth, 1)
    if depth:
        history[0, depth - 1, length - 1] += 1
    tensors = (current, sampled, argmax, entropy, noise, history)
    return tuple(t.to(device) for t in tensors)


def _poisoned(batch, length, depth, *, device=DEVICE) -> StepOutput:
    return StepOutput(
        canvas=torch.full((batch, length), -1, dtype=torch.int64, device=device),
        accepted=torch.full((batch, length), POISON, dtype=torch.uint8, device=device),
        stable=torch.full((batch,), POISON, dtype=torch.uint8, device=device),
        confident=torch.full((batch,), POISON, dtype=torch.uint8, device=device),
        history=torch.full((batch, depth, length), -1, dtype=torch.int64, device=device),
    )


def _assert_equal(out: StepOutput, ref: StepOutput) -> None:
    assert torch.equal(out.canvas, ref.canvas)
    for name in ("accepted", "stable", "confident"):
        got, want = getattr(out, name), getattr(ref, name)
        assert torch.equal(got.view(torch.uint8), want.to(torch.uint8)), name
    assert torch.equal(out.history, ref.history)


def _reference_ties_in_position_order(
    current, sampled, argmax, entropy, noise, history, **kwargs
) -> StepOutput:
    """step_reference, with the acceptance of entropy_bound_accept computed under a stable sort."""
    ref = step_reference(current, sampled, argmax, entropy, noise, history, **kwargs)
    ordered, order = torch.sort(entropy, dim=-1, stable=True)
    selected = torch.cumsum(ordered, dim=-1) - ordered <= kwargs["entropy_bound"]
    accepted = torch.scatter(torch.zeros_like(selected), dim=-1, index=order, src=selected)
    return StepOutput(
        canvas=torch.where(accepted, sampled, noise),
        accepted=accepted,
        stable=ref.stable,
        confident=ref.confident,
        history=ref.history,
    )


SHAPES = {
    "B3-L63-S1": (3, 63, 1),
    "B2-L512-S3": (2, 512, 3),
    "B4-L1-S0": (4, 1, 0),
    "B5-L100-S2": (5, 100, 2),
}


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_matches_reference(shape):
    batch, length, depth = SHAPES[shape]
    current, sampled, argmax, entropy, noise, history = _inputs(batch, length, depth)
    kwargs = dict(entropy_bound=0.1, confidence_threshold=0.01)
    out = _poisoned(batch, length, depth)
    _step_forward(sampled, argmax, entropy, noise, history, out, **kwargs)
    expected = _reference_ties_in_position_order(current, sampled, argmax, entropy, noise, history, **kwargs)
    _assert_equal(out, expected)
    # rows 1.. have no exact ties: there the reference itself must agree
    ref = step_reference(current, sampled, argmax, entropy, noise, history, **kwargs)
    _assert_equal(_rows(out, slice(1, None)), _rows(ref, slice(1, None)))
    # the cases are not trivial: some rows accept part of the canvas, row 0 alone is unstable
    assert 0 < ref.accepted.sum() < ref.accepted.numel() or length == 1
    assert depth == 0 or ref.stable.tolist() == [False] + [True] * (batch - 1)


def _rows(out: StepOutput, rows: slice, device=DEVICE) -> StepOutput:
    names = ("canvas", "accepted", "stable", "confident", "history")
    return StepOutput(**{name: getattr(out, name)[rows].to(device) for name in names})


def test_ties_straddling_the_bound_follow_position_order():
    """Twenty equal entropies of 0.03 under a bound of 0.1: the first four positions (cumulative sums before
    them 0, 0.03, 0.06, 0.09) are accepted, the others are not."""
    length = 40
    entropy = torch.full((1, length), 0.5, device=DEVICE)
    positions = torch.arange(3, 40, 2, device=DEVICE)[:20]
    entropy[0, positions] = 0.03
    zeros = torch.zeros(1, length, dtype=torch.int64, device=DEVICE)
    history = torch.zeros(1, 0, length, dtype=torch.int64, device=DEVICE)
    args = (zeros, zeros + 1, zeros, entropy, zeros + 2, history)
    out = step_triton(*args, entropy_bound=0.1, confidence_threshold=0.01)
    _assert_equal(out, _reference_ties_in_position_order(*args, entropy_bound=0.1, confidence_threshold=0.01))
    assert out.accepted[0].nonzero().flatten().tolist() == positions[:4].tolist()
    # the reference accepts four of the tied positions too, whichever its sort puts first
    ref = step_reference(*args, entropy_bound=0.1, confidence_threshold=0.01)
    accepted = set(ref.accepted[0].nonzero().flatten().tolist())
    assert len(accepted) == 4 and accepted <= set(positions.tolist())
    assert out.history is history


def test_bounds_on_a_cumulative_sum_match_the_reference():
    """entropy_bound equal to the float32 cumulative sum before the k-th smallest entropy: exactly at the
    boundary. The kernel must agree with torch (float64 running sum on CPU); a float32 running sum does not
    always, which this test checks it can detect."""
    length, flips_float32 = 128, 0
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        base = torch.rand(length, generator=g) ** 3 * 0.02
        entropy = torch.stack([base, base[torch.randperm(length, generator=g)]])  # [2, L], same sorted order
        ordered = torch.sort(base).values
        k = int(torch.randint(length // 4, length, (1,), generator=g))
        bound = float(torch.cumsum(ordered, 0)[k] - ordered[k])
        zeros = torch.zeros(2, length, dtype=torch.int64)
        args = [zeros, zeros + 1, zeros, entropy, zeros + 2, torch.zeros(2, 0, length, dtype=torch.int64)]
        ref = step_reference(*args, entropy_bound=bound, confidence_threshold=0.01)
        args = [a.to(DEVICE) for a in args]
        out = step_triton(*args, entropy_bound=bound, confidence_threshold=0.01)
        _assert_equal(out, _rows(ref, slice(None), device=DEVICE))
        running32 = np.cumsum(ordered.numpy(), dtype=np.float32)
        accepted32 = int(((running32 - ordered.numpy()) <= np.float32(bound)).sum())
        flips_float32 += accepted32 != int(ref.accepted[0].sum())
    assert flips_float32 > 0


def test_dispatcher_uses_the_kernel_and_falls_back_with_frozen():
    current, sampled, argmax, entropy, noise, history = _inputs(3, 63, 1, seed=5)
    args = (current, sampled, argmax, entropy, noise, history)
    kwargs = dict(entropy_bound=0.1, confidence_threshold=0.01)
    expected = _reference_ties_in_position_order(*args, **kwargs)
    _assert_equal(denoise_step(*args, backend="triton", **kwargs), expected)
    frozen = torch.zeros_like(current, dtype=torch.bool)
    frozen[:, ::3] = True
    out = denoise_step(*args, backend="triton", frozen=frozen, **kwargs)
    ref = step_reference(*args, frozen=frozen, **kwargs)  # the ablation has no kernel: the reference itself
    _assert_equal(out, ref)
    assert torch.equal(out.frozen, ref.frozen)


def test_rejects_bad_inputs():
    current, sampled, argmax, entropy, noise, history = _inputs(2, 8, 1)
    kwargs = dict(entropy_bound=0.1, confidence_threshold=0.01)
    with pytest.raises(ValueError, match="entropy must be float32; got torch.float64"):
        step_triton(current, sampled, argmax, entropy.double(), noise, history, **kwargs)
    with pytest.raises(ValueError, match=r"noise must be \[B, L\]=\(2, 8\); got \(2, 7\)"):
        step_triton(current, sampled, argmax, entropy, noise[:, :7], history, **kwargs)
    with pytest.raises(ValueError, match=r"history must be int64 \[B, S, L\].*\(2, 8\)"):
        step_triton(current, sampled, argmax, entropy, noise, history[:, 0], **kwargs)
    long = torch.zeros(1, 4097, dtype=torch.int64)
    with pytest.raises(ValueError, match="canvas length 4097"):
        step_triton(long, long, long, long.float(), long, long[:, None], **kwargs)


@pytest.mark.gpu
@requires_cuda
def test_real_shape_matches_reference():
    """32 canvases of 512 positions with a history of 1, on the GPU."""
    current, sampled, argmax, entropy, noise, history = _inputs(32, 512, 1, device="cuda")
    kwargs = dict(entropy_bound=0.1, confidence_threshold=0.005)
    args = (current, sampled, argmax, entropy, noise, history)
    out = step_triton(*args, **kwargs)
    _assert_equal(out, _reference_ties_in_position_order(*args, **kwargs))
    _assert_equal(_rows(out, slice(1, None)), _rows(step_reference(*args, **kwargs), slice(1, None)))
