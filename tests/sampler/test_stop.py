"""Stop strings: a row ends at the first canvas (DiffusionGemma) or block (LLaDA) whose text holds one, with
the tokens it would have had without them, cut after the token that completes the stop string."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion

from pipeline import LLM
from pipeline.models.diffusion_gemma import DiffusionGemmaTextModel
from pipeline.models.loader import load_tokenizer, resolve_model_dir
from pipeline.models.mask_checkpoint import load_mask_model
from pipeline.sampler.engine import DiffusionSampler, Request
from pipeline.sampler.mask.engine import MaskDiffusionSampler
from pipeline.sampler.mask.settings import MaskSettings
from pipeline.sampler.stop import MAX_STOP_CHARS, MAX_STOPS, StopStrings, check_stops, stop_token_ids
from tests.support.mask_models import build_mask_checkpoint
from tests.support.models import build_checkpoint, sampler_settings

LENGTH = 8  # DiffusionGemma canvas / LLaDA block
CANVASES = 4


def _decode(ids: list[int]) -> str:
    """Text in which every token is visible: stop strings of one or more tokens."""
    return "".join(f"<{t}>" for t in ids)


def _requests(count: int = 12) -> list[Request]:
    gen = torch.Generator().manual_seed(3)
    return [
        Request(
            f"row-{i}",
            torch.randint(7, 120, (int(torch.randint(1, 20, (1,), generator=gen)),), generator=gen).tolist(),
        )
        for i in range(count)
    ]


def _stop_for(results: dict, rows: int) -> str:
    """A two-token stop string found past the first canvas of some rows' completions but not in every row."""
    counts: dict[str, int] = {}
    for tokens, *_ in results.values():
        for pair in {_decode(tokens[i : i + 2]) for i in range(LENGTH, len(tokens) - 1)}:
            counts[pair] = counts.get(pair, 0) + 1
    pair = max((p for p, n in counts.items() if n < rows), key=lambda p: counts[p])
    assert counts[pair] >= 2, "the workload has a stop string that some rows hold"
    return pair


def _expected(tokens: list[int], stop: StopStrings) -> tuple[list[int], int] | None:
    """The tokens kept and the blocks run when the row stops, from its completion without stop strings."""
    keep = stop(tokens)
    return None if keep is None else (tokens[:keep], (keep - 1) // LENGTH + 1)


def _check(base: dict, stopped: dict, stop: StopStrings) -> int:
    """Rows without the stop string are unchanged; rows with it end where it first appears. Returns those."""
    ended = 0
    for row_id, (tokens, steps, blocks, reason) in base.items():
        expected = _expected(tokens, stop)
        if expected is None:
            assert stopped[row_id] == (tokens, steps, blocks, reason), row_id
            continue
        ended += 1
        got_tokens, got_steps, got_blocks, got_reason = stopped[row_id]
        assert (got_tokens, got_blocks, got_reason) == (*expected, "stop"), row_id
        assert got_steps <= steps and (got_steps == steps) == (got_blocks == blocks), row_id
    return ended


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("stop") / "m", canvas_length=LENGTH, sharpness=4.0)
    return DiffusionGemmaTextModel(DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval())


def _gemma_sampler(model, stop):
    settings = sampler_settings(LENGTH, max_new_tokens=CANVASES * LENGTH)
    return DiffusionSampler(model, settings, max_batch=5, max_prompt_tokens=32, backend="torch", stop=stop)


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    path = build_mask_checkpoint(tmp_path_factory.mktemp("stop-llada") / "m", family="llada", std=0.1)
    return load_mask_model(path)


def _llada_sampler(model, stop):
    settings = MaskSettings(
        max_new_tokens=CANVASES * LENGTH,
        steps=CANVASES * LENGTH // 2,
        block_length=LENGTH,
        mask_token_id=model.mask_token_id,
        eos_token_ids=(0,),
        pad_token_id=0,
    )
    return MaskDiffusionSampler(
        model, settings, max_batch=5, max_prompt_tokens=20, backend="torch", stop=stop
    )


# family -> (sampler builder, the counter of rows computed)
SAMPLERS = {"gemma": (_gemma_sampler, "decoder_row_steps"), "llada": (_llada_sampler, "row_forwards")}


def _run(build, model, requests, batching, stop=None):
    sampler = build(model, stop)
    results = sampler.generate(requests, batching=batching)
    return {r.row_id: (r.token_ids, r.denoising_steps, r.canvases, r.finish_reason) for r in results}, sampler


