"""bench_generate.py's mask-diffusion section runs on the CPU and reports what the issue asks for: forward
FLOPs saved and speed-up of the block caches over the exact path."""

from argparse import Namespace

import pytest

from benchmarks.generate_mask import mask_spec, run_mask_bench


@pytest.mark.parametrize("family, rule", [("llada", "low_confidence"), ("dream", "entropy")])
def test_mask_bench_reports_flops_saved_by_each_cache(capsys, family, rule):
    args = Namespace(
        family=family, shape="tiny", device="cpu", batches=[3], canvas=16, block=8, steps=8, prompt=11
    )
    records = run_mask_bench(args, rate=None)
    assert {(r["algorithm"], r["remasking"]) for r in records} == {(family, rule)}, (
        "the family's own algorithm"
    )
    by_cache = {r["cache"]: r for r in records}
    assert list(by_cache) == ["none", "prefix", "dual"]
    assert by_cache["none"]["flops_saved"] == 0 and by_cache["none"]["same_as_exact"] == 1
    # the exact path recomputes prompt + 16 tokens at each of 8 steps; prefix skips the prompt after a block's
    # first step, dual computes only the block
    assert 0 < by_cache["prefix"]["flops_saved"] < by_cache["dual"]["flops_saved"] < 1
    assert all(r["passes_per_row"] == 8 and r["steps"] == 8 for r in records)
    table = capsys.readouterr().out
    assert "saved" in table and "dual" in table


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_published_full_shapes(family):
    spec = mask_spec(family, "full")
    params = spec.linear_params() + 2 * spec.vocab_size * spec.hidden_size
    assert 6.5e9 < params < 8.5e9  # LLaDA-8B, Dream-7B (7.6B)
    assert spec.mask_token_id == {"llada": 126_336, "dream": 151_666}[family]
    with pytest.raises(ValueError, match="huge"):
        mask_spec(family, "huge")
