"""The mask-diffusion sampler against LLaDA's published algorithm, and its batching, caching, threshold
decoding, self-correction and EOS behaviour.

Faithfulness runs in float64 (model and reference), so that the comparison is of decisions, not of rounding:
with caching off, temperature 0, the reference's confidence rules and blocks, canvasflow's completions
(continuous or static batching, rows of different prompt lengths at per-row positions) equal
`reference_generate`'s (a left-padded batch with an attention mask) token for token.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch

from pipeline.models.mask_checkpoint import load_mask_model
from pipeline.sampler.engine import Request
from pipeline.sampler.mask.decide import StepKeys, decide, eos_stop
from pipeline.sampler.mask.engine import MaskDiffusionSampler
from pipeline.sampler.mask.settings import (
    MaskSettings,
    MaskSettingsError,
    mask_user_values,
    resolve_mask_settings,
)
from pipeline.sampler.settings import MAX_SEED
from tests.support.mask_models import ReferenceModel, build_mask_checkpoint, reference_generate, until_eos

EOS = 0  # <|endoftext|> of the tiny tokenizers
EOS_LIKE = {"llada": 28, "dream": 7}  # tokens the seed-0 std-0.1 models predict now and then


@pytest.fixture(scope="module", params=["llada", "dream"])
def family_dir(request, tmp_path_factory):
    family = request.param
    path = tmp_path_factory.mktemp(family) / "m"
    return family, build_mask_checkpoint(path, family=family, std=0.1, eos_like=EOS_LIKE[family])


@pytest.fixture(scope="module")
def llada_fp32(tmp_path_factory):
    path = build_mask_checkpoint(tmp_path_factory.mktemp("fp32") / "m", family="llada", std=0.1, eos_like=28)
    return load_mask_model(path)


def _prompts(count: int = 5, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [3, 11, 1, 8, 14, 5, 9, 2][:count]
    return [torch.randint(6, 100, (n,), generator=gen).tolist() for n in lengths]


def _settings(model, **overrides) -> MaskSettings:
    values = dict(
        max_new_tokens=16,
        steps=8,
        block_length=8,
        mask_token_id=model.mask_token_id,
        eos_token_ids=(EOS,),
        pad_token_id=EOS,
    )
    values.update(overrides)
    return MaskSettings(**values)


def _run(
    model,
    prompts,
    *,
    batch=3,
    batching="continuous",
    order=None,
    backend="auto",
    decide_rows=None,
    **overrides,
):
    """Results by row id; `decide_rows`: the vocabulary head and decisions run over that many rows at a time."""
    settings = _settings(model, **overrides)
    extra = {}
    if decide_rows is not None:
        extra["decide_bytes"] = decide_rows * settings.block_length * model.spec.vocab_size * 4
    sampler = MaskDiffusionSampler(
        model, settings, max_batch=batch, max_prompt_tokens=16, backend=backend, **extra
    )
    indices = order if order is not None else range(len(prompts))
    results = sampler.generate([Request(f"row-{i}", prompts[i]) for i in indices], batching=batching)
    return {r.row_id: r for r in results}, sampler


@pytest.mark.parametrize(
    "schedule",
    [
        dict(max_new_tokens=16, steps=8, block_length=8),
        dict(max_new_tokens=16, steps=16, block_length=4),
        dict(max_new_tokens=12, steps=5, block_length=12),  # 12 tokens over 5 steps: 3, 3, 2, 2, 2
    ],
    ids=["2x8-4steps", "4x4-4steps", "1x12-5steps"],
)
@pytest.mark.parametrize("rule", ["low_confidence", "margin", "entropy"])
def test_completions_equal_llada_generate(family_dir, schedule, rule):
    family, path = family_dir
    model = load_mask_model(path).double()
    prompts = _prompts()
    expected = reference_generate(
        ReferenceModel(path),
        prompts,
        gen_length=schedule["max_new_tokens"],
        steps=schedule["steps"],
        block_length=schedule["block_length"],
        mask_id=model.mask_token_id,
        pad_id=EOS,
        remasking=rule,
    )
    for batching in ("continuous", "static"):
        got, _ = _run(model, prompts, batching=batching, remasking=rule, **schedule)
        for i, tokens in enumerate(expected):
            result = got[f"row-{i}"]
            assert (result.token_ids, result.finish_reason) == until_eos(tokens, {EOS}), (batching, i)


def test_guidance_equals_llada_generate(family_dir):
    family, path = family_dir
    model = load_mask_model(path).double()
    prompts = _prompts(4, seed=3)
    expected = reference_generate(
        ReferenceModel(path),
        prompts,
        gen_length=16,
        steps=8,
        block_length=8,
        mask_id=model.mask_token_id,
        pad_id=EOS,
        cfg_scale=1.5,
    )
    got, _ = _run(model, prompts, cfg_scale=1.5)
    for i, tokens in enumerate(expected):
        assert (got[f"row-{i}"].token_ids, got[f"row-{i}"].finish_reason) == until_eos(tokens, {EOS})
    # the unconditional twins keep their own cache slots: one step per block is exact with caching too
    exact, _ = _run(model, prompts, cfg_scale=1.5, steps=2)
    for cache in ("prefix", "dual"):
        cached, _ = _run(model, prompts, cfg_scale=1.5, steps=2, cache=cache)
        assert {k: r.token_ids for k, r in cached.items()} == {k: r.token_ids for k, r in exact.items()}


def test_the_workload_mixes_eos_and_length(family_dir):
    """EOS ends a row as soon as everything before it is decided: fewer passes than the schedule, fewer
    blocks; other rows run to max_new_tokens."""
    _, path = family_dir
    model = load_mask_model(path).double()
    got, sampler = _run(model, _prompts(8), max_new_tokens=32, steps=16, block_length=8)
    reasons = {r.finish_reason for r in got.values()}
    assert reasons == {"eos", "length"}
    for r in got.values():
        assert EOS not in r.token_ids
        if r.finish_reason == "length":
            assert (r.denoising_steps, r.canvases, len(r.token_ids)) == (16, 4, 32)
        else:
            assert r.denoising_steps <= 16 and len(r.token_ids) < 32
    assert any(r.canvases < 4 and r.denoising_steps < 16 for r in got.values() if r.finish_reason == "eos")
    assert sampler.stats.row_forwards == sum(r.denoising_steps for r in got.values())


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_caching_with_one_step_per_block_is_exact(llada_fp32, cache):
    """A block decoded in one step only uses the block-start forward, which is exact."""
    prompts = _prompts(6)
    exact, _ = _run(llada_fp32, prompts, steps=2, block_length=8)
    cached, _ = _run(llada_fp32, prompts, steps=2, block_length=8, cache=cache)
    assert {k: r.token_ids for k, r in cached.items()} == {k: r.token_ids for k, r in exact.items()}


def test_the_exact_path_reports_the_torch_kernels_it_runs_whatever_the_backend(family_dir):
    """With cache none no Triton kernel runs (the cached forward's attention is the only one); the sampler
    said "triton" for backend=auto on a GPU, and the worker's log "triton kernels"."""
    _, path = family_dir
    model = load_mask_model(path, dtype=torch.float32)
    _, exact = _run(model, _prompts(2), backend="triton", steps=4, block_length=8, cache="none")
    assert exact.backend == "torch" and model.kernel_backend() == "torch"


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_attention_on_triton_gives_the_same_completions(family_dir, cache):
    """The cached forward's attention on the canvas-attention kernel (the interpreter on CPU) decides every
    token as the torch path does, for LLaDA and for Dream (grouped-query heads), with guidance's twin rows."""
    family, path = family_dir
    model = load_mask_model(path, dtype=torch.float32)
    prompts = _prompts(5)
    knobs = dict(steps=8, block_length=8, cache=cache, cfg_scale=0.5)
    torch_run, torch_sampler = _run(model, prompts, backend="torch", **knobs)
    triton_run, triton_sampler = _run(model, prompts, backend="triton", **knobs)
    assert torch_sampler.backend == "torch" and triton_sampler.backend == "triton"
    assert model.kernel_backend() == "triton"
    assert {k: r.token_ids for k, r in triton_run.items()} == {k: r.token_ids for k, r in torch_run.items()}


def test_caching_saves_forward_flops(llada_fp32):
    prompts = _prompts(4)
    flops = {}
    for cache in ("none", "prefix", "dual"):
        got, sampler = _run(llada_fp32, prompts, max_new_tokens=64, steps=64, block_length=16, cache=cache)
        assert all(r.denoising_steps >= 1 for r in got.values())
        flops[cache] = sampler.stats.flops(llada_fp32)
    assert flops["dual"] < flops["prefix"] < flops["none"]
    assert flops["dual"] < 0.5 * flops["none"]


@pytest.mark.parametrize(
    "knobs",
    [
        dict(cache="none"),
        dict(cache="prefix", temperature=0.8),
        dict(cache="dual", threshold=0.3, remasking="margin"),
        dict(cache="none", cfg_scale=1.0, remasking="random", temperature=1.0),
        dict(cache="dual", remask_threshold=0.2),  # 4 steps a block of 8: 2 tokens a step, remasks
        dict(algorithm="dream", block_length=24, remasking="entropy", temperature=0.7, top_p=0.9, alg_temp=0.5),
        dict(algorithm="dream", block_length=12, remasking="origin", cfg_scale=0.5, top_k=6, temperature=1.0),
    ],
    ids=[
        "exact", "prefix-sampled", "dual-threshold", "guided-random", "dual-selfcorrect", "dream", "dream-origin"
    ],
)  # fmt: skip
def test_outputs_do_not_depend_on_batching(llada_fp32, knobs):
    """Nor on the number of rows whose vocabulary head and decisions run at once."""
    prompts = _prompts(8)
    baseline, _ = _run(llada_fp32, prompts, batch=8, max_new_tokens=24, **{"steps": 12, **knobs})
    variants = {
        "batch 1": dict(batch=1),
        "batch 3": dict(batch=3),
        "batch 5 reversed": dict(batch=5, order=list(reversed(range(8)))),
        "static batch 3": dict(batch=3, batching="static"),
        "decisions 3 rows at a time": dict(batch=8, decide_rows=3),
        "decisions row by row": dict(batch=4, decide_rows=1),
    }
    for name, variant in variants.items():
        got, _ = _run(llada_fp32, prompts, max_new_tokens=24, **{"steps": 12, **knobs}, **variant)
        changed = [
            k
            for k in baseline
            if (got[k].token_ids, got[k].denoising_steps)
            != (baseline[k].token_ids, baseline[k].denoising_steps)
        ]
        assert not changed, f"{name}: rows {changed} differ"


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_the_head_and_decisions_run_over_a_few_rows_at_a_time(llada_fp32, monkeypatch, cfg_scale):
    """decide_bytes for 2 rows of logits: a step over 5 rows calls the head on 2, 2 and 1 (guidance: the
    conditional rows and their twins, and three logits tensors per row, so one row at a time)."""
    calls = []
    real = llada_fp32.logits
    monkeypatch.setattr(llada_fp32, "logits", lambda hidden: (calls.append(hidden.shape[0]), real(hidden))[1])
    _run(llada_fp32, _prompts(5), batch=5, decide_rows=2, max_new_tokens=8, steps=4, cfg_scale=cfg_scale)
    first_step = calls[: 3 if cfg_scale == 0 else 10]
    assert first_step == ([2, 2, 1] if cfg_scale == 0 else [1] * 10)
    assert max(calls) == (2 if cfg_scale == 0 else 1)


def test_temperature_samples_with_keyed_noise(llada_fp32):
    prompts = _prompts(6)
    greedy, _ = _run(llada_fp32, prompts)
    a, _ = _run(llada_fp32, prompts, temperature=1.0)
    b, _ = _run(llada_fp32, prompts, temperature=1.0)
    other_seed, _ = _run(llada_fp32, prompts, temperature=1.0, seed=1)
    tokens = lambda got: [got[k].token_ids for k in sorted(got)]  # noqa: E731
    assert tokens(a) == tokens(b)
    assert tokens(a) != tokens(greedy) and tokens(a) != tokens(other_seed)
    # a prompt's further completions (sampler.completions_per_prompt) draw their own noise; completion 0 is a's
    sampler = MaskDiffusionSampler(llada_fp32, _settings(llada_fp32, temperature=1.0), max_batch=4)
    for completion in (0, 1):
        got = sampler.generate([Request(f"row-{i}", p, completion) for i, p in enumerate(prompts)])
        assert ([r.token_ids for r in got] == tokens(a)) == (completion == 0)


def test_threshold_decoding_commits_at_least_one_per_step(llada_fp32):
    prompts = _prompts(6)
    scheduled, _ = _run(llada_fp32, prompts, max_new_tokens=24, steps=24, block_length=8)
    for threshold in (0.01, 0.99):
        got, _ = _run(
            llada_fp32,
            prompts,
            max_new_tokens=24,
            steps=24,
            block_length=8,
            threshold=threshold,
            record_drafts=True,
        )
        for r in got.values():
            for block, drafts in enumerate(r.drafts):
                region = slice(block * 8, (block + 1) * 8)
                masked = [8] + [d[region].count(llada_fp32.mask_token_id) for d in drafts]
                assert all(a - b >= 1 for a, b in zip(masked, masked[1:], strict=False)), masked
        if threshold == 0.99:  # few positions are that confident: about one token per step
            assert sum(r.denoising_steps for r in got.values()) >= 0.8 * sum(
                r.denoising_steps for r in scheduled.values()
            )
        else:
            assert sum(r.denoising_steps for r in got.values()) < 0.5 * sum(
                r.denoising_steps for r in scheduled.values()
            )


def _decide(logits, block, *, steps_left, allow_remask=None, keys=None, mask_id=0, **knobs):
    """decide() on one block of width K whose rows have `steps_left` [B] scheduled steps left (this one
    included), with MaskSettings `knobs` (the default: LLaDA's algorithm)."""
    steps = int(steps_left.max())
    width = block.shape[1]
    settings = MaskSettings(
        max_new_tokens=width, steps=steps, block_length=width, mask_token_id=mask_id, eos_token_ids=(mask_id + 1,),
        pad_token_id=mask_id + 1, **knobs,
    )  # fmt: skip
    allow = allow_remask if allow_remask is not None else torch.ones(block.shape[0], dtype=torch.bool)
    return decide(logits, block, settings=settings, step=steps - steps_left, allow_remask=allow, keys=keys)


def test_threshold_rule_is_fast_dllms():
    """Fast-dLLM: top-k over the masked positions (k = all of them), then every pick but the first whose
    confidence is below the threshold is dropped."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        logits = torch.randn(3, 10, 17, generator=gen) * 3
        block = torch.where(
            torch.rand(3, 10, generator=gen) < 0.6, 0, torch.randint(1, 17, (3, 10), generator=gen)
        )
        block[1] = 0  # every position masked in one row
        out = _decide(logits, block, steps_left=torch.ones(3, dtype=torch.long), threshold=0.5)
        probs = logits.index_fill(-1, torch.tensor([0]), float("-inf")).softmax(-1)
        conf = torch.where(block == 0, probs.max(-1).values, float("-inf"))
        for row in range(3):
            count = int((block[row] == 0).sum())
            expected = torch.zeros(10, dtype=torch.bool)
            if count:
                _, chosen = torch.topk(conf[row], k=count)
                expected[chosen[0]] = True
                expected[chosen[1:][conf[row][chosen[1:]] >= 0.5]] = True
            assert torch.equal(out.transferred[row], expected)


def test_a_threshold_of_1_commits_every_certain_position():
    """confidence >= threshold (Fast-dLLM drops a pick only below it): at threshold 1, every masked position
    whose probability is exactly 1 in float32 is committed in one step, not one a step."""
    logits = torch.full((1, 6, 9), -200.0)
    logits[0, torch.arange(6), torch.arange(6) + 2] = 200.0  # p = 1.0 exactly
    out = _decide(logits, torch.zeros(1, 6, dtype=torch.long), steps_left=torch.tensor([6]), threshold=1.0)
    assert out.transferred.all() and out.tokens[0].tolist() == [2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("rule", ["margin", "entropy"])
def test_margin_and_entropy_rank_by_the_tempered_distribution_as_dreams(rule):
    """Dream's margin and entropy rules (`topk_margin`, `entropy`) score positions on the distribution it
    samples from, softmax(logits / temperature): Dream `generation_utils.py` `sample_tokens` (lines 64-70
    divide the logits by the temperature before the softmax; 81-92 compute top1 - top2 and sum p log p from
    those probabilities; line numbers of NVlabs/Fast-dLLM dream/model/generation_utils.py, which keeps
    Dream's function), then `torch.topk(full_confidence, number_transfer_tokens)` over the masked positions
    (line 482). Neither confidence depends on the sampled token, so the transfer set is the reference's."""
    gen = torch.Generator().manual_seed(1)
    temperature, mask = 0.4, 0
    keys = StepKeys(
        k0=torch.tensor([1, 2]), k1=torch.tensor([3, 4]), block=torch.zeros(2, dtype=torch.long),
        step=torch.zeros(2, dtype=torch.long), gen_positions=torch.arange(12).expand(2, 12),
    )  # fmt: skip
    for _ in range(20):
        logits = torch.randn(2, 12, 23, generator=gen, dtype=torch.float64) * 2
        logits[..., mask] = -1e4  # no mass on MASK, so canvasflow's -inf there changes nothing
        block = torch.where(torch.rand(2, 12, generator=gen) < 0.7, mask, 5)
        out = _decide(
            logits, block, steps_left=torch.tensor([3, 2]), keys=keys, remasking=rule, temperature=temperature
        )
        probs = torch.softmax(logits / temperature, dim=-1)  # Dream: logits / temperature, then softmax
        if rule == "margin":
            top = torch.sort(probs, dim=-1, descending=True).values
            conf = top[..., 0] - top[..., 1]
        else:
            conf = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
        conf = torch.where(block == mask, conf, float("-inf"))
        for row, steps_left in enumerate((3, 2)):
            count = int((block[row] == mask).sum())
            expected = torch.zeros(12, dtype=torch.bool)
            _, chosen = torch.topk(conf[row], k=-(-count // steps_left))
            expected[chosen] = True
            assert torch.equal(out.transferred[row], expected), (rule, row)


def test_self_correction_remasks_low_probability_tokens():
    logits = torch.full((2, 6, 8), -5.0)
    logits[:, :, 3] = 5.0  # every position predicts token 3 confidently
    block = torch.tensor([[0, 0, 0, 5, 6, 3], [0, 0, 0, 5, 6, 3]])  # committed 5, 6 (now improbable) and 3
    remask = functools.partial(_decide, logits, block, remask_threshold=0.1)
    out = remask(steps_left=torch.tensor([1, 3]), allow_remask=torch.tensor([True, True]))
    # row 0 commits its 3 masked positions, so up to 2 may be remasked: 5 and 6; token 3 is probable and stays
    assert out.remasked[0].tolist() == [False, False, False, True, True, False]
    assert out.tokens[0].tolist() == [3, 3, 3, 0, 0, 3]
    # row 1 commits ceil(3 / 3) = 1: no budget, net progress first
    assert not out.remasked[1].any() and int(out.transferred[1].sum()) == 1
    out = remask(steps_left=torch.tensor([1, 3]), allow_remask=torch.tensor([False, False]))
    assert not out.remasked.any()


def test_self_correction_in_the_sampler_remasks_and_finishes(llada_fp32):
    prompts = _prompts(4)
    got, _ = _run(
        llada_fp32,
        prompts,
        max_new_tokens=16,
        steps=8,
        block_length=8,
        remask_threshold=0.5,
        record_drafts=True,
    )
    mask, remasks = llada_fp32.mask_token_id, 0
    for r in got.values():
        assert r.denoising_steps <= 8
        for drafts in r.drafts:
            for before, after in zip(drafts, drafts[1:], strict=False):
                remasks += sum(a != mask and b == mask for a, b in zip(before, after, strict=True))
    assert remasks > 0
    # an EOS in a block just completed is final: it ends the row, also in the last block (here the only one)
    one_block, _ = _run(
        llada_fp32, _prompts(8), max_new_tokens=16, steps=8, block_length=16, remask_threshold=0.5
    )
    assert any(r.finish_reason == "eos" for r in one_block.values())
    assert all(EOS not in r.token_ids for r in one_block.values())


def test_eos_stop_needs_everything_before_decided():
    mask = 9
    generated = torch.tensor([[4, 0, 5, mask], [4, mask, 0, 5], [4, 5, 6, 7], [0, 0, 0, 0]])
    stop, position = eos_stop(
        generated, mask_id=mask, eos_ids=torch.tensor([0]), final_end=torch.tensor([4, 4, 4, 0])
    )
    assert stop.tolist() == [True, False, False, False] and position.tolist() == [1, 4, 4, 4]


def test_settings_resolution_and_errors():
    tokens = dict(family="llada", mask_token_id=2, eos_token_ids=(0,), pad_token_id=0)
    s = resolve_mask_settings({"max_new_tokens": 16}, {"block_length": 8, "steps": 4}, **tokens)
    assert (s.max_new_tokens, s.block_length, s.steps, s.steps_per_block) == (16, 8, 4, 2)
    s = resolve_mask_settings({"max_new_tokens": 16}, {}, **tokens)  # the default block (32) shrinks to fit
    assert (s.block_length, s.steps, s.cache, s.remasking) == (16, 16, "none", "low_confidence")
    with pytest.raises(
        MaskSettingsError, match="max_new_tokens=20 must be a multiple of sampler.mask.block_length=8"
    ):
        resolve_mask_settings({"max_new_tokens": 20, "block_length": 8}, {}, **tokens)
    with pytest.raises(
        MaskSettingsError, match="sampler.mask.steps=6 must be a multiple of the number of blocks"
    ):
        resolve_mask_settings({"max_new_tokens": 16, "block_length": 4, "steps": 6}, {}, **tokens)
    with pytest.raises(MaskSettingsError) as info:  # the user set neither steps nor block_length
        resolve_mask_settings({"max_new_tokens": 24}, {"block_length": 8, "steps": 16}, **tokens)
    assert str(info.value).endswith(
        "(3 = max_new_tokens 24 / block_length 8); steps=16, block_length=8 come from the model's "
        "generation_config.json: set sampler.mask.steps / sampler.mask.block_length to override"
    )
    with pytest.raises(MaskSettingsError) as info:  # the user's steps, the config's block_length
        resolve_mask_settings({"max_new_tokens": 24, "steps": 16}, {"block_length": 8}, **tokens)
    assert str(info.value).endswith(
        "; block_length=8 comes from the model's generation_config.json: set sampler.mask.block_length to override"
    )
    with pytest.raises(MaskSettingsError, match="sampler.mask.cache='full' is not one of none, prefix, dual"):
        resolve_mask_settings({"cache": "full"}, {}, **tokens)
    with pytest.raises(MaskSettingsError, match="sampler.mask.threshold=1.5"):
        resolve_mask_settings({"threshold": 1.5}, {}, **tokens)
    s = resolve_mask_settings({"threshold": 1, "remask_threshold": 1}, {}, **tokens)  # (0, 1] and [0, 1]
    assert (s.threshold, s.remask_threshold) == (1, 1.0)


@pytest.mark.parametrize("seed", [2**63, 2**64, -1, True, 1.0, "5"])
def test_a_seed_outside_int64_or_not_an_integer_is_refused_naming_it(seed):
    """The DiffusionGemma sampler's seed check (the output's `seed` column is int64), through the Python API:
    these seeds used to be taken (True as 1, 1.0 as 1, 2**63 failing every shard when written)."""
    tokens = dict(mask_token_id=2, eos_token_ids=(0,), pad_token_id=0)
    message = re.escape(f"sampler.seed={seed!r} must be an integer from 0 to {MAX_SEED} (2**63 - 1")
    with pytest.raises(MaskSettingsError, match=message):
        resolve_mask_settings({"seed": seed}, {}, family="llada", **tokens)
    with pytest.raises(MaskSettingsError, match=message):
        MaskSettings(max_new_tokens=8, steps=8, block_length=8, seed=seed, **tokens)
    assert resolve_mask_settings({"seed": MAX_SEED}, {}, family="llada", **tokens).seed == MAX_SEED
    assert resolve_mask_settings({"seed": 0}, {}, family="llada", **tokens).seed == 0


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"record_drafts": "no"}, "record_drafts='no' must be true or false"),
        ({"record_drafts": 0}, "record_drafts=0 must be true or false"),
        ({"adaptive_stopping": "false"}, "adaptive_stopping='false' is a DiffusionGemma setting"),
        ({"revise_accepted": 0}, "revise_accepted=0 is a DiffusionGemma setting"),
    ],
)
def test_a_switch_that_is_not_a_bool_is_refused_as_for_diffusion_gemma(knobs, message):
    """LLM("builtin:tiny-llada", record_drafts="no") recorded drafts ("no" is truthy) and adaptive_stopping="false"
    was ignored, where a DiffusionGemma model refuses both."""
    from pipeline import LLM

    with pytest.raises(MaskSettingsError, match=f"^{re.escape(message)}"):
        LLM("builtin:tiny-llada", **knobs)
    with pytest.raises(MaskSettingsError, match=re.escape(f"sampler.{message}")):
        resolve_mask_settings(
            mask_user_values(knobs, "llada"),
            {},
            family="llada",
            mask_token_id=2,
            eos_token_ids=(0,),
            pad_token_id=0,
        )
    assert (
        LLM("builtin:tiny-llada", record_drafts=False, adaptive_stopping=True).settings.record_drafts is False
    )


