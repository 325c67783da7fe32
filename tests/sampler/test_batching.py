"""Continuous batching and batch invariance: a row's completion depends only on (seed, row id, prompt)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion

from pipeline.models.diffusion_gemma import DiffusionGemmaTextModel
from pipeline.sampler.engine import DiffusionSampler, Request
from pipeline.sampler.settings import SamplerSettings
from tests.support.models import build_checkpoint, sampler_settings

LENGTH = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("batching") / "m", canvas_length=LENGTH, sharpness=12.0)
    return DiffusionGemmaTextModel(DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval())


@pytest.fixture(scope="module")
def requests_():
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(20):
        n = int(torch.randint(1, 30, (1,), generator=gen))
        out.append(Request(f"row-{i}", torch.randint(7, 128, (n,), generator=gen).tolist()))
    return out


def _settings(**overrides) -> SamplerSettings:
    return sampler_settings(LENGTH, **overrides)


def _run(model, requests, *, batch, batching="continuous", **overrides):
    sampler = DiffusionSampler(
        model, _settings(**overrides), max_batch=batch, max_prompt_tokens=32, backend="torch"
    )
    results = sampler.generate(requests, batching=batching)
    return {r.row_id: (r.token_ids, r.denoising_steps, r.canvases, r.finish_reason) for r in results}, sampler


def test_outputs_do_not_depend_on_batching(model, requests_):
    baseline, _ = _run(model, requests_, batch=8)
    variants = {
        "batch 1": _run(model, requests_, batch=1)[0],
        "batch 3": _run(model, requests_, batch=3)[0],
        "batch 5, reversed": _run(model, list(reversed(requests_)), batch=5)[0],
        "static batch 8": _run(model, requests_, batch=8, batching="static")[0],
        "static batch 20, reversed": _run(model, list(reversed(requests_)), batch=20, batching="static")[0],
    }
    for name, outputs in variants.items():
        changed = [rid for rid in baseline if outputs[rid] != baseline[rid]]
        assert not changed, f"{name}: rows {changed} differ"
    reasons = {v[3] for v in baseline.values()}
    assert reasons == {"eos", "length"}, "the workload mixes rows ending by EOS and by length"


def test_continuous_batching_computes_fewer_row_steps(model, requests_):
    _, continuous = _run(model, requests_, batch=8)
    outputs, static = _run(model, requests_, batch=8, batching="static")
    spent = sum(v[1] for v in outputs.values())
    assert continuous.stats.decoder_row_steps == spent, "continuous batching computes exactly what rows need"
    assert static.stats.decoder_row_steps > spent


def test_results_are_in_request_order_and_report_counters(model, requests_):
    sampler = DiffusionSampler(model, _settings(), max_batch=4, max_prompt_tokens=32, backend="torch")
    seen = []
    results = sampler.generate(requests_, on_result=lambda r: seen.append(r.row_id))
    assert [r.row_id for r in results] == [r.row_id for r in requests_]
    assert sorted(seen) == sorted(r.row_id for r in requests_)
    for r in results:
        assert 1 <= r.canvases <= 4
        assert r.canvases <= r.denoising_steps <= 12 * r.canvases
        assert len(r.token_ids) <= 4 * LENGTH
        assert 1 not in r.token_ids, "EOS is not part of the completion"


def test_max_new_tokens_not_a_multiple_of_the_canvas(model, requests_):
    outputs, _ = _run(model, requests_[:6], batch=4, max_new_tokens=LENGTH + 5)
    for tokens, _, canvases, reason in outputs.values():
        assert len(tokens) <= LENGTH + 5 and canvases <= 2
        if reason == "length":
            assert len(tokens) == LENGTH + 5


def test_drafts_and_no_revision_ablation(model, requests_):
    sampler = DiffusionSampler(
        model,
        _settings(record_drafts=True, revise_accepted=False),
        max_batch=4,
        max_prompt_tokens=32,
        backend="torch",
    )
    results = sampler.generate(requests_[:5])
    for r in results:
        assert len(r.drafts) == r.canvases
        assert sum(len(c) for c in r.drafts) == r.denoising_steps
        assert all(len(step) == LENGTH for canvas in r.drafts for step in canvas)
        last = r.drafts[0][-1]  # the emitted first canvas is the last draft of that canvas
        cut = next((i for i, t in enumerate(last) if t == 1), None)
        assert r.token_ids[: len(last[:cut])] == last[:cut]


def test_prompt_outside_the_cache_budget_is_rejected(model):
    sampler = DiffusionSampler(model, _settings(), max_batch=2, max_prompt_tokens=8, backend="torch")
    with pytest.raises(ValueError, match="row 'long'.*9 tokens.*max_prompt_tokens=8"):
        sampler.generate([Request("long", list(range(5, 14)))])
    with pytest.raises(ValueError, match="between 1 and"):
        sampler.generate([Request("empty", [])])


def test_a_canvas_and_a_long_prompt_encoded_together_fit_the_cache(model):
    """A row going on to its next canvas and a prompt of max_prompt_tokens (over two canvases long) admitted
    in the same refill: each is encoded at its own width; the canvas padded to the prompt's width would run
    past the slot's capacity (prompt budget + canvases)."""
    gen = torch.Generator().manual_seed(3)
    rows = [
        Request(f"long-{i}", torch.randint(7, 128, (3 * LENGTH,), generator=gen).tolist()) for i in range(3)
    ]

    def run(batch, eos):
        settings = _settings(max_new_tokens=2 * LENGTH, adaptive_stopping=False, eos_token_ids=eos)
        sampler = DiffusionSampler(
            model, settings, max_batch=batch, max_prompt_tokens=3 * LENGTH, backend="torch"
        )
        results = sampler.generate(rows)
        return [(r.token_ids, r.canvases, r.finish_reason) for r in results], sampler

    alone, _ = run(1, (1,))
    first = [tokens[:LENGTH] for tokens, _, _ in alone]
    eos = next(t for t in first[0] if t not in first[1] and t not in first[2])
    # rows 0 and 1 run in lockstep; row 0 ends with its first canvas, row 1 goes on as row 2 comes in
    together, sampler = run(2, (eos,))
    assert together == run(1, (eos,))[0]
    assert [r[1:] for r in together] == [(1, "eos"), (2, "length"), (2, "length")]
    assert (
        sampler.stats.encoder_calls == 4
    )  # rows 0-1's prompts; row 1's canvas, row 2's prompt; row 2's canvas


