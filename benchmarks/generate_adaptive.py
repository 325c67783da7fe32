"""The adaptive part of bench_generate.py: adaptive stopping with static vs continuous batching on a workload
whose rows stop at different times, reported as decoder row-passes computed per generated token.

A model with random weights never stops on its own: its canvas is never stable (each pass moves the argmax of
every position) nor confident. Two knobs make it stop, and make the stopping heterogeneous, whatever the
shape:

- Steps per canvas. Each layer adds its sublayers' outputs, post-normed, to the residual stream; scaling the
  post-norms' weights by `beta` sets how far the layers move a position away from its input token. At
  beta = 0 the model is the identity (the tied embedding maps each token to itself: stable and confident at
  the second pass); at beta = 1 it is the random model (16 passes, never stopped). `calibrate` searches beta
  so that a canvas stops after about half of `max_denoising_steps`; rows then stop a few steps apart. The
  final norm is scaled so that the identity's own-token logit is 60 before soft-capping, at any hidden size.
- Canvases per row. Random weights emit tokens about uniformly over the vocabulary, so declaring the first
  `k` ids end-of-sequence tokens ends a canvas with probability 1 - (1 - k / V) ** L; `eos_ids` picks k for
  a probability of 1/2, so rows end after 1, 2, 3, ... canvases (up to `canvases`), as real completions
  end at different lengths.

Static batching runs every row of a batch until its slowest row ends (the reference's schedule); continuous
batching refills a slot as soon as its row leaves. Both run the same rows on the same sampler settings;
continuous runs once first to capture its CUDA graphs (every bucket the draining batch passes through).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

TARGET_STOP = 0.5  # calibrate: a canvas stops after about this fraction of max_denoising_steps


class Peaking:
    """Scales the decoder's post-norms by `beta` and its final norm so the identity's own-token logit is 60;
    `restore` puts the random model back."""

    def __init__(self, model) -> None:
        decoder = model.model.decoder
        self.post = [
            norm
            for layer in decoder.layers
            for norm in (layer.post_attention_layernorm, layer.post_feedforward_layernorm)
        ]
        self.final = decoder.norm
        self.saved = [n.weight.detach().clone() for n in [*self.post, self.final]]
        embedding = decoder.embed_tokens.weight.float()
        # final norm: h = scale * x / rms(x); at the identity x is e_c, so h . e_c = scale * D * rms(e_c)
        rms = embedding.pow(2).mean().sqrt().item()
        self.final_scale = 60.0 / (embedding.shape[1] * rms)
        self.beta: float | None = None

    @torch.no_grad()
    def set(self, beta: float) -> None:
        for norm, weight in zip(self.post, self.saved[:-1], strict=True):
            norm.weight.copy_(weight * beta)
        self.final.weight.copy_(self.saved[-1] * self.final_scale)
        self.beta = beta

    @torch.no_grad()
    def restore(self) -> None:
        for norm, weight in zip([*self.post, self.final], self.saved, strict=True):
            norm.weight.copy_(weight)
        self.beta = None


def eos_ids(vocab: int, canvas: int, p_end: float = 0.5) -> tuple[int, ...]:
    """The ids 1..k with 1 - (1 - k / vocab) ** canvas = p_end (id 0 stays the padding)."""
    k = max(1, round(vocab * (1 - (1 - p_end) ** (1 / canvas))))
    return tuple(range(1, k + 1))


def calibrate(
    peaking: Peaking, mean_steps: Callable[[], float], steps: int, log: Callable[[str], None]
) -> float:
    """beta whose canvases stop after about TARGET_STOP * steps passes: doubling from 1 to bracket the target,
    then four bisections in log space. `mean_steps()` runs a few rows and returns their mean steps per canvas."""
    target = TARGET_STOP * steps
    tried: dict[float, float] = {}

    def probe(beta: float) -> float:
        peaking.set(beta)
        tried[beta] = mean_steps()
        log(f"  calibration: beta {beta:.4g} -> {tried[beta]:.1f} steps per canvas")
        return tried[beta]

    lo, hi = None, None
    beta = 1.0
    for _ in range(8):
        if probe(beta) < target:
            lo, beta = beta, beta * 2
        else:
            hi, beta = beta, beta / 2
        if lo is not None and hi is not None:
            break
    if lo is None or hi is None:  # never bracketed: take the closest
        return min(tried, key=lambda b: abs(tried[b] - target))
    for _ in range(4):
        mid = math.sqrt(lo * hi)
        if probe(mid) < target:
            lo = mid
        else:
            hi = mid
    return min(tried, key=lambda b: abs(tried[b] - target))


def run_adaptive(
    model, native, args, make_sampler: Callable[..., Any], timed: Callable, log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Calibrates the workload, runs it static then continuous; returns the records."""
    from pipeline.sampler.engine import Request

    vocab, canvas = native.vocab_size, native.canvas_length
    eos = eos_ids(vocab, canvas)
    slots = min(max(args.batches), args.adaptive_rows)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(vocab // 2, vocab, (args.adaptive_rows, args.prompt), generator=gen)
    requests = [Request(f"a{i}", row.tolist()) for i, row in enumerate(prompts)]
    knobs = dict(adaptive=True, eos=eos, canvases=args.adaptive_canvases)

    peaking = Peaking(model)
    started = time.perf_counter()
    probe_rows = requests[: min(8, len(requests))]
    # calibration counts steps per canvas on one canvas per row (no EOS: every row runs to its stop)
    probe_sampler = make_sampler(len(probe_rows), adaptive=True, eos=(), canvases=1)

    def mean_steps() -> float:
        results = probe_sampler.generate(probe_rows, batching="static")
        return sum(r.denoising_steps for r in results) / len(results)

    try:
        beta = calibrate(peaking, mean_steps, args.steps, log)
        peaking.set(beta)
        probe_sampler = None  # its KV cache goes before the workload's
        log(
            f"adaptive stopping: {len(requests)} rows of up to {args.adaptive_canvases} canvases, {slots} slots; "
            f"beta {beta:.4g} (calibrated in {time.perf_counter() - started:.0f}s), {len(eos)} EOS ids "
            f"(P(EOS in a canvas) = 1/2)"
        )
        sampler = make_sampler(slots, **knobs)
        sampler.generate(requests, batching="continuous")  # warm-up: CUDA graphs of every bucket
        log(
            f"  {'batching':<11}{'tok/s':>9}{'passes/token':>14}{'computed':>10}{'needed':>8}  canvases  steps/canvas"
        )
        records = []
        for batching in ("static", "continuous"):
            sampler.stats.decoder_row_steps = 0
            results, wall, _ = timed(lambda m=batching: sampler.generate(requests, batching=m), args.device)
            tokens = sum(len(r.token_ids) for r in results)
            computed = sampler.stats.decoder_row_steps
            needed = sum(r.denoising_steps for r in results)
            canvases = [r.canvases for r in results]
            per_canvas = [r.denoising_steps / r.canvases for r in results]
            log(
                f"  {batching:<11}{tokens / wall:>9.1f}{computed / max(tokens, 1):>14.4f}{computed:>10}{needed:>8}"
                f"  {min(canvases)}-{max(canvases)} (mean {sum(canvases) / len(canvases):.2f})"
                f"  {min(per_canvas):.1f}-{max(per_canvas):.1f} (mean {sum(per_canvas) / len(per_canvas):.1f})"
            )
            records.append(
                {
                    "bench": "generate-adaptive",
                    "shape": args.shape,
                    "batching": batching,
                    "rows": len(requests),
                    "slots": slots,
                    "max_canvases": args.adaptive_canvases,
                    "beta": beta,
                    "eos_ids": len(eos),
                    "tokens": tokens,
                    "tokens_per_s": tokens / wall,
                    "row_passes_computed": computed,
                    "row_passes_needed": needed,
                    "passes_per_token": computed / max(tokens, 1),
                    "canvases_min": min(canvases),
                    "canvases_max": max(canvases),
                    "canvases_mean": sum(canvases) / len(canvases),
                    "steps_per_canvas_min": min(per_canvas),
                    "steps_per_canvas_max": max(per_canvas),
                    "steps_per_canvas_mean": sum(per_canvas) / len(per_canvas),
                }
            )
        static, continuous = (r["passes_per_token"] for r in records)
        log(
            f"  continuous batching computes {static / continuous:.2f}x fewer row-passes per token than static"
        )
        return records
    finally:
        peaking.restore()
