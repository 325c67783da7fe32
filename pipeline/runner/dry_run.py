"""`run.dry_run=true`: every start-up check of a real run, then what the run would do, and nothing else.

The plan (pipeline/runner/plan.py) has read the whole input, resolved the sampler settings against the model's
generation config and found the run id and its state. This module reports them, with what a user checks before
spending GPU hours on a job: whether it starts a new run or resumes one (and how much is left), the rows that
will be rejected, the first prompt exactly as the model will see it (chat template, system prompt, template),
and the prompt lengths in tokens against the model's budget, from a sample (an s3:// model's tokenizer files are
downloaded for it, not its weights). It writes nothing (the output location is checked for write access
without an object or a folder being made), takes no lock and starts no Ray worker.
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

import pyarrow.compute as pc

from pipeline.data.prompts import (
    CHARS_BOUND_FACTOR,
    PromptTooLong,
    max_token_chars,
    prompt_ids,
    render_prompt,
)
from pipeline.io.commit import RUN_LOCK
from pipeline.io.lease import holder_age_s, holder_is_stale, read_holder
from pipeline.io.store import StoreError

logger = logging.getLogger("canvasflow")
SAMPLE_ROWS = 2000  # prompts tokenized for the length figures, evenly spaced over the input
SHOWN_ERRORS = 3  # rejected rows quoted
SHOWN_PROMPT_CHARS = 1500  # the first prompt is cut to this many characters when shown
# Settings the plan line leaves out: token ids, and flags a user rarely sets.
HIDDEN_SETTINGS = frozenset({"eos_token_ids", "pad_token_id", "mask_token_id", "record_drafts"})


def report(prep: Any) -> int:
    """Logs the plan of `prep` (job.Prepared, from job.plan); returns the exit code: 0, it would run."""
    job, records = prep.job, prep.records
    logger.info("dry run (run.dry_run=true): nothing is written and no worker is started")
    state, left = _state(prep)
    logger.info("run %s at %s: %s", prep.run_id, prep.run_store.uri, state)
    _lock_line(prep)
    _rejected_lines(records.table)  # the plan logged the input's row counts
    n = prep.spec.completions_per_prompt
    completions = (records.num_rows - records.num_errors) * n
    logger.info(
        "work: %d prompt(s) x %d completion(s) = %d completion(s) at most, in %d shard(s) of %d row(s); %s",
        records.num_rows - records.num_errors,
        n,
        completions,
        prep.identity["num_shards"],
        job.run.shard_size,
        _workers(job, left),
    )
    settings = {k: v for k, v in prep.settings.items() if k not in HIDDEN_SETTINGS and v is not None}
    logger.info(
        "model %s (%s, context window %d tokens, prompts up to %d tokens); sampler: %s",
        prep.model_info.name,
        prep.model_info.family,
        prep.model_info.context_window,
        prep.spec.max_prompt_tokens,
        " ".join(f"{k}={v}" for k, v in sorted(settings.items())),
    )
    _prompt_lines(prep)
    logger.info("dry run done: rerun without run.dry_run=true to generate")
    return 0


def _state(prep: Any) -> tuple[str, int]:
    """What the run would do, and the shards it would generate."""
    status, total = prep.status, prep.identity["num_shards"]
    if status == "new":
        return f"a new run; all {total} shard(s) to generate", total
    if status == "replace":
        return (
            "run.overwrite=true: the run there (another input or config, or objects that are no run) would be "
            f"deleted and all {total} shard(s) generated"
        ), total
    committed = prep.run_store.committed()
    broken = prep.run_store.verify(committed)
    left = total - len(committed) + len(broken)
    if status == "complete" and not broken and len(committed) == total:
        from pipeline.runner.job import final_stats

        _, problem = final_stats(prep.run_store)
        if problem:  # what the real run does then (job.final_stats): no shard, the final files again
            return (
                f"complete (_SUCCESS present): all {total} shard(s) committed, but {problem}: the run would "
                "write _manifest.json, stats.json and README.md again from the commit markers"
            ), 0
        return f"complete (_SUCCESS present): all {total} shard(s) committed, nothing to do", 0
    note = f", {len(broken)} of them with parts missing or altered (regenerated)" if broken else ""
    codec = (prep.run_store.read_run_file() or {}).get("compression")
    if codec and codec != prep.job.output.compression:  # job.keep_run_codec
        note += f"; its parts keep the codec it started with, {codec}, not output.compression"
    return f"resumes: {len(committed)} of {total} shard(s) committed{note}; {left} to generate", left


def _lock_line(prep: Any) -> None:
    try:
        holder = read_holder(prep.run_store.store, RUN_LOCK)
    except StoreError as e:
        logger.warning("the run lock %s cannot be read: %s", prep.run_store.store.describe(RUN_LOCK), e)
        return
    if not holder:
        return
    from pipeline.runner.job import RUN_LOCK_STALE_S

    where = (prep.run_store.store.describe(RUN_LOCK), holder.get("host", "?"), holder.get("pid", "?"))
    if holder_is_stale(prep.run_store.store, RUN_LOCK, holder, RUN_LOCK_STALE_S):
        age = holder_age_s(prep.run_store.store, RUN_LOCK, holder)
        why = "has ended" if age <= RUN_LOCK_STALE_S else f"has been silent for {age:.0f} s"
        logger.info("the run lock %s names host %s, pid %s, which %s: a real run takes it over", *where, why)
    else:
        logger.warning(
            "the run lock %s is held by a live process (host %s, pid %s; heartbeat %.0f s ago): a real run is "
            "refused (exit code 2) until it ends",
            *where,
            holder_age_s(prep.run_store.store, RUN_LOCK, holder),
        )


def _rejected_lines(table: Any) -> None:
    errors = table.column("error")
    rejected = len(errors) - errors.null_count
    if not rejected:
        return
    logger.info("rows rejected while reading land in errors/ with their reason, e.g.:")
    first = pc.indices_nonzero(pc.is_valid(errors))[:SHOWN_ERRORS].to_pylist()  # no Python list of every row
    for index in first:
        source = table.column("source_index")[index].as_py()
        logger.info("  rejected: input row %s: %s", source, errors[index].as_py())
    if rejected > len(first):
        logger.info("  ... and %d more", rejected - len(first))


def _workers(job: Any, left: int) -> str:
    """The workers the run would start for `left` shards (job._run_workers: no more than shards)."""
    if not left:
        return "no worker to start"
    cluster = job.cluster
    where = "this machine" if cluster.mode == "local" else (cluster.address or "the Ray cluster")
    gpus = cluster.num_gpus_per_worker
    in_flight = job.run.shards_in_flight if job.sampler.batching == "continuous" else 1
    return (
        f"{min(cluster.num_workers, left)} worker(s) on {where} (cluster.mode={cluster.mode}"
        f"{f', {gpus:g} GPU(s) each' if gpus else ''}), {in_flight} shard(s) in flight each"
    )


def _sample_indices(errors: Any, limit: int) -> list[int]:
    """Up to `limit` indices of the rows without an error, evenly spaced over them. Arrow arrays throughout: a
    Python list of every good row took 34 MB per million rows."""
    good = pc.indices_nonzero(pc.is_null(errors)) if errors.null_count < len(errors) else None
    count = len(errors) if good is None else len(good)
    picks = range(count) if count <= limit else (int(i * count / limit) for i in range(limit))
    return list(picks) if good is None else [good[i].as_py() for i in picks]


def _prompt_lines(prep: Any) -> None:
    """The first prompt as rendered for the model, and prompt lengths in tokens over a sample of the rows."""
    spec, table, tokenizer = prep.spec, prep.records.table, prep.tokenizer  # plan loaded it for the dry run
    errors = table.column("error")
    good = errors.null_count
    if not good:
        return
    max_chars = spec.max_prompt_tokens * max_token_chars(tokenizer) * CHARS_BOUND_FACTOR
    sample = _sample_indices(errors, SAMPLE_ROWS)
    # Row by row: take() on the whole table copied it (215 MB per million rows), and past 2 GiB of prompt text
    # failed concatenating its chunks ("offset overflow").
    columns = table.select(["id", "prompt", "is_chat"])
    rows = [columns.slice(index, 1).to_pylist()[0] for index in sample]
    lengths: list[int] = []
    too_long, failed = 0, []
    for row in rows:
        try:
            ids = prompt_ids(
                tokenizer,
                row["prompt"],
                is_chat=bool(row["is_chat"]),
                apply_chat_template=spec.apply_chat_template,
                max_chars=max_chars,
                system_prompt=spec.system_prompt,
            )
        except PromptTooLong:
            too_long += 1
            continue
        except Exception as e:  # noqa: BLE001 - a row the workers reject ("cannot render the prompt")
            failed.append(f"{row['id']}: {e}")
            continue
        if not ids:
            failed.append(f"{row['id']}: the prompt has no tokens")
            continue
        if not lengths:
            _show_first(tokenizer, row, spec, len(ids))
        lengths.append(len(ids))
        too_long += len(ids) > spec.max_prompt_tokens
    _length_lines(lengths, too_long, failed, len(sample), good, spec.max_prompt_tokens)


def _show_first(tokenizer: Any, row: dict[str, Any], spec: Any, tokens: int) -> None:
    text = render_prompt(
        tokenizer,
        row["prompt"],
        is_chat=bool(row["is_chat"]),
        apply_chat_template=spec.apply_chat_template,
        system_prompt=spec.system_prompt,
    )
    cut = (
        f"\n  ... ({len(text) - SHOWN_PROMPT_CHARS} more characters)"
        if len(text) > SHOWN_PROMPT_CHARS
        else ""
    )
    logger.info(
        "first prompt as the model sees it (row %s, %d tokens):\n  %s%s",
        row["id"],
        tokens,
        text[:SHOWN_PROMPT_CHARS].replace("\n", "\n  "),
        cut,
    )


def _length_lines(
    lengths: list[int], too_long: int, failed: list[str], sampled: int, good: int, budget: int
) -> None:
    scope = f"the {good}" if sampled == good else f"a sample of {sampled} of the {good}"
    if lengths:
        ordered = sorted(lengths)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        logger.info(
            "prompt tokens over %s prompt(s): min %d, median %d, p95 %d, max %d",
            scope,
            ordered[0],
            int(statistics.median(ordered)),
            p95,
            ordered[-1],
        )
    if too_long:
        logger.warning(
            "%d of %s prompt(s) have more than model.max_prompt_tokens=%d tokens: they would be error rows "
            "(raise model.max_prompt_tokens, within the context window less sampler.max_new_tokens)",
            too_long,
            scope,
            budget,
        )
    if failed:
        logger.warning(
            "%d of %s prompt(s) cannot be rendered and would be error rows, e.g. %s",
            len(failed),
            scope,
            failed[0],
        )
