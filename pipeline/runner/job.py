"""The driver of a generation job: plan it (pipeline/runner/plan.py: every check before GPU work), take the
run lock, open the run, run the worker pool over the shards not yet committed, finalize.

`run(job)` returns the process exit code: 0 when the run is complete (`_SUCCESS` written), 1 when some
shards failed or the run's final files could not be written (everything committed is kept; rerun the same
command to retry them), 2 when the job could
not start (bad config, unreadable input, unreachable output, model that does not load) — in which case no
GPU work was done.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import time
from typing import Any

from pipeline.config.redact import config_yaml, with_run_values
from pipeline.config.schema import ConfigError, JobConfig
from pipeline.config.store import signals_deferred
from pipeline.data.readers import InputError
from pipeline.io.commit import (
    COMMITS,
    MANIFEST,
    RUN_FILE,
    RUN_LOCK,
    SUCCESS,
    FencedError,
    RunConflictError,
    RunStore,
)
from pipeline.io.lease import Lease, Refused
from pipeline.io.store import StoreError
from pipeline.models.loader import ModelError, dtype_name
from pipeline.postprocess import PostprocessError
from pipeline.runner.plan import Prepared, plan, warn_shard_drain
from pipeline.runner.pool import NOT_STARTED, ShardTask, WorkerStartError
from pipeline.runner.ray_setup import ClusterConnectError
from pipeline.runner.report import (
    Progress,
    build_manifest,
    build_stats,
    log_summary,
    sampler_counters,
    shard_rows,
)
from pipeline.sampler.settings import SettingsError

logger = logging.getLogger("canvasflow")
RUN_LOCK_STALE_S = 120.0  # a holder silent this long (heartbeat every 30 s) is taken over
# A local temporary file untouched this long is left by a write that will never finish (remove_stale_temp).
STALE_TEMP_S = RUN_LOCK_STALE_S
SHARD_FOLDERS = ("data/", "errors/", "_commits/")  # where workers write a shard's objects

STARTUP_ERRORS = (
    ConfigError,
    InputError,
    StoreError,
    ModelError,
    RunConflictError,
    SettingsError,
    PostprocessError,
)


def _command_line_overrides() -> list[str]:
    """The overrides of the command line that Hydra composed the config from; none outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def run_from_hydra(cfg: Any) -> int:
    from pipeline.config import to_job_config
    from pipeline.config.store import check_text_overrides

    _ensure_logging()
    try:
        check_text_overrides(_command_line_overrides())
        job = to_job_config(cfg)
        resolved_yaml = config_yaml(cfg)
    except ConfigError as e:
        logger.error("invalid configuration: %s", e)
        return 2
    except Exception:  # noqa: BLE001 - nothing started yet: exit code 2, with the traceback for a bug report
        logger.exception("could not start (exit code 2): unexpected error while reading the configuration")
        return 2
    return run(job, resolved_yaml=resolved_yaml)


def nightly_from_hydra(cfg: Any) -> int:
    from pipeline.config import to_job_config
    from pipeline.config.schema import NightlyJobConfig
    from pipeline.config.store import check_text_overrides
    from pipeline.runner.nightly import run_nightly

    _ensure_logging()
    try:
        check_text_overrides(_command_line_overrides(), NightlyJobConfig)
        job = to_job_config(cfg, NightlyJobConfig)
        resolved_yaml = config_yaml(cfg)
    except ConfigError as e:
        logger.error("invalid configuration: %s", e)
        return 2
    except Exception:  # noqa: BLE001 - nothing started yet: exit code 2, with the traceback for a bug report
        logger.exception("could not start (exit code 2): unexpected error while reading the configuration")
        return 2
    return run_nightly(job, job.nightly, resolved_yaml=resolved_yaml)


def keep_run_codec(prep: Prepared) -> None:
    """Writes the parts of a resumed run with the codec it was started with (recorded in _run.json), whatever
    output.compression says now: one codec per run, as _manifest.json states it. Runs started before the codec
    was recorded keep the configured one."""
    from pipeline.config.validate import CHOICES

    started = (prep.run_store.read_run_file() or {}).get("compression")
    output = prep.job.output
    if started not in CHOICES["output.compression"] or started == output.compression:
        return
    logger.warning(
        "output.compression=%s is not applied to run %s: it was started with %s, which its parts keep (one "
        "codec per run). Use a new run.id, or run.overwrite=true to write the run again with %s.",
        output.compression,
        prep.run_id,
        started,
        output.compression,
    )
    output.compression = started