@pytest.mark.parametrize("batching", ["continuous", "static"])
@pytest.mark.parametrize("family", ["gemma", "llada"])
def test_rows_end_at_the_canvas_or_block_holding_the_stop_string(request, family, batching):
    """DiffusionGemma rows end at the canvas, LLaDA rows at the block, that holds the stop string."""
    model, (build, computed) = request.getfixturevalue(family), SAMPLERS[family]
    requests = _requests()
    base, plain = _run(build, model, requests, batching)
    if family == "gemma":
        assert sum(r[2] == CANVASES for r in base.values()) >= 4, "rows that run every canvas without a stop"
    stop = StopStrings([_stop_for(base, len(requests))], _decode)
    stopped, sampler = _run(build, model, requests, batching, stop)
    assert _check(base, stopped, stop) >= 2
    if batching == "continuous":  # rows that stop leave the batch: fewer rows computed
        assert getattr(sampler.stats, computed) < getattr(plain.stats, computed)


def test_stop_strings_on_a_real_tokenizer_keep_the_fewest_tokens_and_cut_the_text():
    tokenizer = load_tokenizer(resolve_model_dir("builtin:tiny-diffusiongemma"))
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    ids = tokenizer("Sort: 3 1 2 and then 9 8", add_special_tokens=False)["input_ids"]
    stop = StopStrings(["and", "2 a"], decode)
    keep = stop(ids)
    assert (
        "2 a" in decode(ids[:keep])
        and "2 a" not in decode(ids[: keep - 1])
        and "and" not in decode(ids[: keep - 1])
    )
    assert stop.cut(decode(ids)) == "Sort: 3 1 "
    assert stop(ids[: keep - 1]) is None and StopStrings(["zz"], decode)(ids) is None


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_a_stop_string_that_is_a_special_token_ends_the_row_at_that_token(gemma, batching):
    """Completions are decoded without special tokens, so "<end_of_turn>" never matched in the text: it is
    matched as its token id, and a row ends at its first one (kept, as vLLM keeps a stop token id)."""
    tokenizer = load_tokenizer(
        resolve_model_dir("builtin:tiny-diffusiongemma")
    )  # the checkpoint's vocabulary
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    special = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    requests = _requests()
    base, _ = _run(_gemma_sampler, gemma, requests, batching)
    stop = StopStrings(["<end_of_turn>"], decode, stop_token_ids(["<end_of_turn>"], tokenizer))
    stopped, _ = _run(_gemma_sampler, gemma, requests, batching, stop)
    ended = 0
    for row_id, (tokens, _steps, _canvases, reason) in base.items():
        if special not in tokens:
            assert stopped[row_id][0] == tokens and stopped[row_id][3] == reason, row_id
            continue
        ended += 1
        kept = tokens[: tokens.index(special) + 1]
        assert (stopped[row_id][0], stopped[row_id][3]) == (kept, "stop"), row_id
        assert stop.cut(decode(kept)) == decode(kept[:-1])
    assert ended >= 2 and special not in kept[:2], "rows of the workload that emit <end_of_turn>"
    # A stop string in the text before the stop token ends the row there.
    both = StopStrings(["<end_of_turn>", decode(kept[:2])], decode, {"<end_of_turn>": special})
    assert both(kept) == len(kept[:2]) and both(kept[:-1] + [999]) == 2


