"""run.dry_run=true: every start-up check, then what the run would do (new run or resume, rejected rows, the
first prompt as rendered for the model, prompt lengths); nothing written, no lock taken, no worker started."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import socket
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.config.schema import (
    ClusterConfig,
    DataConfig,
    JobConfig,
    ModelConfig,
    NightlyConfig,
    NightlyJobConfig,
    OutputConfig,
    RunConfig,
)
from pipeline.data.prompts import prompt_ids
from pipeline.io.commit import RUN_LOCK, SUCCESS
from pipeline.io.lease import Lease
from pipeline.models.loader import load_tokenizer, resolve_model_dir
from pipeline.runner.job import prepare, run
from pipeline.runner.nightly import run_nightly
from pipeline.runner.plan import plan

SYSTEM = "Answer with the number only."


def _input(tmp_path: Path) -> Path:
    lines = [json.dumps({"question": f"Add: {i}+{2 * i}"}) for i in range(9)]
    lines[2] = "{not json"
    lines[4] = json.dumps({"question": ""})
    lines[6] = json.dumps({"question": "Add: " + "1+" * 400 + "1"})  # longer than max_prompt_tokens
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _job(tmp_path: Path, **run) -> JobConfig:
    return JobConfig(
        model=ModelConfig(max_prompt_tokens=64),
        data=DataConfig(path=str(_input(tmp_path)), prompt_column="question", system_prompt=SYSTEM),
        output=OutputConfig(uri=str(tmp_path / "out")),
        cluster=ClusterConfig(num_workers=1),
        run=RunConfig(shard_size=3, **run),
    )


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_a_dry_run_reports_the_plan_and_writes_nothing(tmp_path, caplog):
    job = _job(tmp_path, dry_run=True)
    with caplog.at_level("INFO", logger="canvasflow"):
        assert run(job) == 0
    log = caplog.text
    assert "a new run; all 3 shard(s) to generate" in log
    assert "nothing is written and no worker is started" in log
    assert "starting a local Ray instance" not in log
    assert not (tmp_path / "out").exists(), "no object, not even the output folder"
    run_id = plan(_job(tmp_path)).run_id  # the run id of the same job without dry_run: dry_run is no identity
    assert f"run {run_id} at " in log

    # the rows rejected while reading, quoted with their reasons
    assert "input row 2: " in log and "malformed JSON" in log
    assert "input row 4: prompt (column 'question') is empty" in log
    # the first prompt rendered as the workers render it: chat template with the system turn
    tokenizer = load_tokenizer(resolve_model_dir("builtin:tiny-diffusiongemma"))
    ids = prompt_ids(tokenizer, "Add: 0+0", is_chat=False, apply_chat_template=True, system_prompt=SYSTEM)
    assert "first prompt as the model sees it (row " in log and f", {len(ids)} tokens):" in log
    assert SYSTEM in log and "Add: 0+0" in log
    # lengths over the 7 readable prompts; the long one is counted against model.max_prompt_tokens
    assert "prompt tokens over the 7 prompt(s):" in log
    assert "1 of the 7 prompt(s) have more than model.max_prompt_tokens=64 tokens" in log
    assert "7 prompt(s) x 1 completion(s) = 7 completion(s) at most, in 3 shard(s) of 3 row(s)" in log
    assert "1 worker(s) on this machine (cluster.mode=local), 2 shard(s) in flight each" in log


def test_a_dry_run_of_a_started_run_says_how_much_is_left_and_who_holds_it(tmp_path, caplog):
    prep = prepare(_job(tmp_path))  # a started run: _run.json and _config.yaml written
    schema = pa.schema([("id", pa.string())])
    prep.run_store.commit_shard(
        0,
        schema.empty_table(),
        [],
        compression="zstd",
        stats={},
        worker="w0",
        attempt=1,
    )
    root = tmp_path / "out" / prep.run_id
    lease = Lease(prep.run_store.store, RUN_LOCK, secrets.token_hex(8), prep.run_id, 120.0)
    lease.acquire()  # a live process writing the run
    try:
        before = _tree(root)
        job = _job(tmp_path, dry_run=True)
        job.output.compression = "snappy"  # not applied to a run started with zstd (job.keep_run_codec)
        with caplog.at_level("INFO", logger="canvasflow"):
            assert run(job) == 0
        assert _tree(root) == before
        held = json.loads((root / RUN_LOCK).read_text())
    finally:
        lease.release()
    assert "resumes: 1 of 3 shard(s) committed; its parts keep the codec it started with, zstd" in caplog.text
    assert "; 2 to generate" in caplog.text
    assert (
        f"is held by a live process (host {socket.gethostname()}, pid {os.getpid()}; heartbeat "
        in caplog.text
    )
    assert "refused (exit code 2) until it ends" in caplog.text

    ended = subprocess.Popen(["true"])  # the lock of a process of this host that has ended
    ended.wait()
    (root / RUN_LOCK).write_text(json.dumps({**held, "pid": ended.pid}))
    caplog.clear()
    with caplog.at_level("INFO", logger="canvasflow"):
        assert run(_job(tmp_path, dry_run=True)) == 0
    assert f"pid {ended.pid}, which has ended: a real run takes it over" in caplog.text
    assert "live process" not in caplog.text
    (root / RUN_LOCK).unlink()

    for shard in (1, 2):  # a complete run has every shard's marker
        prep.run_store.commit_shard(
            shard, schema.empty_table(), [], compression="zstd", stats={}, worker="w0", attempt=1
        )
    (root / SUCCESS).write_text("")
    caplog.clear()
    with caplog.at_level("INFO", logger="canvasflow"):
        assert run(_job(tmp_path, dry_run=True)) == 0
    # _SUCCESS without the final files (deleted, or a copy cut short): a real run writes them again
    assert (
        "complete (_SUCCESS present): all 3 shard(s) committed, but _manifest.json, stats.json, README.md are "
        "missing: the run would write _manifest.json, stats.json and README.md again from the commit markers"
    ) in caplog.text
    assert "no worker to start" in caplog.text
    with caplog.at_level("INFO", logger="canvasflow"):
        assert run(_job(tmp_path)) == 0  # the repair the dry run announced; no worker started
    caplog.clear()
    with caplog.at_level("INFO", logger="canvasflow"):
        assert run(_job(tmp_path, dry_run=True)) == 0
    assert "complete (_SUCCESS present): all 3 shard(s) committed, nothing to do" in caplog.text


def test_a_dry_run_into_folders_that_do_not_exist_yet_creates_none(tmp_path):
    job = _job(tmp_path, dry_run=True)
    job.output.uri = str(tmp_path / "deep" / "a" / "b")
    assert run(job) == 0
    assert not (tmp_path / "deep").exists()
    (tmp_path / "file").write_text("")
    job.output.uri = str(tmp_path / "file" / "out")  # a file in the way: refused as the run is
    assert run(job) == 2


def test_a_dry_run_fails_at_start_up_like_the_run(tmp_path, caplog):
    job = _job(tmp_path, dry_run=True)
    job.data.prompt_column = "absent"
    assert run(job) == 2
    assert "absent" in caplog.text
    assert not (tmp_path / "out").exists() or _tree(tmp_path / "out") == {}


@pytest.mark.parametrize("late", [False, True])
def test_a_nightly_dry_run_takes_no_lock_moves_no_pointer_and_deletes_nothing(tmp_path, caplog, late):
    out = tmp_path / "out"
    for night in ("nightly-2026-10-01", "nightly-2026-11-01"):  # complete nights, LATEST on the newer one
        (out / night).mkdir(parents=True)
        (out / night / SUCCESS).write_text("")
    (out / "LATEST").write_text(json.dumps({"run_id": "nightly-2026-11-01"}))
    job = NightlyJobConfig(
        data=DataConfig(path=str(_input(tmp_path)), prompt_column="question"),
        output=OutputConfig(uri=str(out)),
        cluster=ClusterConfig(num_workers=1),
        run=RunConfig(dry_run=True),
    )
    date = "2026-10-30" if late else "2026-11-30"
    before = _tree(out)
    with caplog.at_level("INFO", logger="canvasflow"):
        code = run_nightly(job, NightlyConfig(date=date, retention_days=7, allow_late=late))
    assert code == 0
    assert _tree(out) == before, "no lock, no LATEST, no run directory, nothing removed"
    assert f"run nightly-{date} at " in caplog.text
    assert "retention: would remove nightly-2026-10-01 (older than 7 days)" in caplog.text
    # After a night completes LATEST names it, and retention spares LATEST's night: a backfill leaves LATEST
    # on 2026-11-01; a new night moves it off 2026-11-01, which is then older than the cutoff.
    assert ("would remove nightly-2026-11-01" in caplog.text) is not late


DROPS_SYSTEM = (
    "{% for m in messages if m['role'] != 'system' %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@pytest.mark.s3
def test_an_s3_model_is_checked_and_its_prompts_rendered_from_its_tokenizer_files_alone(
    tmp_path, s3_bucket, caplog
):
    """Only the config, tokenizer and chat-template files are read at start-up (the weights stay on S3, no model
    cache is made); with them the dry run renders and counts the prompts, and a system prompt the model's chat
    template drops is refused before anything runs (exit 2), not when every worker loads the model."""
    model_dir = Path(resolve_model_dir("builtin:tiny-diffusiongemma"))
    for file in model_dir.iterdir():
        if file.is_file():
            s3_bucket.put(f"models/tiny/{file.name}", file.read_bytes())
    cache = tmp_path / "model-cache"

    def job(**data) -> JobConfig:
        return JobConfig(
            model=ModelConfig(path=f"{s3_bucket.uri}/models/tiny", cache_dir=str(cache)),
            data=DataConfig(path=str(_input(tmp_path)), prompt_column="question", **data),
            output=OutputConfig(uri=str(tmp_path / "out"), endpoint_url=s3_bucket.endpoint),
            run=RunConfig(dry_run=True),
        )

    with caplog.at_level("INFO", logger="canvasflow"):
        assert run(job(system_prompt=SYSTEM)) == 0
    assert SYSTEM in caplog.text and "prompt tokens over the 7 prompt(s):" in caplog.text
    assert not cache.exists(), "the weights were not downloaded"

    s3_bucket.put("models/tiny/chat_template.jinja", DROPS_SYSTEM.encode())
    caplog.clear()
    with caplog.at_level("INFO", logger="canvasflow"):
        assert run(dataclasses.replace(job(system_prompt=SYSTEM), run=RunConfig())) == 2
    assert "this model's chat template drops system turns" in caplog.text
    assert "reading input" not in caplog.text and not cache.exists()


def test_the_length_sample_is_spread_evenly_over_the_rows_without_an_error():
    from pipeline.runner.dry_run import _sample_indices

    # two chunks, as a spilled record table has; every third row rejected
    errors = pa.chunked_array([["bad" if i % 3 == 0 else None for i in range(n, n + 50)] for n in (0, 50)])
    good = [i for i in range(100) if i % 3]
    assert _sample_indices(errors, 10) == [good[int(i * len(good) / 10)] for i in range(10)]
    assert _sample_indices(errors, 1000) == good
    clean = pa.chunked_array([pa.nulls(30, pa.string()), pa.nulls(20, pa.string())])
    assert _sample_indices(clean, 5) == [0, 10, 20, 30, 40]
