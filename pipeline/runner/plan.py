"""Planning a generation job: every check that can fail before GPU work (model, settings, postprocess,
output, input, the run id's identity) and what the run will be (`Prepared`), without writing to the run.
`pipeline/runner/job.py` then opens the run under its lock and generates it; a dry run reports the plan
(`pipeline/runner/dry_run.py`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from pipeline.config.redact import known_secrets, without_secret_texts
from pipeline.config.schema import ConfigError, JobConfig
from pipeline.config.validate import is_inside
from pipeline.data.prompts import check_system_prompt
from pipeline.data.readers import read_input, resolve_path, unused_id_column
from pipeline.generation import GenerationSpec, max_prompt_tokens_for
from pipeline.io.commit import RunStore
from pipeline.io.store import is_s3, open_store
from pipeline.models.loader import (
    MASK_FAMILIES,
    ModelInfo,
)
from pipeline.postprocess import load_postprocess
from pipeline.runner.identity import (
    config_fingerprint,
    config_settings,
    derive_run_id,
)
from pipeline.runner.model_check import inspect_job_model
from pipeline.sampler.mask.settings import check_mask_backend, mask_user_values, resolve_mask_settings
from pipeline.sampler.settings import (
    USER_KNOBS,
    SettingsError,
    diffusion_gemma_user_values,
    max_length_note,
    resolve_settings,
)
from pipeline.sampler.stop import check_stops, escape_hint, stop_token_ids

logger = logging.getLogger("canvasflow")


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


def check_local_gpus(job: JobConfig, num_shards: int) -> None:
    """cluster.mode=local with cluster.num_gpus_per_worker set: the workers' GPUs must be on this machine, or Ray
    waits for them (cluster.worker_start_timeout_s, 10 minutes by default, logging that no node fits)."""
    gpus, cluster = job.cluster.num_gpus_per_worker, job.cluster
    if cluster.mode != "local" or not gpus or not num_shards:
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    workers = min(cluster.num_workers, num_shards)  # the job starts no more workers than shards
    fit = (
        have * math.floor(1 / gpus + 1e-9) if gpus < 1 else math.floor(have / gpus + 1e-9)
    )  # as Ray packs them
    if fit >= workers:
        return
    raise ConfigError(
        f"cluster.num_gpus_per_worker={gpus:g} for {workers} worker(s), but this machine has {have} CUDA "
        f"device(s), room for {fit} such worker(s) (cluster.mode=local runs the workers here): lower "
        "cluster.num_workers or cluster.num_gpus_per_worker, unset cluster.num_gpus_per_worker (it then means 1 "
        "where the machine has GPUs, else 0), or run on a GPU cluster with cluster=ray"
    )


def plan(job: JobConfig) -> Prepared:
    """Every check that can fail before GPU work: model config, settings, postprocess, output, input, and the
    run id's identity (a conflict without run.overwrite). Writes nothing in the run directory: that is
    open_run's, under the run lock."""
    check_local_device(job)
    # The tokenizer, for the system-prompt and stop-string checks and a dry run's prompts (an s3:// model's
    # tokenizer files only).
    stops = check_stops(job.sampler.stop)
    info, model_id, tokenizer = inspect_job_model(
        job,
        tokenizer=job.data.system_prompt is not None or bool(stops) or job.run.dry_run,
        shapes=job.run.dry_run,
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
    if stops:
        try:
            stop_token_ids(stops, tokenizer)  # refuses a stop string that can never match
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
            check_mask_backend(settings, job.sampler.backend)
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
    unused_id = unused_id_column(job.data, records.columns)
    if unused_id:
        logger.warning("%s", unused_id)

    settings_dict = settings.to_dict()
    if stops:  # only when set, so that the identity (and derived run id) of other runs stays
        settings_dict["stop"] = list(stops)
        hint = escape_hint(stops)
        if hint:
            logger.warning("%s", hint)
    config = config_settings(job, model_id, settings_dict)
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
    check_local_gpus(job, num_shards)
    identity = {
        "run_id": run_id,
        "input_path": job.data.path,
        "input_fingerprint": records.fingerprint,
        "config_fingerprint": config_fp,
        # What config_fp digests, as _run.json holds it: a rerun refused for another config names the settings.
        # Resolved, unlike _config.yaml: a `${oc.env:...}` secret may be in any value (a URL's ?key=, a header
        # in a list), so the values of secret-like keys and variables are removed from every text.
        "config": without_secret_texts(
            json.loads(json.dumps(config, default=str)), known_secrets(job.postprocess)
        ),
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
