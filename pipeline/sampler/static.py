"""Static batching: the reference's schedule, kept as the baseline and for faithfulness tests.

Rows are taken in batches of `max_batch`; every row of a batch runs each canvas until all rows of the batch
have stopped denoising (a stopped row is frozen, as transformers does), and canvases continue until every
row has met EOS or max_new_tokens. Rows that already ended keep being computed, their canvases replaced by
padding before being encoded, exactly as `DiffusionGemmaForBlockDiffusion.generate` does. Per-row counters
exclude those wasted passes, like the reference's `tokens_per_forward`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pipeline.sampler.engine import DiffusionSampler, Request, Result, finish_reason


def run_static(
    sampler: DiffusionSampler,
    requests: Sequence[Request],
    on_result: Callable[[Result], None] | None,
) -> list[Result]:
    sampler._ensure_storage()
    results: list[Result] = []
    for start in range(0, len(requests), sampler.max_batch):
        results.extend(_run_batch(sampler, requests[start : start + sampler.max_batch], start, on_result))
    return results


def _first_eos(tokens: list[int], eos: set[int]) -> int | None:
    return next((i for i, t in enumerate(tokens) if t in eos), None)


def _run_batch(
    sp: DiffusionSampler,
    batch: Sequence[Request],
    offset: int,
    on_result: Callable[[Result], None] | None,
) -> list[Result]:
    settings, st, dev = sp.settings, sp._state, sp.device
    size, pad = len(batch), settings.pad_token_id
    rows = [sp._new_row(r, offset + i) for i, r in enumerate(batch)]
    slots = torch.arange(size, device=dev)
    st["k0"][:size] = torch.tensor([r.k0 for r in rows], dtype=torch.long, device=dev)
    st["k1"][:size] = torch.tensor([r.k1 for r in rows], dtype=torch.long, device=dev)
    sp._cache.lengths[:size] = 0
    sp._encode(slots, [list(r.prompt_ids) for r in batch], prefix=True)
    cached = max(len(r.prompt_ids) for r in batch)  # the longest row's cached tokens
    finished = [False] * size
    reasons = ["length"] * size

    for canvas in range(settings.max_canvases):
        st["canvas_idx"][:size] = canvas
        sp._start_canvas(slots)
        stopped = torch.zeros(size, dtype=torch.bool, device=dev)
        for i, row in enumerate(rows):
            if row.drafts is not None and not finished[i]:
                row.drafts.append([])
        for _ in range(settings.max_denoising_steps):
            counted = stopped.tolist()
            for i, row in enumerate(rows):
                if not (counted[i] or finished[i]):
                    row.steps_total += 1
            stopped |= sp._denoise(size, live=~stopped, longest=cached)
            if settings.record_drafts:
                argmax = st["argmax"][:size].tolist()
                for i, row in enumerate(rows):
                    if not (counted[i] or finished[i]):
                        row.drafts[-1].append(argmax[i])
            if bool(stopped.all()):
                break

        emitted = st["argmax"][:size].tolist()
        to_encode = []
        for i, row in enumerate(rows):
            canvas_tokens = emitted[i]
            if finished[i]:  # ended in an earlier canvas: the reference pads the whole canvas
                to_encode.append([pad] * len(canvas_tokens))
                continue
            cut = _first_eos(canvas_tokens, sp.eos)
            reason = finish_reason(len(row.tokens), cut, settings.max_new_tokens)
            row.tokens.extend(canvas_tokens if cut is None else canvas_tokens[:cut])
            row.canvas += 1
            keep = sp.stop(row.tokens[: settings.max_new_tokens]) if sp.stop is not None else None
            if keep is not None:  # a stop string: the row ends here, as at an EOS
                row.tokens[keep:] = []
                finished[i], reasons[i] = True, "stop"
            elif cut is not None:
                finished[i], reasons[i] = True, reason
                canvas_tokens = canvas_tokens[: cut + 1] + [pad] * (len(canvas_tokens) - cut - 1)
            to_encode.append(canvas_tokens)
        if all(finished) or canvas == settings.max_canvases - 1:
            break
        sp._encode(slots, to_encode, prefix=True, cached=[cached] * size)
        cached += settings.canvas_length

    results = []
    for i, row in enumerate(rows):
        result = Result(
            row_id=row.request.row_id,
            token_ids=row.tokens[: settings.max_new_tokens],
            finish_reason=reasons[i],
            denoising_steps=row.steps_total,
            canvases=row.canvas,
            drafts=row.drafts,
        )
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