def keep_run_dtype(prep: Prepared, gpus: float) -> None:
    """Resolves model.dtype=auto once per run, as the workers would (loader.dtype_name: bfloat16 on a GPU, else
    float32), and records it in _run.json at the run's first start; every later start of the run loads
    the model in the recorded dtype, so that one run's rows come from one precision whichever workers run it (a
    run started on CPU workers and resumed on GPU ones held float32 and bfloat16 rows). `gpus`: each worker's."""
    job = prep.job
    device = job.model.device if job.model.device != "auto" else ("cuda" if gpus else "cpu")
    dtype = dtype_name(job.model.dtype, device)
    run_file = prep.run_store.read_run_file() or {}
    recorded = run_file.get("dtype")
    if recorded != dtype and (recorded is None or not prep.run_store.store.list(COMMITS)):
        # A new run, one with no shard committed yet (stopped before any, e.g. to give its workers GPUs), or one
        # started before the dtype was recorded: this start decides.
        prep.run_store.write_run_file({**run_file, "dtype": dtype})
    elif recorded != dtype:  # only with model.dtype=auto: an explicit dtype is part of the run's identity
        logger.warning(
            "model.dtype=auto: run %s was started in %s, which its workers keep (one precision per run), though "
            "on these workers (%s) auto means %s. Use a new run.id to generate in %s.",
            prep.run_id,
            recorded,
            "GPU" if device == "cuda" else "CPU",
            dtype,
            dtype,
        )
        dtype = recorded
    prep.spec = dataclasses.replace(prep.spec, dtype=dtype)


def _ensure_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    logger.setLevel(logging.INFO)


# ---------------------------------------------------------------------------------------------- prepare
def prepare(job: JobConfig, resolved_yaml: str | None = None) -> Prepared:
    """`plan`, then `open_run` while holding the run lock (released on return; Refused if a live process
    holds it): for callers that open a run without generating it. `run` holds the lock from open_run to the
    end of the run."""
    prep = plan(job)
    lease = run_lease(prep)
    lease.acquire()
    try:
        open_run(prep, resolved_yaml)
    finally:
        with signals_deferred("releasing the run lock"):
            lease.release()
    return prep


def run_lease(prep: Prepared) -> Lease:
    """The run lock, `<run>/_lock`: one process at a time writes a run (a second one would delete the first
    one's fresh parts as uncommitted, commit shards twice, or with run.overwrite delete the whole run)."""
    return Lease(
        prep.run_store.store,
        RUN_LOCK,
        secrets.token_hex(8),
        prep.run_id,
        RUN_LOCK_STALE_S,
        what="runs of one run id",
        stale_hint="or at once when its holder was a process on this host that has died",
    )


def open_run(prep: Prepared, resolved_yaml: str | None) -> None:
    """Checks the identity again, now that no other process can change the run (the caller holds the run
    lock), replaces the old run with run.overwrite, and writes _run.json (a new run) and _config.yaml (unless
    the run is complete: its _config.yaml describes the invocation that made it)."""
    run_store = prep.run_store
    prep.status = run_store.check_identity(prep.identity, overwrite=prep.job.run.overwrite)
    if prep.status == "new":
        run_store.write_run_file(prep.identity)
    else:
        keep_run_codec(prep)
    if resolved_yaml is not None and prep.status != "complete":
        run_store.store.write_text("_config.yaml", with_run_values(resolved_yaml, prep.job, prep.run_id))