@pytest.mark.parametrize("seed", [0, 1, 5, 41])  # 5 and 41 mixed a canvas with a long prompt in one encode
def test_random_workloads_do_not_depend_on_batching(model, seed):
    """Random prompt budgets (some over two canvases), prompt lengths, EOS sets, lengths, step counts and
    stopping knobs: continuous batching at a random slot count and static batching give each row the
    completion it gets alone, within max_new_tokens and without its EOS."""
    r = random.Random(seed)
    budget = r.choice([8, 33, 48, 64])
    rows = [
        Request(f"s{seed}-{i}", [r.randint(7, 127) for _ in range(r.randint(1, budget))])
        for i in range(r.randint(4, 9))
    ]
    eos = tuple(r.sample(range(1, 128), r.randint(1, 10)))
    settings = _settings(
        max_new_tokens=r.randint(1, 4 * LENGTH + 5),
        max_denoising_steps=r.randint(1, 12),
        stability_threshold=r.randint(0, 2),
        adaptive_stopping=r.random() < 0.7,
        revise_accepted=r.random() < 0.8,
        eos_token_ids=eos,
    )

    def run(batch, batching):
        sampler = DiffusionSampler(
            model, settings, max_batch=batch, max_prompt_tokens=budget, backend="torch"
        )
        return [
            (x.row_id, x.token_ids, x.finish_reason, x.canvases)
            for x in sampler.generate(rows, batching=batching)
        ]

    alone = run(1, "continuous")
    batch = r.randint(2, 5)
    for name, batching in ((f"continuous batch {batch}", "continuous"), (f"static batch {batch}", "static")):
        assert run(batch, batching) == alone, name
    for _, tokens, _, _ in alone:
        assert len(tokens) <= settings.max_new_tokens and not set(tokens) & set(eos)


