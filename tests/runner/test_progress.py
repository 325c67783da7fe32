"""The progress line counts the rows of committed shards and of the latest attempt of the others: never those
of failed attempts, which are generated again (it showed 100% and ETA 0:00:00 while a shard was retried)."""

from __future__ import annotations

import logging

from pipeline.runner.report import Progress
from pipeline.runner.worker import ProgressBoard


def test_rows_of_failed_attempts_are_not_counted(caplog):
    # 240 rows in shards of 64 (the last of 48), 40 of them done before this invocation; shard 0 committed.
    progress = Progress(total_rows=240, done_rows=40, interval_s=0.0)
    progress.shard_done(0, 64)
    board = ProgressBoard()
    board.report("w0", 64, 300, 400, 64, shards={(0, 1): 64})  # shard 0, committed since
    board.report("w0", 64, 300, 400, 64, shards={(1, 1): 60, (2, 1): 4})
    board.report("w1", 60, 300, 400, 60, shards={(1, 2): 30, (3, 1): 30})  # shard 1 failed and was retried
    board.report("w1", 0, 0, 0, 0, shards={(1, 1): 3})  # a late report of its failed attempt
    snapshot = board.snapshot()
    assert snapshot["shards"] == {0: 64, 1: 30, 2: 4, 3: 30}
    progress.snapshot, progress.shards = snapshot["workers"], snapshot["shards"]
    with caplog.at_level(logging.INFO, logger="canvasflow"):
        progress.tick(force=True)
    # 40 before + 64 committed + 30 + 4 + 30 running, where the workers' sums (128 + 60) made 100%
    assert "progress: 168/240 rows (70.0%)" in caplog.text and "w0: 128 rows, w1: 60 rows" in caplog.text
    progress.shards = {1: 200}  # more than is left (never expected): at most the total
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="canvasflow"):
        progress.tick(force=True)
    assert "progress: 240/240 rows (100.0%)" in caplog.text


def test_a_workers_busy_time_counts_shards_held_together_once_and_includes_their_commits():
    from pipeline.runner.report import _per_worker

    def commit(worker, started_at, committed_at, wall_s, tokens=100):
        return {"worker": worker, "rows": 1, "error_rows": 0, "tokens": tokens, "wall_s": wall_s,
                "started_at": started_at, "committed_at": committed_at}  # fmt: skip

    # w0 held two shards from 100-110 s and 104-112 s (their generation ended at 109 and 111 s, the commits
    # took 1 s); w1's marker predates started_at (0): its span is committed_at - wall_s.
    stats = _per_worker(
        [commit("w0", 100.0, 110.0, 9.0), commit("w0", 104.0, 112.0, 7.0), commit("w1", 0.0, 120.0, 5.0)]
    )
    assert stats["w0"]["busy_s"] == 12.0 and stats["w0"]["tokens_per_s"] == round(200 / 12, 2)
    assert stats["w1"]["busy_s"] == 5.0


def test_passes_are_counted_per_completion(caplog):
    progress = Progress(total_rows=10, done_rows=0, interval_s=0.0, completions=4)
    # 10 completions sampled, each reported as a quarter row, 60 decoder passes in all; and on w1 a row rejected
    # before sampling (a whole row, no completion)
    progress.snapshot = {
        "w0": {"rows": 1.5, "tokens": 90, "steps": 36, "sampled": 6},
        "w1": {"rows": 2.0, "tokens": 60, "steps": 24, "sampled": 4},
    }
    progress.shards = {0: 1.5, 1: 2.0}
    with caplog.at_level(logging.INFO, logger="canvasflow"):
        progress.tick(force=True)
    assert "progress: 3/10 rows (30.0%)" in caplog.text and "| 6.0 passes/completion |" in caplog.text


def test_a_workers_rows_count_whole_rows_with_several_completions_per_prompt(caplog):
    """data.limit=8 sampler.completions_per_prompt=3 on one worker ended on "progress: 8/8 rows ... | w0: 7 rows":
    the worker reports each completion as 1/3 of a row, and the 24 float shares sum to just under 8."""
    progress = Progress(total_rows=8, done_rows=0, interval_s=0.0, completions=3)
    board = ProgressBoard()
    share = 1 / 3
    for _ in range(24):  # as ShardWorker reports them: a share per completion
        board.report("w0", share, 5, 2, 1, shards={(0, 1): share})
    snapshot = board.snapshot()
    progress.snapshot, progress.shards = snapshot["workers"], snapshot["shards"]
    with caplog.at_level(logging.INFO, logger="canvasflow"):
        progress.final()
    assert "progress: 8/8 rows (100.0%)" in caplog.text and "| w0: 8 rows" in caplog.text