# --------------------------------------------------------------------------------------------------- run
def run(job: JobConfig, resolved_yaml: str | None = None) -> int:
    _ensure_logging()
    started = time.time()
    try:
        if resolved_yaml is None:
            from omegaconf import OmegaConf

            resolved_yaml = config_yaml(OmegaConf.to_container(OmegaConf.structured(job)))
        prep = plan(job)
    except STARTUP_ERRORS as e:
        logger.error("%s", e)
        return 2
    except Exception:  # noqa: BLE001 - a bug or an unforeseen input before any GPU work: still "not started"
        logger.exception(
            "could not start (exit code 2): unexpected error while preparing the run (no GPU work was done); "
            "the traceback follows"
        )
        return 2
    run_store = prep.run_store
    if job.run.dry_run:  # reports what the run would do; writes nothing, takes no lock
        from pipeline.runner import dry_run

        warn_shard_drain(job, prep.identity["num_shards"])
        try:
            return dry_run.report(prep)
        except StoreError as e:
            logger.error("dry run: %s", e)
            return 2
        except Exception:  # noqa: BLE001 - a bug: exit code 2 (nothing was started), not 1 (shards failed)
            logger.exception("the dry run failed (exit code 2): unexpected error; the traceback follows")
            return 2
    logger.info("run %s -> %s", prep.run_id, run_store.uri)
    warn_shard_drain(job, prep.identity["num_shards"])
    # The lock comes before anything is written in the run directory: run.overwrite too must not delete the
    # run of a live process; it replaces only one whose holder is gone (a stale or dead lock, taken over).
    lease = run_lease(prep)
    try:
        lease.acquire()
    except Refused as e:  # its message says what to do (wait, or stop the other process)
        overwrite = (
            " run.overwrite=true replaces only a run that no live process writes."
            if job.run.overwrite
            else ""
        )
        logger.error("run %s: %s%s Then rerun (exit code 2: not started).", prep.run_id, e, overwrite)
        return 2
    except StoreError as e:
        logger.error("could not take the run lock %s: %s", run_store.store.describe(RUN_LOCK), e)
        return 2
    run_store.fence = lease.token  # workers commit only while this lock is ours
    try:
        try:
            open_run(prep, resolved_yaml)
        except STARTUP_ERRORS as e:
            logger.error("%s", e)
            return 2
        committed = None
        if prep.status == "complete":
            committed = run_store.committed()
            broken = run_store.verify(committed)
            # shards whose marker was deleted or does not read (a partial copy): committed no more
            unmarked = [shard for shard in range(prep.identity["num_shards"]) if shard not in committed]
            stats, problem = final_stats(run_store) if not (broken or unmarked) else (None, None)
            if stats is not None:
                remove_stale_temp(
                    run_store, complete=True
                )  # a kill's leftovers; the run is otherwise untouched
                logger.info("run %s is already complete (_SUCCESS present); nothing to do", prep.run_id)
                log_summary(stats, run_store.uri, ran=False)
                return 0
            if (
                broken or unmarked
            ):  # the run is not complete any more: _SUCCESS goes until the shards are back
                if broken:
                    logger.warning(
                        "run %s is complete but the parts of shard(s) %s are missing or altered (removed or "
                        "changed by hand, or a partial copy): regenerating them",
                        prep.run_id,
                        broken,
                    )
                if unmarked:
                    logger.warning(
                        "run %s is complete but the commit markers of shard(s) %s are missing or unreadable "
                        "(removed or changed by hand, or a partial copy): regenerating them",
                        prep.run_id,
                        unmarked,
                    )
                run_store.store.delete([SUCCESS])
            else:
                logger.warning(
                    "run %s is complete but %s: writing its manifest, stats and dataset card again",
                    prep.run_id,
                    problem,
                )
        return _resume(job, prep, started, committed)
    finally:
        with signals_deferred("releasing the run lock"):
            lease.release()


FINAL_FILES = ("_manifest.json", "stats.json", "README.md")  # written by RunStore.finalize, before _SUCCESS
DRIVER_FILES = frozenset({RUN_FILE, "_config.yaml", *FINAL_FILES, SUCCESS})  # written under the run lock only
SUMMARY_KEYS = (
    "rows_in",
    "rows_out",
    "rows_error",
    "tokens_generated",
    "denoising_steps",
    "tokens_per_forward",
)


def final_stats(run_store: RunStore) -> tuple[dict[str, Any] | None, str | None]:
    """A complete run's stats, or (None, what is wrong) when one of its final files is missing or stats.json or
    _manifest.json does not read (deleted or cut short by hand or by a copy): finalizing again from the commit
    markers repairs them."""
    missing = [name for name in FINAL_FILES if not run_store.store.exists(name)]
    if missing:
        return None, f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
    try:  # readers take the run's parts from it: one cut short lists none
        manifest = json.loads(run_store.store.read_text(MANIFEST))
    except (StoreError, ValueError) as e:
        return None, f"its {MANIFEST} is not readable ({e})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("parts"), list):
        return None, f"its {MANIFEST} lacks the run's parts"
    try:
        stats = json.loads(run_store.store.read_text("stats.json"))
    except (StoreError, ValueError) as e:
        return None, f"its stats.json is not readable ({e})"
    if not isinstance(stats, dict) or any(key not in stats for key in SUMMARY_KEYS):
        return None, "its stats.json lacks the run's totals"
    return stats, None


