"""The driver of a generation job: validate everything up front, plan shards, run the worker pool, commit.

`run(job)` returns the process exit code: 0 when the run is complete (`_SUCCESS` written), 1 when some
shards failed (everything committed is kept; rerun the same command to retry them), 2 when the job could
not start (bad config, unreadable input, unreachable output, model that does not load) — in which case no
GPU work was done.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from pipeline.config.redact import config_yaml, with_run_values
from pipeline.config.schema import ConfigError, JobConfig
from pipeline.config.validate import is_inside
from pipeline.data.prompts import check_system_prompt
from pipeline.data.readers import InputError, read_input, resolve_path
from pipeline.generation import GenerationSpec, max_prompt_tokens_for
from pipeline.io.commit import COMMITS, RUN_LOCK, SUCCESS, FencedError, RunConflictError, RunStore
from pipeline.io.lease import Lease, Refused
from pipeline.io.store import S3Options, S3Store, StoreError, is_s3, open_store, split_s3_uri
from pipeline.models.loader import (
    MASK_FAMILIES,
    ModelError,
    ModelInfo,
    dtype_name,
    inspect_model,
    load_tokenizer,
    resolve_model_dir,
)
from pipeline.postprocess import PostprocessError, load_postprocess
from pipeline.runner.identity import (
    CONTENT_FILES,
    config_fingerprint,
    derive_run_id,
    local_model_identity,
    s3_model_identity,
    s3_objects,
)
from pipeline.runner.pool import ShardTask, WorkerStartError
from pipeline.runner.ray_setup import ClusterConnectError
from pipeline.runner.report import (
    Progress,
    build_manifest,
    build_stats,
    log_summary,
    sampler_counters,
    shard_rows,
)
from pipeline.sampler.mask.settings import mask_user_values, resolve_mask_settings
from pipeline.sampler.settings import (
    USER_KNOBS,
    SettingsError,
    diffusion_gemma_user_values,
    max_length_note,
    resolve_settings,
)
from pipeline.sampler.stop import check_stops, escape_hint

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


@dataclass
class Prepared:
    job: JobConfig
    run_id: str
    run_store: RunStore
    records: Any  # RecordTable
    spec: GenerationSpec
    model_info: ModelInfo
    settings: dict[str, Any]
    identity: dict[str, Any]
    status: str  # new | resume | complete; after `plan` also replace (run.overwrite), which open_run does
    tokenizer: Any = None  # loaded by `plan` for the system-prompt check and a dry run, else None


def run_from_hydra(cfg: Any) -> int:
    from pipeline.config import to_job_config

    _ensure_logging()
    try:
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
    from pipeline.runner.nightly import run_nightly

    _ensure_logging()
    try:
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


# ------------------------------------------------------------------------------------------------ model
# The files a tokenizer and its chat template load from (runner/identity.py hashes them with the config).
TOKENIZER_FILES = tuple(name for name in CONTENT_FILES if name != "model.safetensors.index.json")


def _inspect_model(job: JobConfig, *, tokenizer: bool = False) -> tuple[ModelInfo, str, Any]:
    """ModelInfo, identity digest (runner/identity.py: config, tokenizer and chat-template files by content,
    weights by a sampled fingerprint, or by size and ETag on s3://), and with `tokenizer` the model's tokenizer
    (else None). An s3:// model is not downloaded here: only its config files, and with `tokenizer` its
    tokenizer and chat-template files (megabytes, not the weights)."""
    path = job.model.path
    if not is_s3(path):
        model_dir = resolve_model_dir(path, cache_dir=job.model.cache_dir)
        info = inspect_model(model_dir, name=path if path.startswith("builtin:") else None)
        loaded = (
            load_tokenizer(model_dir, remote_code_free=info.family in MASK_FAMILIES) if tokenizer else None
        )
        return info, local_model_identity(model_dir), loaded
    bucket, prefix = split_s3_uri(path)
    store = S3Store(f"s3://{bucket}/{prefix}", S3Options(job.output.endpoint_url, job.output.region))
    try:
        objects = s3_objects(store)
        keys = list(objects)
        if "config.json" not in keys:
            raise ModelError(f"model.path={path!r} has no config.json")
        wanted = TOKENIZER_FILES if tokenizer else ("config.json", "generation_config.json")
        with tempfile.TemporaryDirectory() as tmp:
            for name in wanted:
                if name in keys:
                    store.download_file(name, os.path.join(tmp, name))
            info = inspect_model(tmp, name=path.rstrip("/").rsplit("/", 1)[-1])
            try:
                loaded = (
                    load_tokenizer(tmp, remote_code_free=info.family in MASK_FAMILIES) if tokenizer else None
                )
            except ModelError as e:  # it names the temporary folder the files were read from
                raise ModelError(str(e).replace(tmp, path.rstrip("/"))) from None
    except StoreError as e:
        raise ModelError(f"model.path={path!r} cannot be read: {e}") from None
    info.model_dir = path
    return info, s3_model_identity(path, objects), loaded


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
        lease.release()
    return prep


def check_local_device(job: JobConfig) -> None:
    """cluster.mode=local runs the workers on this machine: a CUDA device it does not have fails here, before
    Ray starts or the run is written, not when every worker has failed to start."""
    if job.cluster.mode != "local":
        return
    triton = job.sampler.backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1"
    if job.model.device != "cuda" and not triton:
        return
    import torch

    if torch.cuda.is_available():
        return
    setting = "model.device=cuda" if job.model.device == "cuda" else "sampler.backend=triton"
    fix = (
        "use model.device=auto"
        if job.model.device == "cuda"
        else "use sampler.backend=auto (or TRITON_INTERPRET=1 to test the kernels on a CPU)"
    )
    raise ConfigError(
        f"{setting} needs a CUDA device and this machine has none (cluster.mode=local runs the workers here); "
        f"{fix}, or run on a GPU cluster with cluster=ray"
    )


def plan(job: JobConfig) -> Prepared:
    """Every check that can fail before GPU work: model config, settings, postprocess, output, input, and the
    run id's identity (a conflict without run.overwrite). Writes nothing in the run directory: that is
    open_run's, under the run lock."""
    check_local_device(job)
    # The tokenizer, for the system-prompt check and a dry run's prompts (an s3:// model's tokenizer files only).
    info, model_id, tokenizer = _inspect_model(
        job, tokenizer=job.data.system_prompt is not None or job.run.dry_run
    )
    knobs = {k: getattr(job.sampler, k) for k in USER_KNOBS}
    knobs["mask"] = dataclasses.asdict(job.sampler.mask)
    if job.model.family not in ("auto", info.family):
        raise ConfigError(
            f"model.family={job.model.family!r} but {info.model_dir} holds a {info.family} model "
            f"(model_type {info.model_type!r}); use model.family=auto or {info.family}"
        )
    if job.data.system_prompt is not None:
        try:
            check_system_prompt(tokenizer, job.data.system_prompt, job.data.apply_chat_template)
        except ValueError as e:
            raise ConfigError(f"{e} (model {job.model.path})") from None
    try:
        if info.family in MASK_FAMILIES:  # LLaDA, Dream: sampler.mask.* (pipeline/sampler/mask/settings.py)
            settings = resolve_mask_settings(
                mask_user_values(knobs, info.family),
                info.generation_config,
                family=info.family,
                mask_token_id=info.mask_token_id,
                eos_token_ids=info.eos_token_ids,
                pad_token_id=info.pad_token_id,
            )
            settings.check_completions(job.sampler.completions_per_prompt)
        else:
            user = diffusion_gemma_user_values(knobs, info.family)
            settings = resolve_settings(
                user,
                info.generation_config,
                canvas_length=info.canvas_length,
                eos_token_ids=info.eos_token_ids,
                pad_token_id=info.pad_token_id,
            )
            note = max_length_note(user, info.generation_config)
            if note:
                logger.warning("%s", note)
        max_prompt = max_prompt_tokens_for(job.model.max_prompt_tokens, info.context_window, settings)
    except (SettingsError, ValueError) as e:
        reference = (
            "the algorithm's reference" if info.family in MASK_FAMILIES else "the DiffusionGemma reference"
        )
        config = f"the model's generation_config.json in {info.model_dir}"
        if "from the model's generation_config.json" in str(e):  # the error names the values it took there
            raise ConfigError(str(e).replace("the model's generation_config.json", config)) from None
        raise ConfigError(
            f"{e} (sampler values not set in the config come from {config}, else {reference} defaults)"
        ) from None
    load_postprocess(job.postprocess)

    store = open_store(job.output.uri, endpoint_url=job.output.endpoint_url, region=job.output.region)
    store.check_writable(create=not job.run.dry_run)
    logger.info("reading input %s", job.data.path)
    records = read_input(job.data, endpoint_url=job.output.endpoint_url, region=job.output.region)
    logger.info(
        "input: %d rows (%d rejected while reading) from %d file(s)%s",
        records.num_rows,
        records.num_errors,
        len(records.files),
        f", {records.skipped_files} other file(s) skipped" if records.skipped_files else "",
    )

    settings_dict = settings.to_dict()
    stops = check_stops(job.sampler.stop)
    if stops:  # only when set, so that the identity (and derived run id) of other runs stays
        settings_dict["stop"] = list(stops)
        hint = escape_hint(stops)
        if hint:
            logger.warning("%s", hint)
    config_fp = config_fingerprint(job, model_id, settings_dict)
    run_id = job.run.id or derive_run_id(resolve_path(job.data.path), records.fingerprint, config_fp)
    run_dir = f"{job.output.uri.rstrip('/')}/{run_id}"
    if is_inside(job.data.path, run_dir):
        raise ConfigError(
            f"data.path={job.data.path!r} is inside this run's directory {run_dir}, which the run writes (and "
            "run.overwrite=true deletes): copy the input elsewhere, or give this run another run.id"
        )
    run_store = RunStore(store.child(run_id), run_id)
    num_shards = -(-records.num_rows // job.run.shard_size)
    identity = {
        "run_id": run_id,
        "input_path": job.data.path,
        "input_fingerprint": records.fingerprint,
        "config_fingerprint": config_fp,
        "model": info.name,
        "model_identity": model_id,
        "num_rows": records.num_rows,
        "shard_size": job.run.shard_size,
        "num_shards": num_shards,
        "compression": job.output.compression,  # the codec of every part of the run (keep_run_codec)
        "created_at": time.time(),
    }
    status = run_store.identity_status(identity, overwrite=job.run.overwrite)
    spec = GenerationSpec(
        model_path=job.model.path,
        dtype=job.model.dtype,
        device=job.model.device,
        cache_dir=job.model.cache_dir,
        endpoint_url=job.output.endpoint_url,
        region=job.output.region,
        model_version=model_id if is_s3(job.model.path) else None,
        sampler=knobs,
        batch_size=job.sampler.batch_size,
        batching=job.sampler.batching,
        backend=job.sampler.backend,
        cuda_graphs=job.sampler.cuda_graphs,
        max_prompt_tokens=max_prompt,
        apply_chat_template=job.data.apply_chat_template,
        run_id=run_id,
        postprocess=job.postprocess,
        completions_per_prompt=job.sampler.completions_per_prompt,
        system_prompt=job.data.system_prompt,
        stop=stops,
    )
    return Prepared(job, run_id, run_store, records, spec, info, settings_dict, identity, status, tokenizer)


# Below this many batches of rows held per worker, shard ends cost many passes (bench_shard_size.py): one
# shard at a time drains its batch at every shard end; with shards in flight, the batch stays full only if
# the held rows can fill it while a shard finishes.
HELD_BATCHES = {1: 8, 2: 4}


def warn_shard_drain(job: JobConfig, num_shards: int) -> None:
    """A worker holding one shard at a time ends every shard with its batch draining (slots empty as rows
    finish, nothing left to admit): on the tiny model at batch 32, 512 rows in shards of 64 took 1.75x the
    decoder passes of one queue. With two shards in flight the next shard's rows take the freed slots (1.07x),
    as long as the rows held can fill the batch (shards of 16: 1.88x)."""
    batch, shard, in_flight = job.sampler.batch_size, job.run.shard_size, job.run.shards_in_flight
    if job.sampler.batching == "static":
        return
    wanted = HELD_BATCHES.get(in_flight, 4) * batch
    completions = job.sampler.completions_per_prompt  # each prompt's completions are rows of the batch
    if num_shards > 1 and shard * in_flight * completions < wanted:
        logger.warning(
            "run.shard_size=%d with run.shards_in_flight=%d holds %.1fx sampler.batch_size=%d per worker: "
            "too few rows to keep the batch full as shards end, which wastes GPU passes "
            "(benchmarks/bench_shard_size.py); use run.shard_size >= %d",
            shard,
            in_flight,
            shard * in_flight * completions / batch,
            batch,
            -(-wanted // (in_flight * completions)),
        )


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
        return dry_run.report(prep)
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
        if prep.status == "complete":
            broken = run_store.verify(run_store.committed())
            stats, problem = _final_stats(run_store) if not broken else (None, None)
            if stats is not None:
                logger.info("run %s is already complete (_SUCCESS present); nothing to do", prep.run_id)
                log_summary(stats, run_store.uri, ran=False)
                return 0
            if broken:  # the run is not complete any more: _SUCCESS goes until the shards are back
                logger.warning(
                    "run %s is complete but the parts of shard(s) %s are missing or altered (removed or "
                    "changed by hand, or a partial copy): regenerating them",
                    prep.run_id,
                    broken,
                )
                run_store.store.delete([SUCCESS])
            else:
                logger.warning(
                    "run %s is complete but %s: writing its manifest, stats and dataset card again",
                    prep.run_id,
                    problem,
                )
        return _resume(job, prep, started)
    finally:
        lease.release()


FINAL_FILES = ("_manifest.json", "stats.json", "README.md")  # written by RunStore.finalize, before _SUCCESS
SUMMARY_KEYS = (
    "rows_in",
    "rows_out",
    "rows_error",
    "tokens_generated",
    "denoising_steps",
    "tokens_per_forward",
)


def _final_stats(run_store: RunStore) -> tuple[dict[str, Any] | None, str | None]:
    """A complete run's stats, or (None, what is wrong) when one of its final files is missing or stats.json
    does not read (deleted or cut short by hand or by a copy): finalizing again from the commit markers
    repairs them."""
    missing = [name for name in FINAL_FILES if not run_store.store.exists(name)]
    if missing:
        return None, f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
    try:
        stats = json.loads(run_store.store.read_text("stats.json"))
    except (StoreError, ValueError) as e:
        return None, f"its stats.json is not readable ({e})"
    if not isinstance(stats, dict) or any(key not in stats for key in SUMMARY_KEYS):
        return None, "its stats.json lacks the run's totals"
    return stats, None


def _resume(job: JobConfig, prep: Prepared, started: float) -> int:
    """Runs the shards not yet committed and finalizes the run (the caller holds the run lock)."""
    run_store = prep.run_store
    remove_stale_temp(run_store)
    committed = run_store.committed()
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

    all_commits = run_store.committed()
    missing = run_store.verify(all_commits)
    if (
        missing and not failed
    ):  # a part vanished after its commit (e.g. a concurrent cleanup): never claim success
        failed = [
            ShardTask(shard=s, start=0, stop=0, last_error="part missing after commit") for s in missing
        ]
        run_store.uncommit(missing)
        all_commits = run_store.committed()
    stats = build_stats(prep, all_commits, new_commits, worker_infos, started, failed, counters)
    if failed:
        run_store.store.write_text("stats.json", json.dumps(stats, indent=2, sort_keys=True) + "\n")
        logger.error(
            "%d shard(s) failed (%s); %d of %d shards are committed and kept. Rerun the same command to retry.",
            len(failed),
            ", ".join(str(t.shard) for t in failed[:10]),
            len(all_commits),
            prep.identity["num_shards"],
        )
        return 1
    try:
        run_store.check_fence(None)  # the lock was taken over while this process was cut off: not ours to end
    except FencedError as e:
        logger.error("run %s: %s; not finalizing it (exit code 1)", prep.run_id, e)
        return 1
    remove_stale_temp(run_store, complete=True)  # also those too young at the start (a quick retry's)
    from pipeline.io.card import render_card

    manifest = build_manifest(prep, all_commits)
    run_store.finalize(manifest, stats, render_card(run_store.uri, manifest, stats))
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
    mid-write, or one still finishing a shard that its retry committed): those go too, and a complete run's
    folders hold its committed objects only."""
    count, size = run_store.store.remove_temp_files(older_than_s=STALE_TEMP_S)
    for folder in SHARD_FOLDERS if complete else ():
        removed, nbytes = run_store.store.child(folder).remove_temp_files(older_than_s=0)
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
    from pipeline.runner.ray_setup import connect, worker_options
    from pipeline.runner.worker import ProgressBoard, ShardWorker

    job = prep.job
    started_ray = connect(job.cluster)
    try:
        count = min(job.cluster.num_workers, len(tasks))
        options, threads = worker_options(job.cluster, count)
        keep_run_dtype(prep, options["num_gpus"])
        board = ray.remote(ProgressBoard).options(num_cpus=0).remote()
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
            new_commits[commit["shard"]] = commit
            progress.shard_done(commit["shard"], shard_rows(commit["shard"], size, total))

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
        )
        progress.final()
        counters = sampler_counters(ray, workers, board)
        for worker in workers:
            ray.kill(worker)
        return failed, infos, counters
    finally:
        if started_ray:
            ray.shutdown()
