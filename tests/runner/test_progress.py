"""The progress line never counts past the rows there are, when retried shards report their rows again."""

from __future__ import annotations

import logging

from pipeline.runner.report import Progress


def test_retried_rows_do_not_push_progress_past_the_total(caplog):
    progress = Progress(total_rows=240, done_rows=40, interval_s=0.0)
    progress.committed_rows = 64
    # two workers' counts after a shard of 64 rows failed twice and was generated a third time
    progress.snapshot = {
        "w0": {"rows": 192, "tokens": 900, "steps": 1000},
        "w1": {"rows": 128, "tokens": 600, "steps": 700},
    }
    with caplog.at_level(logging.INFO, logger="canvasflow"):
        progress.tick(force=True)
    assert "progress: 240/240 rows (100.0%)" in caplog.text
    progress.snapshot = {"w0": {"rows": 10, "tokens": 50, "steps": 60}}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="canvasflow"):
        progress.tick(force=True)
    assert "progress: 104/240 rows (43.3%)" in caplog.text  # committed rows count when workers lag behind