def test_the_last_line_is_not_repeated_when_nothing_moved_since(caplog):
    progress = Progress(total_rows=8, done_rows=0, interval_s=0.0)
    progress.snapshot = {"w0": {"rows": 8, "tokens": 40, "steps": 30, "sampled": 8}}
    progress.shards = {0: 8}
    with caplog.at_level(logging.INFO, logger="canvasflow"):
        progress.tick()
        progress.final()  # the run's end, right after a line with the same rows and tokens
    assert caplog.text.count("progress: 8/8 rows") == 1
    progress.snapshot["w0"]["tokens"] = 44  # a row's tokens reported after the last line
    with caplog.at_level(logging.INFO, logger="canvasflow"):
        progress.final()
    assert caplog.text.count("progress: 8/8 rows") == 2


def test_sampler_summary_reads_each_samplers_counters():
    from pipeline.runner.report import _sampler_line, sampler_summary

    assert sampler_summary({}, 10, 8) is None, "no worker answered"
    gemma = {"decoder_calls": 10, "decoder_row_steps": 64, "encoder_calls": 3, "encoder_tokens": 96,
             "prompt_tokens_shared": 32, "workers": 2}  # fmt: skip
    summary = sampler_summary(gemma, 60, 8)
    assert summary["live_rows_per_pass"] == 6.0 and summary["computed_rows_per_pass"] == 6.4
    assert (
        "10 batched passes, 6.0 live rows per pass of sampler.batch_size=8 (6.4 computed)"
        in _sampler_line(summary)
    )
    assert "96 tokens encoded, 32 copied" in _sampler_line(summary)
    mask = {"steps": 4, "step_rows": 16, "forward_calls": 6, "row_forwards": 16, "query_tokens": 200,
            "valid_query_tokens": 150,
            "attention_pairs": 0, "head_tokens": 0, "valid_attention_pairs": 0, "workers": 1}  # fmt: skip
    summary = sampler_summary(mask, 16, 4)
    assert summary["live_rows_per_pass"] == 4.0, "rows per sampler step, not per forward (a step may run two)"
    assert summary["valid_token_share"] == 0.75 and "75% of the tokens computed" in _sampler_line(summary)
    idle = sampler_summary({"decoder_calls": 0, "decoder_row_steps": 0, "workers": 1}, 0, 8)
    assert "live_rows_per_pass" not in idle and _sampler_line(idle) is None, "a worker that ran nothing"


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _line_at(progress, clock, t, rows, caplog) -> str:
    clock.now = 1000.0 + t
    progress.snapshot = {"w0": {"rows": rows, "tokens": 10 * rows, "steps": 5 * rows, "sampled": rows}}
    progress.shards = {0: rows}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="canvasflow"):
        progress.tick(force=True)
    return caplog.text


def test_the_eta_follows_the_last_window_and_a_stall_shows(caplog):
    """A run stalled at 2960/3000 rows (a node lost with two shards) showed ETA 0:00:07 for minutes: the ETA came
    from the average since the start, 40 rows at the run's 6 rows/s."""
    clock = _Clock()
    progress = Progress(total_rows=3000, done_rows=0, interval_s=5.0, completions=1, clock=clock)
    assert progress.window_s == 120.0
    # 2 minutes of start-up (model load), then 20 rows/s for 148 s
    assert "ETA - |" in _line_at(progress, clock, 60, 0, caplog), "no row yet: no rate"
    assert "no row done for" not in _line_at(progress, clock, 100, 0, caplog), "within the first window"
    text = _line_at(progress, clock, 125, 0, caplog)
    assert "ETA - (no row done for 0:02:05)" in text, "start-up that takes longer than the window"
    for t in range(130, 270, 5):
        _line_at(progress, clock, t, 20 * (t - 122), caplog)
    text = _line_at(progress, clock, 270, 2960, caplog)
    # the window's rate (20 rows/s), not the average since the start (11 rows/s): 2 s left, not 4
    assert "progress: 2960/3000 rows (98.7%) | 10.96 rows/s" in text and "ETA 0:00:02 |" in text, text
    assert "no row done" not in text
    # then nothing moves: the ETA grows as the window's rate falls, then gives way to the stall
    assert "ETA 0:00:04 |" in _line_at(progress, clock, 330, 2960, caplog)
    assert "ETA - (no row done for 0:02:00)" in _line_at(progress, clock, 390, 2960, caplog)
    assert "ETA - (no row done for 0:08:30)" in _line_at(progress, clock, 780, 2960, caplog)
    text = _line_at(progress, clock, 785, 2962, caplog)  # rows again: the stall note goes
    # the window's base is the line at 390 s (the last at or before its start): 38 rows at 2 rows in 395 s
    assert "no row done" not in text and "ETA 2:05:05 |" in text, text
    assert "no row done" not in _line_at(progress, clock, 1100, 3000, caplog), "done: no stall"
