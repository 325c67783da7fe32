"""Dream's algorithm (`sampler.mask.algorithm=dream`) against Dream's `diffusion_generate` as its description
gives it (tests/support/dream_reference.py), and the settings that choose it.

Faithfulness runs in float64 (model and reference): at temperature 0 without alg_temp the reference is
deterministic and canvasflow's completions equal it token for token; with random draws (origin, temperature,
alg_temp) the reference takes canvasflow's keyed numbers, so the comparison is of decisions, and the draws'
distributions are checked on their own against Dream's (a categorical draw, a multinomial draw without
replacement, a Bernoulli per position).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.kernels import rng
from pipeline.models.mask_checkpoint import load_mask_model
from pipeline.sampler.engine import Request
from pipeline.sampler.mask.decide import StepKeys, dream_transfer, filter_top_p
from pipeline.sampler.mask.engine import MaskDiffusionSampler
from pipeline.sampler.mask.settings import (
    MaskSettings,
    MaskSettingsError,
    read_mask_generation_config,
    resolve_mask_settings,
)
from tests.support.dream_reference import KeyedDraws, dream_generate
from tests.support.mask_models import ReferenceModel, build_mask_checkpoint, until_eos

EOS = 0
EOS_LIKE = {"llada": 28, "dream": 7}
RULE = {"maskgit_plus": "low_confidence", "topk_margin": "margin", "entropy": "entropy", "origin": "origin"}


@pytest.fixture(scope="module", params=["dream", "llada"])
def family_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "m"
    return build_mask_checkpoint(path, family=request.param, std=0.1, eos_like=EOS_LIKE[request.param])


def _prompts(count: int = 5, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(6, 100, (n,), generator=gen).tolist() for n in [3, 11, 1, 8, 14, 5][:count]]


def _compare(path, case: dict, *, keyed: bool) -> None:
    """canvasflow's Dream algorithm (one block, as Dream) vs the reference, both batchings."""
    model = load_mask_model(path).double()
    prompts = _prompts()
    knobs = {k: v for k, v in case.items() if k not in ("alg", "max_new_tokens", "steps")}
    expected = dream_generate(
        ReferenceModel(path), prompts, max_new_tokens=case["max_new_tokens"], steps=case["steps"],
        mask_id=model.mask_token_id, pad_id=EOS, alg=case["alg"], draws=KeyedDraws() if keyed else None,
        **knobs,
    )  # fmt: skip
    settings = MaskSettings(
        algorithm="dream", max_new_tokens=case["max_new_tokens"], steps=case["steps"],
        block_length=case["max_new_tokens"], remasking=RULE[case["alg"]], mask_token_id=model.mask_token_id,
        eos_token_ids=(EOS,), pad_token_id=EOS, **{k: v or 0.0 if k == "alg_temp" else v for k, v in knobs.items()},
    )  # fmt: skip
    for batching in ("continuous", "static"):
        sampler = MaskDiffusionSampler(model, settings, max_batch=3, max_prompt_tokens=16)
        got = {r.row_id: r for r in sampler.generate([Request(f"row-{i}", p) for i, p in enumerate(prompts)])}
        for i, tokens in enumerate(expected):
            result = got[f"row-{i}"]
            assert (result.token_ids, result.finish_reason) == until_eos(tokens, {EOS}), (batching, i)
            assert result.denoising_steps <= case["steps"]


@pytest.mark.parametrize(
    "case",
    [
        dict(alg="maskgit_plus", max_new_tokens=16, steps=16),
        dict(alg="topk_margin", max_new_tokens=16, steps=16),
        dict(alg="entropy", max_new_tokens=16, steps=16),
        dict(
            alg="entropy", max_new_tokens=12, steps=5, eps=0.05
        ),  # 0 to 4 tokens a step, the rest at the end
        dict(alg="maskgit_plus", max_new_tokens=12, steps=7, top_p=0.8),  # renormalised confidences
        dict(alg="topk_margin", max_new_tokens=16, steps=8, top_k=3),
    ],
    ids=["maskgit_plus", "topk_margin", "entropy", "entropy-eps", "top_p", "top_k"],
)
def test_completions_equal_dreams_diffusion_generate(family_dir, case):
    _compare(family_dir, case, keyed=False)


@pytest.mark.parametrize(
    "case",
    [
        dict(alg="origin", max_new_tokens=16, steps=8),
        dict(alg="origin", max_new_tokens=12, steps=6, temperature=0.7, top_p=0.9),
        dict(alg="entropy", max_new_tokens=16, steps=8, temperature=0.5, alg_temp=0.3),
        dict(alg="maskgit_plus", max_new_tokens=16, steps=16, temperature=1.0, top_k=5),
        dict(alg="topk_margin", max_new_tokens=12, steps=6, alg_temp=1.0),
    ],
    ids=["origin", "origin-sampled", "entropy-alg_temp", "maskgit_plus-sampled", "margin-alg_temp"],
)
def test_with_the_same_random_numbers_completions_equal_the_reference(family_dir, case):
    _compare(family_dir, case, keyed=True)


