"""Shards in flight on one worker share one running sampler (pipeline/runner/stream.py): each gets the rows it
would get alone, a shard arriving while another runs takes the slots the first one's last rows free, and a
failure inside the sampler reaches every caller whose rows it held, not the ones that come after."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion

from pipeline.models.diffusion_gemma import DiffusionGemmaTextModel
from pipeline.models.mask_checkpoint import load_mask_model
from pipeline.runner.stream import SharedSampler
from pipeline.sampler.engine import DiffusionSampler, Request
from pipeline.sampler.mask.engine import MaskDiffusionSampler
from pipeline.sampler.mask.settings import MaskSettings
from tests.support.mask_models import build_mask_checkpoint
from tests.support.models import build_checkpoint, sampler_settings

LENGTH = 16
BATCH = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("shared") / "m", canvas_length=LENGTH, sharpness=12.0)
    return DiffusionGemmaTextModel(DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval())


def _shards(count: int, rows: int, seed: int = 0) -> list[list[Request]]:
    gen = torch.Generator().manual_seed(seed)
    shards = []
    for s in range(count):
        shard = []
        for i in range(rows):
            n = int(torch.randint(1, 30, (1,), generator=gen))
            shard.append(Request(f"s{s}-row-{i}", torch.randint(7, 128, (n,), generator=gen).tolist()))
        shards.append(shard)
    return shards


def _sampler(model) -> DiffusionSampler:
    settings = sampler_settings(LENGTH, max_new_tokens=3 * LENGTH)
    return DiffusionSampler(model, settings, max_batch=BATCH, max_prompt_tokens=32, backend="torch")


def _key(results) -> list[tuple]:
    return [(r.row_id, r.token_ids, r.denoising_steps, r.canvases, r.finish_reason) for r in results]


def test_a_shard_arriving_mid_run_takes_the_freed_slots_and_every_shard_gets_its_own_rows(model):
    shards = _shards(3, rows=9)
    alone = _sampler(model)
    expected = [_key(alone.generate(shard)) for shard in shards]
    passes_alone = alone.stats.decoder_calls

    sampler = _sampler(model)
    shared = SharedSampler(sampler)
    handles = []
    finished = []

    def next_shard(result) -> None:  # the next shard arrives as the previous one's first row finishes
        finished.append(result.row_id)
        if len(handles) < len(shards) and result.row_id.startswith(f"s{len(handles) - 1}-"):
            handles.append(shared.submit(shards[len(handles)], on_result=next_shard))

    handles.append(shared.submit(shards[0], on_result=next_shard))
    for i in range(len(shards)):
        while len(handles) <= i:
            threading.Event().wait(0.01)
        assert _key(handles[i].wait()) == expected[i], f"shard {i}: the same rows as alone"
    assert sorted(finished) == sorted(r.row_id for shard in shards for r in shard)
    # One drain at the end instead of one per shard.
    assert sampler.stats.decoder_calls < passes_alone, (sampler.stats.decoder_calls, passes_alone)


def test_a_sampler_failure_fails_the_shards_it_held_and_the_queued_ones_run(model):
    shards = _shards(3, rows=5, seed=1)
    expected = [_key(_sampler(model).generate(shard)) for shard in shards[1:]]
    shared = SharedSampler(_sampler(model))
    broken = shards[0][:2] + [Request("s0-empty", [])] + shards[0][2:]
    first, queued = shared.submit(broken), shared.submit(shards[1])  # the second's rows not yet taken
    with pytest.raises(ValueError, match="'s0-empty': prompt has 0 tokens"):
        first.wait()
    assert _key(queued.wait()) == expected[0], "rows the sampler had not taken are generated"
    assert _key(shared.run(shards[2])) == expected[1], "and so are those that come next"


def test_a_sampler_that_cannot_start_fails_each_caller_once_without_spinning(model):
    """An error before any row is taken (here a sampler that refuses continuous batching; on a GPU, a KV
    cache that does not fit) fails the queued callers; the thread then waits for the next ones."""
    sampler = DiffusionSampler(
        model, _sampler(model).settings, max_batch=BATCH, max_prompt_tokens=32, random_mode="torch_global"
    )
    shared = SharedSampler(sampler)
    for shard in _shards(2, rows=2, seed=4):
        with pytest.raises(ValueError, match="random_mode='torch_global'"):
            shared.run(shard)
    busy = threading.Event()
    threading.Timer(0.5, busy.set).start()
    calls_before = sampler.stats.decoder_calls
    busy.wait()
    assert shared._thread.is_alive() and sampler.stats.decoder_calls == calls_before


def test_rows_that_arrive_mid_canvas_take_free_slots_at_the_next_step(model):
    first, second = _shards(2, rows=1, seed=5)
    sampler = _sampler(model)
    pulled_at = []

    class Feed:  # the first row, then (at the next pull) the second, then closed
        def __init__(self):
            self.batches = [first, second]

        def pull(self, count, wait):
            pulled_at.append(sampler.stats.decoder_calls)
            return self.batches.pop(0) if self.batches else []

    done = []
    sampler.serve(Feed(), on_result=lambda request, result: done.append(request.row_id))
    assert pulled_at[:2] == [0, 1], "the second row was taken after one step, not at the first canvas's end"
    assert sorted(done) == sorted(r.row_id for r in first + second)


def test_a_failing_callback_fails_its_own_caller_only(model):
    shards = _shards(2, rows=4, seed=2)
    expected = _key(_sampler(model).generate(shards[1]))
    shared = SharedSampler(_sampler(model))

    calls = []

    def broken(result) -> None:
        calls.append(result.row_id)
        raise RuntimeError(f"progress report failed for {result.row_id}")

    first = shared.submit(shards[0], on_result=broken)
    second = shared.submit(shards[1])
    assert _key(second.wait()) == expected
    with pytest.raises(RuntimeError, match="progress report failed for s0-row-"):
        first.wait()
    assert len(calls) == 1, "a caller whose callback failed is not called back again for its other rows"


def test_a_caller_with_no_rows_is_done_at_once(model):
    """A shard whose every row was rejected before sampling waits for nothing (it hung for ever)."""
    pending = SharedSampler(_sampler(model)).submit([])
    assert pending.done.is_set() and pending.wait() == []


def test_mask_diffusion_shards_share_the_sampler_with_their_own_results(tmp_path):
    model = load_mask_model(build_mask_checkpoint(tmp_path / "m", family="llada", std=0.1, eos_like=28))

    def sampler():
        settings = MaskSettings(
            max_new_tokens=16,
            steps=8,
            block_length=8,
            mask_token_id=model.mask_token_id,
            eos_token_ids=(0,),
            pad_token_id=0,
        )
        return MaskDiffusionSampler(model, settings, max_batch=3, max_prompt_tokens=32)

    shards = _shards(2, rows=4, seed=3)
    for shard in shards:
        for r in shard:
            r.prompt_ids = [t % 90 + 6 for t in r.prompt_ids]
    expected = [_key(sampler().generate(shard)) for shard in shards]
    shared = SharedSampler(sampler())
    handles = [shared.submit(shard) for shard in shards]
    assert [_key(h.wait()) for h in handles] == expected