def test_attention_limited_to_the_longest_row_keeps_completions(model, requests_):
    """The CUDA path reads the slots only up to the longest active row (rounded up); forced on here."""
    limits = []

    class Limited(DiffusionSampler):
        def kv_limit(self, longest):
            limits.append(min(self.capacity, -(-longest // 16) * 16))
            return limits[-1]

    baseline, _ = _run(model, requests_, batch=5)
    limited = Limited(model, _settings(), max_batch=5, max_prompt_tokens=32, backend="torch")
    outputs = {
        r.row_id: (r.token_ids, r.denoising_steps, r.canvases, r.finish_reason)
        for r in limited.generate(requests_)
    }
    assert outputs == baseline
    assert min(limits) < limited.capacity, "the limit did cut the read"


def test_bucketed_steps_with_padding_rows_keep_completions(model, requests_):
    """The CUDA-graph path pads each step to a bucketed batch size with free slots; run eagerly here, the
    padding must change nothing for the real rows."""
    baseline, _ = _run(model, requests_, batch=6)
    padded = DiffusionSampler(
        model, _settings(), max_batch=6, max_prompt_tokens=32, backend="torch", step_graphs="eager"
    )
    assert padded.graphs is not None and padded.graphs.buckets == [1, 2, 4, 6]
    outputs = {
        r.row_id: (r.token_ids, r.denoising_steps, r.canvases, r.finish_reason)
        for r in padded.generate(requests_)
    }
    assert outputs == baseline
    assert padded.stats.decoder_row_steps > sum(v[1] for v in outputs.values()), "padding rows were computed"
    assert DiffusionSampler(model, _settings(), max_batch=6, max_prompt_tokens=32).graphs is None, (
        "off on CPU"
    )


def test_no_revision_emits_the_tokens_it_accepted():
    """revise_accepted=False: a position accepted on the canvas's last step emits the accepted token, not the
    noise that the step's input canvas still held there."""
    from tests.support.models import ScriptedModel

    vocab, length = 50, 8
    peaked = torch.full((2, length, vocab), -30.0)
    peaked[:, torch.arange(length), torch.arange(length) + 10] = 30.0  # position i certainly says token 10+i
    settings = _settings(
        max_new_tokens=length,
        max_denoising_steps=1,
        entropy_bound=1e6,
        canvas_length=length,
        revise_accepted=False,
        eos_token_ids=(1,),
    )
    sampler = DiffusionSampler(
        ScriptedModel([peaked]), settings, max_batch=2, max_prompt_tokens=4, backend="torch"
    )
    results = sampler.generate([Request("a", [5, 6]), Request("b", [7])])
    assert [r.token_ids for r in results] == [list(range(10, 10 + length))] * 2


class _Trickle:
    """A feed that gives one request per pull: each arrives while the rows before it are still running."""

    def __init__(self, requests):
        self._requests = list(requests)

    def pull(self, count: int, wait: bool) -> list:
        return [self._requests.pop(0)] if self._requests and count > 0 else []


def test_completions_of_one_prompt_copy_its_encoding(model):
    """The completions of a prompt (and another row with the same prompt) copy its keys and values from a slot
    that holds it instead of encoding it again, and complete exactly as when every prompt is encoded."""
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(7, 128, (n,), generator=gen).tolist() for n in (5, 21, 30)]
    requests = [Request(f"p{i}", p, completion=c) for i, p in enumerate(prompts) for c in range(4)]
    requests.append(Request("same-prompt", list(prompts[1])))

    def run(batch, share):
        sampler = DiffusionSampler(
            model, _settings(), max_batch=batch, max_prompt_tokens=32, backend="torch", share_prompts=share
        )
        results = sampler.generate(requests)
        return [(r.row_id, r.token_ids, r.denoising_steps, r.finish_reason) for r in results], sampler.stats

    alone, alone_stats = run(1, share=True)
    assert alone_stats.prompt_tokens_shared == 0, "a row alone never finds its prompt in another slot"
    encoded, encoded_stats = run(len(requests), share=False)
    shared, shared_stats = run(len(requests), share=True)
    assert shared == encoded == alone
    assert shared_stats.prompt_tokens_shared == 3 * 5 + 4 * 21 + 3 * 30
    assert encoded_stats.encoder_tokens - shared_stats.encoder_tokens == 32 * (len(requests) - 3), (
        "one batch of 3 prompts padded to 32 tokens instead of 13"
    )
    assert run(3, share=True)[0] == alone
    assert len({tuple(t) for rid, t, _, _ in shared if rid == "p1"}) > 1, "the completions differ"


def test_a_prompt_is_copied_from_a_row_still_running(model):
    """A request arriving while a row with its prompt runs copies the prompt from that row's slot, whose
    canvases have been appended after it since."""
    prompt = list(range(20, 45))
    requests = [Request("r", prompt, completion=c) for c in range(3)]
    settings = _settings(adaptive_stopping=False, max_denoising_steps=3, eos_token_ids=(200,))

    def run(share):
        sampler = DiffusionSampler(
            model, settings, max_batch=3, max_prompt_tokens=32, backend="torch", share_prompts=share
        )
        results = {}
        sampler.serve(_Trickle(requests), lambda req, res: results.update({req.completion: res.token_ids}))
        return results, sampler.stats

    shared, stats = run(share=True)
    assert shared == run(share=False)[0]
    assert stats.prompt_tokens_shared == 2 * len(prompt)
    assert all(len(t) == 4 * LENGTH for t in shared.values()), "every row ran its 4 canvases"


def test_prompts_that_start_alike_copy_their_common_blocks(model):
    """Prompts sharing leading blocks of 16 tokens (a system prompt, a template's fixed text) copy those from a
    slot that holds them and encode the rest after them; every completion is the one of encoding it whole."""
    system = list(range(20, 60))  # 40 tokens: two whole blocks and 8 more
    prompts = {
        "a": system + [7, 8, 9],
        "b": system + [10, 11],  # the 2 blocks of a
        "c": system[:20] + [12] * 9,  # 1 block
        "d": list(system),  # 2 blocks, then its last 8 tokens
        "e": [13] * 30,  # nothing in common
        "f": system[:16],  # exactly a's first block: copied whole
    }
    requests = [Request(k, p) for k, p in prompts.items()]

    def run(batch, share):
        sampler = DiffusionSampler(
            model, _settings(), max_batch=batch, max_prompt_tokens=48, backend="torch", share_prompts=share
        )
        results = sampler.generate(requests)
        return [(r.row_id, r.token_ids, r.denoising_steps) for r in results], sampler.stats

    encoded, encoded_stats = run(len(requests), share=False)
    shared, stats = run(len(requests), share=True)
    assert shared == encoded == run(1, share=False)[0]
    assert stats.prompt_tokens_shared == 32 + 16 + 32 + 16
    assert stats.encoder_calls == encoded_stats.encoder_calls + 1, (
        "fresh prompts, then the rests after copies"
    )
    for batch in (2, 3):
        assert run(batch, share=True)[0] == encoded, batch


def test_completions_of_prompts_with_a_common_start_encode_each_prompt_once(model):
    """Prompts sharing a system prompt, each with several completions, admitted together: the first prompt is
    encoded, the others' first completions copy the system prompt and encode their rest, and every other
    completion copies its whole prompt from its first (not the system prompt from another prompt's row)."""
    system = list(range(20, 36))  # one block
    prompts = [system + [40 + i] * (8 + 4 * i) for i in range(4)]
    requests = [Request(f"p{i}", p, completion=c) for i, p in enumerate(prompts) for c in range(3)]

    def run(share):
        sampler = DiffusionSampler(
            model,
            _settings(),
            max_batch=len(requests),
            max_prompt_tokens=48,
            backend="torch",
            share_prompts=share,
        )
        results = sampler.generate(requests)
        return [(r.row_id, r.token_ids, r.denoising_steps) for r in results], sampler.stats

    encoded, encoded_stats = run(share=False)
    shared, stats = run(share=True)
    assert shared == encoded
    lengths = [len(p) for p in prompts]  # 24, 28, 32, 36
    assert stats.prompt_tokens_shared == 3 * 16 + 2 * sum(lengths)
    # Prompts encoded: 12 padded to 48 tokens, against the first padded to 32 and the 3 rests (12-20) to 32.
    assert encoded_stats.encoder_tokens - stats.encoder_tokens == 12 * 48 - (32 + 3 * 32)


def test_no_revision_keeps_accepted_tokens_and_emits_the_sampled_ones():
    """revise_accepted=False (the ablation): (a) a token accepted at the first step is kept to the end of the
    canvas, whatever later steps predict and however few positions they accept; (b) a position first accepted
    at the canvas's last step emits the token it sampled and accepted, not the step's argmax."""
    from tests.support.models import ScriptedModel

    vocab, length = 50, 8
    positions = torch.arange(length)
    peaked = torch.full((2, length, vocab), -30.0)
    peaked[:, positions, positions + 10] = 30.0  # position i certainly says token 10+i
    flat = torch.zeros(2, length, vocab)  # high entropy: one position accepted a step; argmax 0

    def run(script, steps, bound):
        settings = _settings(
            max_new_tokens=length,
            max_denoising_steps=steps,
            entropy_bound=bound,
            canvas_length=length,
            revise_accepted=False,
            adaptive_stopping=False,
        )
        sampler = DiffusionSampler(
            ScriptedModel(script), settings, max_batch=2, max_prompt_tokens=4, backend="torch"
        )
        return [r.token_ids for r in sampler.generate([Request("a", [5, 6]), Request("b", [7])])]

    assert run([peaked, flat, flat], steps=3, bound=0.3) == [list(range(10, 10 + length))] * 2
    twins = torch.full((2, length, vocab), -30.0)
    twins[:, positions, positions + 10] = twins[:, positions, positions + 30] = 30.0  # argmax: the first
    for tokens in run([twins], steps=1, bound=1e6):
        assert all(t in (10 + i, 30 + i) for i, t in enumerate(tokens))
        assert any(t == 30 + i for i, t in enumerate(tokens)), "the sampled tokens, not the argmax"


def test_keyed_draws_differ_by_canvas_step_and_stream():
    """Every keyed draw is a function of (row key, canvas, step): each canvas starts from its own noise, and
    the re-noise of a step is not the initial canvas nor another step's re-noise."""
    from pipeline.kernels import rng
    from pipeline.sampler.draws import KeyedDraws

    draws = KeyedDraws(vocab_size=1000, canvas_length=64)
    k0, k1 = (torch.tensor([w]) for w in rng.row_key(0, "row"))

    def idx(i):
        return torch.tensor([i])

    drawn = [draws.initial_canvas(k0, k1, idx(c)) for c in range(3)]
    drawn += [draws.noise(k0, k1, idx(c), idx(s)) for c in range(3) for s in range(3)]
    distinct = {tuple(d.flatten().tolist()) for d in drawn}
    assert len(distinct) == len(drawn)
    samples = {tuple(draws.sample_state(k0, k1, idx(c), idx(s)).tolist()) for c in range(3) for s in range(3)}
    assert len(samples) == 9