def _keys(rows: int, width: int, step: int = 0) -> StepKeys:
    return StepKeys(
        k0=torch.arange(rows, dtype=torch.int64) * 7919, k1=torch.arange(rows, dtype=torch.int64) + 11,
        block=torch.zeros(rows, dtype=torch.long), step=torch.full((rows,), step, dtype=torch.long),
        gen_positions=torch.arange(width).expand(rows, width),
    )  # fmt: skip


def _settings(width: int, steps: int, **knobs) -> MaskSettings:
    return MaskSettings(
        algorithm="dream", max_new_tokens=width, steps=steps, block_length=width, mask_token_id=0,
        eos_token_ids=(1,), pad_token_id=1, **knobs,
    )  # fmt: skip


def test_top_p_keeps_the_token_after_a_cumulative_probability_of_exactly_top_p():
    """Dream removes the tokens after the cumulative probability exceeds top_p (`> top_p`): two equal tokens
    of probability 0.5 both stay under top_p=0.5, as Dream's sample_tokens keeps them."""
    logits = torch.tensor([[0.0, 0.0, -1e4, -1e4]])
    assert torch.isfinite(filter_top_p(logits, 0.5)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_top_p(logits, 0.4)).tolist() == [[True, False, False, False]]


def test_alg_temp_draws_positions_as_dreams_multinomial_without_replacement():
    """Dream: torch.multinomial(softmax(confidence / alg_temp), k) without replacement. Over 4,000 keyed rows
    with the same confidences, each position's frequency among the k = 2 picks is within 4.5 standard
    errors of its exact probability p_i + sum_j p_j p_i / (1 - p_j)."""
    rows, width, alg_temp = 4000, 8, 0.5
    s = _settings(width, steps=2, eps=0.5, remasking="entropy", alg_temp=alg_temp)  # k = int(8 * 0.25) = 2
    conf = torch.tensor([-0.1, -0.3, -0.2, -0.9, -0.05, -0.6, -0.4, -0.25]).expand(rows, width)
    masked = torch.ones(rows, width, dtype=torch.bool)
    transfer = dream_transfer(conf, masked, torch.zeros(rows, dtype=torch.long), s, _keys(rows, width))
    assert transfer.sum(-1).eq(2).all()
    p = torch.softmax(conf[0].double() / alg_temp, dim=0)
    exact = p + torch.stack(
        [sum(p[j] * p[i] / (1 - p[j]) for j in range(width) if j != i) for i in range(width)]
    )
    freq = transfer.double().mean(0)
    bound = 4.5 * torch.sqrt(exact * (1 - exact) / rows)
    assert ((freq - exact).abs() < bound).all(), (freq, exact)
    # alg_temp -> 0 is the top-k of Dream's default: the two most confident, every row
    top = dream_transfer(
        conf, masked, torch.zeros(rows, dtype=torch.long), _settings(width, 2, eps=0.5), None
    )
    assert top[:, [0, 4]].all() and top.sum(-1).eq(2).all()


def test_origin_commits_each_masked_position_with_probability_1_minus_s_over_t():
    rows, width, steps = 500, 64, 4
    s = _settings(width, steps, remasking="origin")
    points = torch.linspace(1, 1e-3, steps + 1)
    masked = torch.rand(rows, width, generator=torch.Generator().manual_seed(0)) < 0.8
    for step in range(steps):
        transfer = dream_transfer(
            torch.zeros(rows, width), masked, torch.full((rows,), step), s, _keys(rows, width, step)
        )
        assert not (transfer & ~masked).any()
        if step == steps - 1:
            assert torch.equal(transfer, masked)  # the last step commits everything left
            continue
        p = float(1 - points[step + 1] / points[step])
        n = int(masked.sum())
        assert abs(int(transfer.sum()) / n - p) < 4.5 * math.sqrt(p * (1 - p) / n)
        assert len({tuple(row) for row in transfer[:50].tolist()}) > 40  # rows draw their own positions


def test_dreams_schedule_runs_block_by_block(family_dir):
    """Dream's schedule inside LLaDA-style blocks (block_length < max_new_tokens, which Dream itself does
    not have): no position beyond the current block is committed before the block is complete."""
    model = load_mask_model(family_dir).double()
    settings = MaskSettings(
        algorithm="dream", max_new_tokens=16, steps=8, block_length=8, remasking="entropy",
        mask_token_id=model.mask_token_id, eos_token_ids=(EOS,), pad_token_id=EOS, record_drafts=True,
    )  # fmt: skip
    sampler = MaskDiffusionSampler(model, settings, max_batch=3, max_prompt_tokens=16)
    results = sampler.generate([Request(f"row-{i}", p) for i, p in enumerate(_prompts())])
    mask = model.mask_token_id
    for r in results:
        first = r.drafts[0]
        assert all(token == mask for draft in first[:-1] for token in draft[8:])
        if len(first) == 4:  # the block's last step commits what is left (unless the row ended at EOS)
            assert mask not in first[-1][:8]
        if r.finish_reason == "length":
            assert r.canvases == 2 and r.denoising_steps == 8