def _resume(job: JobConfig, prep: Prepared, started: float, committed: dict[int, Any] | None = None) -> int:
    """Runs the shards not yet committed and finalizes the run (the caller holds the run lock). `committed`:
    the run's markers when the caller has read them already."""
    run_store = prep.run_store
    remove_stale_temp(run_store)
    committed = run_store.committed() if committed is None else committed
    broken = run_store.verify(committed)
    if broken:
        logger.warning(
            "shards %s are committed but their parts are missing or altered; regenerating them", broken
        )
        run_store.uncommit(broken)
        committed = {k: v for k, v in committed.items() if k not in broken}
    stale = run_store.clean_uncommitted(committed)
    if committed or stale:
        logger.info(
            "resuming: %d of %d shards already committed; removed %d uncommitted objects",
            len(committed),
            prep.identity["num_shards"],
            len(stale),
        )
    size, total = job.run.shard_size, prep.records.num_rows
    tasks = [
        ShardTask(shard=i, start=i * size, stop=min(total, (i + 1) * size))
        for i in range(prep.identity["num_shards"])
        if i not in committed
    ]
    progress = Progress(
        total_rows=total,
        done_rows=sum(shard_rows(i, size, total) for i in committed),
        interval_s=job.run.progress_interval_s,
        completions=prep.spec.completions_per_prompt,
    )
    new_commits: dict[int, Any] = {}
    failed = []
    worker_infos: list[dict[str, Any]] = []
    counters: dict[str, int] = {}
    if tasks:
        try:
            failed, worker_infos, counters = _run_workers(prep, tasks, new_commits, progress)
        except (*STARTUP_ERRORS, WorkerStartError, ClusterConnectError) as e:
            logger.error("%s", e)
            return 2
    try:
        return _finish(prep, started, committed, new_commits, failed, worker_infos, counters)
    except StoreError as e:  # a full disk, a store that went away: what is committed stays committed
        logger.error(
            "run %s: %s. Every committed shard is kept; once the output location can be written again (free "
            "space, permissions, the store's health), rerun the same command to finish the run (exit code 1)",
            prep.run_id,
            e,
        )
        return 1


def _finish(prep: Prepared, started: float, committed, new_commits, failed, worker_infos, counters) -> int:
    """After the workers: checks every committed part, then writes stats.json and reports the failed shards
    (1), or finalizes the run (0). StoreError when the output location cannot be read or written."""
    run_store = prep.run_store
    all_commits = run_store.committed(known=committed)  # reads only the markers this run's workers wrote
    missing = run_store.verify(all_commits)
    if (
        missing and not failed
    ):  # a part vanished after its commit (e.g. a concurrent cleanup): never claim success
        failed = [
            ShardTask(shard=s, start=0, stop=0, last_error="part missing after commit") for s in missing
        ]
        run_store.uncommit(missing)
        all_commits = {shard: commit for shard, commit in all_commits.items() if shard not in missing}
    stats = build_stats(prep, all_commits, new_commits, worker_infos, started, failed, counters)
    if failed:
        try:
            run_store.store.write_text("stats.json", json.dumps(stats, indent=2, sort_keys=True) + "\n")
        except StoreError as e:  # the failed shards are still the news: say which, and what to do
            logger.error("could not write stats.json: %s", e)
        refused = any(t.refused or (t.last_error or "").startswith(NOT_STARTED) for t in failed)
        logger.error(
            "%d shard(s) failed (%s); %d of %d shards are committed and kept. Rerun the same command to retry%s.",
            len(failed),
            ", ".join(str(t.shard) for t in failed[:10]),
            len(all_commits),
            prep.identity["num_shards"],
            " once the output location can be written again (free space, permissions)" if refused else "",
        )
        return 1
    try:
        run_store.check_fence(None)  # the lock was taken over while this process was cut off: not ours to end
    except FencedError as e:
        logger.error("run %s: %s; not finalizing it (exit code 1)", prep.run_id, e)
        return 1
    remove_stale_temp(run_store, complete=True)  # also those too young at the start (a quick retry's)
    from pipeline.io.card import render_card

    run_columns = run_store.settle_columns(all_commits)  # a widening found only now: in manifest and card
    manifest = build_manifest(prep, all_commits)
    card = render_card(run_store.uri, manifest, stats)
    run_store.finalize(
        all_commits, manifest, stats, card, drafts=prep.job.sampler.record_drafts, run_columns=run_columns
    )
    log_summary(stats, run_store.uri)
    return 0