@pytest.mark.parametrize(
    "mask, steps_hint",
    [
        (
            {},
            "Set mask.steps to a multiple of 2 between 6 and 12 (3 to 6 steps a block)",
        ),  # tiny-llada's 16 steps over 2 blocks of 8
        (
            {"steps": 4},
            "Set mask.steps to a multiple of 2 between 6 and 12",
        ),  # 2 steps a block: no step between first and last
        ({"algorithm": "dream", "remasking": "entropy"}, "Set fewer mask.steps or longer blocks"),
        ({"block_length": 4, "steps": 4, "threshold": 0.5}, "Set fewer mask.steps or longer blocks"),
    ],
    ids=["llada-default", "two-steps-a-block", "dream-one-a-step", "threshold-one-step-a-block"],
)
def test_a_remask_threshold_that_could_never_remask_is_refused(mask, steps_hint):
    """sampler.mask.remask_threshold was taken and did nothing with LLaDA's default schedule (steps =
    max_new_tokens: one token a step, and a step remasks fewer than it commits): the same completions as
    without it."""
    from pipeline import LLM

    with pytest.raises(
        MaskSettingsError, match="remask_threshold=0.5 would never mask a token again"
    ) as info:
        LLM("builtin:tiny-llada", mask={**mask, "remask_threshold": 0.5})
    assert steps_hint in str(info.value)


def test_a_remask_threshold_is_taken_where_the_schedule_lets_it_act(llada_fp32):
    """Where a step between a block's first and last commits two tokens, tokens are remasked."""
    for steps, block, commits in ((12, 8, [2, 2, 1, 1, 1, 1]), (6, 8, [3, 3, 2]), (8, 16, [2] * 8)):
        settings = _settings(llada_fp32, steps=steps, block_length=block, remask_threshold=0.9)
        assert settings.can_remask and settings.commits_per_step() == commits
    got, _ = _run(llada_fp32, _prompts(4), steps=12, remask_threshold=0.9, record_drafts=True)
    mask = llada_fp32.mask_token_id
    assert any(
        a != mask and b == mask
        for r in got.values()
        for drafts in r.drafts
        for before, after in zip(drafts, drafts[1:], strict=False)
        for a, b in zip(before, after, strict=True)
    )