TOKENS = dict(mask_token_id=2, eos_token_ids=(0,), pad_token_id=0)


def test_a_dream_model_defaults_to_dreams_algorithm_and_reads_dreams_generation_config(tmp_path):
    s = resolve_mask_settings({}, {}, family="dream", **TOKENS)
    assert (s.algorithm, s.remasking, s.eps, s.alg_temp, s.top_p, s.top_k, s.temperature) == (
        "dream", "origin", 1e-3, 0.0, None, None, 0.0,
    )  # fmt: skip
    assert (s.max_new_tokens, s.block_length, s.steps) == (128, 128, 128)  # one block, a token a step
    raw = {
        "alg": "entropy",
        "steps": 64,
        "max_new_tokens": 64,
        "top_p": 0.95,
        "temperature": 0.2,
        "top_k": None,
    }
    (tmp_path / "generation_config.json").write_text(json.dumps(raw))  # DreamGenerationConfig's key names
    config = read_mask_generation_config(str(tmp_path))
    s = resolve_mask_settings({}, config, family="dream", **TOKENS)
    assert (s.remasking, s.steps, s.block_length, s.top_p, s.temperature) == ("entropy", 64, 64, 0.95, 0.2)
    s = resolve_mask_settings({"remasking": "topk_margin", "alg_temp": 0.5}, config, family="dream", **TOKENS)
    assert (s.remasking, s.alg_temp) == ("margin", 0.5)
    s = resolve_mask_settings(
        {"remasking": "maskgit_plus", "block_length": 16}, config, family="dream", **TOKENS
    )
    assert (s.remasking, s.block_length, s.steps_per_block) == ("low_confidence", 16, 16)


def test_a_bad_alg_in_a_dream_generation_config_is_named_as_written(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"alg": "confidence_threshold"}))
    with pytest.raises(
        MaskSettingsError, match="generation_config.json: alg='confidence_threshold' is not one of"
    ):
        read_mask_generation_config(str(tmp_path))


def test_llada_ignores_a_dream_generation_config_and_refuses_dream_knobs_from_the_user():
    config = {"alg": "origin", "top_p": 0.9, "alg_temp": 0.1, "max_new_tokens": 64}
    s = resolve_mask_settings({"algorithm": "llada"}, config, family="dream", **TOKENS)
    assert (s.algorithm, s.remasking, s.top_p, s.alg_temp, s.block_length) == (
        "llada",
        "low_confidence",
        None,
        0,
        32,
    )
    s = resolve_mask_settings({}, {}, family="llada", **TOKENS)
    assert (s.algorithm, s.remasking, s.block_length) == ("llada", "low_confidence", 32)
    for key, value in (("top_p", 0.9), ("top_k", 5), ("alg_temp", 0.5), ("eps", 0.01)):
        with pytest.raises(
            MaskSettingsError,
            match=f"sampler.mask.{key}={value} is a setting of Dream's algorithm: set sampler.mask.algorithm=dream",
        ):
            resolve_mask_settings({key: value}, {}, family="llada", **TOKENS)
    with pytest.raises(MaskSettingsError, match="remasking='origin' is Dream's algorithm"):
        resolve_mask_settings({"remasking": "origin"}, {}, family="llada", **TOKENS)


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ({"algorithm": "maskgit"}, "sampler.mask.algorithm='maskgit' is not one of llada, dream"),
        ({"eps": 1.0}, r"sampler.mask.eps=1.0 must be a number in \[0, 1\)"),
        ({"top_p": 0.0}, r"sampler.mask.top_p=0.0 must be a number in \(0, 1\]"),
        ({"top_k": 0}, "sampler.mask.top_k=0 must be a positive integer"),
        ({"top_k": 2.5}, "sampler.mask.top_k=2.5 must be a positive integer"),
        ({"alg_temp": -1}, "sampler.mask.alg_temp=-1 must be a number >= 0"),
        ({"remasking": "confidence"}, "sampler.mask.remasking='confidence' is not one of"),
        ({"threshold": 0.9}, "which sampler.mask.remasking='origin' has none of"),
        ({"threshold": 0.9, "remasking": "margin", "alg_temp": 0.2}, "choose the positions to commit"),
        ({"threshold": 0.9, "remasking": "entropy"}, "negative entropy"),
    ],
)
def test_bad_dream_settings_are_refused_naming_the_key(user, message):
    with pytest.raises(MaskSettingsError, match=message):
        resolve_mask_settings(user, {}, family="dream", **TOKENS)


def test_keyed_uniforms_are_the_ones_the_draws_use():
    """rng.uniform is what the `random` rule always drew: ((word >> 9) + 0.5) / 2**23."""
    words = rng.position_state(torch.tensor([12345, 678], dtype=torch.int64), 64)
    expected = ((words >> 9).to(torch.float64) + 0.5) / 8388608.0
    assert torch.equal(rng.uniform(words).double(), expected)