def test_a_stop_string_holding_a_special_token_among_text_is_refused():
    tokenizer = load_tokenizer(resolve_model_dir("builtin:tiny-diffusiongemma"))
    assert stop_token_ids(["</a>", "<end_of_turn>", "<eos>"], tokenizer) == {"<end_of_turn>": 6, "<eos>": 1}
    with pytest.raises(ValueError) as e:
        stop_token_ids(["x", "</a><end_of_turn>"], tokenizer)
    assert str(e.value).startswith(
        "sampler.stop[1]='</a><end_of_turn>' holds the special token '<end_of_turn>', which is not in a "
        "completion's text (decoded without special tokens), so it never matches: give '<end_of_turn>' as a "
        "stop string of its own"
    )
    with pytest.raises(ValueError, match=r"^stop\[0\]='</a><eos>' holds the special token '<eos>'"):
        LLM(max_new_tokens=8, stop=["</a><eos>"])


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_a_stop_string_past_max_new_tokens_does_not_end_the_row(gemma, batching):
    """max_new_tokens=26 with 8-token canvases: tokens 26-31 of the last canvas are cut off, so a stop string
    found only there neither ends the row ("length", not "stop") nor keeps tokens past max_new_tokens."""
    requests = _requests(6)

    def run(max_new_tokens, stop=None):
        settings = sampler_settings(LENGTH, max_new_tokens=max_new_tokens, eos_token_ids=())
        sampler = DiffusionSampler(
            gemma, settings, max_batch=3, max_prompt_tokens=32, backend="torch", stop=stop
        )
        return {
            r.row_id: (r.token_ids, r.finish_reason) for r in sampler.generate(requests, batching=batching)
        }

    full, cut = run(CANVASES * LENGTH), run(CANVASES * LENGTH - 6)
    row, tokens = next((k, v[0]) for k, v in full.items() if set(v[0][26:]) - set(v[0][:26]))
    late = next(t for t in tokens[26:] if t not in tokens[:26])
    assert cut[row] == (tokens[:26], "length")
    assert run(CANVASES * LENGTH - 6, StopStrings([_decode([late])], _decode))[row] == cut[row]


def test_stop_strings_keep_the_fewest_tokens_up_to_the_last_one_and_accept_the_limits():
    """The stop string may end with the row's last token; MAX_STOPS strings of MAX_STOP_CHARS are allowed."""
    tokens = [3, 4, 5]
    assert [StopStrings([s], _decode)(tokens) for s in ("<3>", "<4><5>", "<5>", "<6>")] == [1, 3, 3, None]
    assert len(check_stops(["x" * MAX_STOP_CHARS] * MAX_STOPS)) == MAX_STOPS


@pytest.mark.parametrize(
    "value, message",
    [
        ({"a": 1}, "sampler.stop={'a': 1} must be a string or a list of strings"),
        ([""], "sampler.stop[0]='' must be a non-empty string"),
        (["a", 3], "sampler.stop[1]=3 must be a non-empty string: quote it, sampler.stop=['3']"),
        (["a", None], "sampler.stop[1]=None must be a non-empty string"),
        (["x"] * 17, "sampler.stop has 17 strings; at most 16"),
    ],
)
def test_bad_stop_strings_are_refused_naming_them(value, message):
    with pytest.raises(ValueError) as e:
        check_stops(value)
    assert str(e.value).startswith(message)


def test_the_api_cuts_the_completion_before_the_stop_string():
    prompts = ["Add: 731+770", "Sort: 3 1 2 9 4"]
    plain = LLM(max_new_tokens=32).generate(prompts)
    first = plain[1].completion  # "1 2 3 4 9" from the shipped model
    stop = first.split()[2]
    stopped = LLM(max_new_tokens=32, stop=[f" {stop}"]).generate(prompts)
    assert stopped[1].completion == first[: first.index(f" {stop}")] and stopped[1].finish_reason == "stop"
    assert stopped[1].completion_tokens < plain[1].completion_tokens
    assert (stopped[0].completion, stopped[0].finish_reason) == (plain[0].completion, plain[0].finish_reason)


def test_the_job_takes_a_string_or_a_list_and_its_stop_strings_are_part_of_the_run_identity(tmp_path, caplog):
    from hydra import compose, initialize_config_dir

    from pipeline.config import register_configs, to_job_config
    from pipeline.config.schema import ConfigError
    from pipeline.runner.plan import plan

    register_configs()

    def job(*overrides):
        with initialize_config_dir(
            config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"
        ):
            cfg = compose("config", overrides=[f"output.uri={tmp_path}", *overrides])
        return plan(to_job_config(cfg))

    plain, one, listed = job(), job("sampler.stop=Question:"), job("sampler.stop=[Question:]")
    assert "stop" not in plain.settings and plain.spec.stop == ()
    assert one.spec.stop == listed.spec.stop == ("Question:",) and one.settings["stop"] == ["Question:"]
    assert one.run_id == listed.run_id != plain.run_id, "another stop string, another run"
    with caplog.at_level("WARNING", logger="canvasflow"):
        escaped = job("sampler.stop=[Q,'\\n']")
    assert escaped.spec.stop == ("Q", "\\n") and "holds a backslash and a letter" in caplog.text
    with pytest.raises(ConfigError, match=r"sampler.stop\[0\]='A:<end_of_turn>' holds the special token"):
        job("sampler.stop=['A:<end_of_turn>']")