def remove_stale_temp(run_store: RunStore, *, complete: bool = False) -> None:
    """Deletes the temporary files that writes killed between write and rename left in a local run directory
    (never listed or read, but they keep their disk space); the caller holds the run lock. Only those untouched
    for STALE_TEMP_S: holding the lock does not mean that nothing else writes there. Workers of a SIGKILLed
    driver outlive it until Ray reaps them, our own heartbeat writes `_lock` through a temporary file, and a
    holder we took over as stale may be slow rather than dead; a write keeps its file's modification time
    recent and takes seconds (a part is serialized in memory, then written and fsynced). STALE_TEMP_S is the
    silence after which the lock itself counts its holder as dead.

    `complete`: every shard is committed and this run's workers are done, so a temporary file of any age under
    the shard folders (data/, errors/, _commits/) belongs to a write that must never land (a worker killed
    mid-write, or one still finishing a shard that its retry committed): those go too, as do those of the
    driver's own files at the top (a driver killed while it finalized), and a complete run holds its committed
    objects only."""
    count, size = run_store.store.remove_temp_files(older_than_s=STALE_TEMP_S)
    for folder in SHARD_FOLDERS if complete else ():
        removed, nbytes = run_store.store.child(folder).remove_temp_files(older_than_s=0)
        count, size = count + removed, size + nbytes
    if complete:  # only the lock's holder writes these: one of any age is a killed driver's (not _lock's)
        removed, nbytes = run_store.store.remove_temp_files(older_than_s=0, targets=DRIVER_FILES)
        count, size = count + removed, size + nbytes
    if count:
        logger.info(
            "removed %d stale temporary file(s) (%d bytes) of interrupted writes under %s",
            count,
            size,
            run_store.uri,
        )


def _run_workers(prep: Prepared, tasks, new_commits: dict[int, Any], progress: Progress):
    import ray

    from pipeline.runner.pool import run_pool, start_workers
    from pipeline.runner.ray_setup import connect, shutdown, worker_options
    from pipeline.runner.worker import ProgressBoard, ShardWorker

    job = prep.job
    started_ray = connect(job.cluster)
    try:
        count = min(job.cluster.num_workers, len(tasks))
        options, threads = worker_options(job.cluster, count)
        keep_run_dtype(prep, options["num_gpus"])
        # It also records the run's metrics (pipeline/runner/metrics.py): the driver tells it of commits and
        # failed attempts below.
        board = ray.remote(ProgressBoard).options(num_cpus=0).remote(prep.run_id)
        worker_cls = ray.remote(ShardWorker)

        def make_worker(index: int):  # one thread per shard in flight (max_concurrency), one for the rest
            return worker_cls.options(**options, max_concurrency=job.run.shards_in_flight + 1).remote(
                prep.spec,
                prep.run_store,
                compression=job.output.compression,
                name=f"w{index}",
                torch_threads=threads,
                board=board,
            )

        in_flight = job.run.shards_in_flight if job.sampler.batching == "continuous" else 1
        logger.info(
            "starting %d worker(s), %d shard(s) in flight each (%s)",
            count,
            in_flight,
            ", ".join(f"{k}={v}" for k, v in options.items()),
        )
        workers, infos = start_workers(make_worker, count, job.cluster.worker_start_timeout_s, options)
        for info in infos:
            logger.info(
                "worker %s ready on %s (%s%s, %s kernels, %s, model loaded in %.1fs)",
                info["worker"],
                info["host"],
                info["device"],
                f" {info['gpu']}" if info["gpu"] else "",
                info["backend"],
                info["dtype"],
                info["load_s"],
            )
        progress.start(ray, board)

        size, total = job.run.shard_size, prep.records.num_rows

        def on_commit(commit: dict[str, Any]) -> None:
            rows = shard_rows(commit["shard"], size, total)
            new_commits[commit["shard"]] = commit
            progress.shard_done(commit["shard"], rows)
            board.committed.remote(commit, rows)

        def on_failure(task: ShardTask, index: int, reason: str) -> None:
            board.attempt_failed.remote(f"w{index}", reason)

        failed = run_pool(
            workers,
            make_worker,
            tasks,
            prep.records.table,
            max_attempts=job.run.max_shard_attempts,
            on_commit=on_commit,
            on_tick=progress.tick,
            tick_s=min(1.0, job.run.progress_interval_s),
            shard_timeout_s=job.run.shard_timeout_s,
            start_grace_s=job.cluster.worker_start_timeout_s,
            in_flight=in_flight,
            on_failure=on_failure,
        )
        if failed:
            board.shards_failed.remote(len(failed))
        progress.final()
        counters = sampler_counters(ray, workers, board)
        for worker in workers:
            ray.kill(worker)
        return failed, infos, counters
    finally:
        if started_ray:
            with signals_deferred("stopping Ray"):  # cut short, it leaves Ray's processes and exits 1
                shutdown(ray)
