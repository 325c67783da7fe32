"""Value checks that types cannot express. Every error names the full key and says how to fix it."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

from pipeline.config.schema import ConfigError, DataConfig, JobConfig, NightlyConfig, NightlyJobConfig
from pipeline.data.prompts import template_fields
from pipeline.sampler.mask.settings import check_mask_knobs
from pipeline.sampler.settings import SettingsError, check_completions, check_knobs
from pipeline.sampler.stop import check_stops

# pipeline/runner/job.py: RUN_LOCK_STALE_S (120) plus one run-lock heartbeat interval (30 s)
MIN_NIGHTLY_LOCK_STALE_S = 150.0

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")  # scheme:/... (builtin:x and hf:x have no slash)
ENDPOINT_URL = re.compile(r"^https?://[^/?#\s]+", re.IGNORECASE)  # what botocore takes as endpoint_url
DATE_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}$")
NIGHTLY_SUFFIX = len("-YYYY-MM-DD")
CHOICES: dict[str, tuple[str, ...]] = {
    "model.family": ("auto", "diffusion_gemma", "llada", "dream"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.device": ("auto", "cpu", "cuda"),
    "sampler.batching": ("continuous", "static"),
    "sampler.backend": ("auto", "torch", "triton"),
    "data.format": ("auto", "jsonl", "parquet", "hf_disk", "hf"),
    "output.compression": ("zstd", "snappy", "gzip", "lz4", "brotli", "none"),
    "cluster.mode": ("local", "ray"),
}


MAX_RESOURCE = 1e14  # Ray refuses a larger amount of a resource (ray.init, actor options)
# cluster.num_workers: each worker is a Ray actor (its own process, its own copy of the model). Ray's published
# scalability envelope (release/benchmarks) runs 10,000 actors in one cluster; a larger count (1e23) went on
# to ray.init and failed there, "could not start a local Ray instance: ... check that this folder is writable".
MAX_WORKERS = 10_000
MAX_WAIT_S = 1e9  # seconds (about 31 years): ray.get(timeout=inf) raised OverflowError


def _get(job: JobConfig, key: str) -> Any:
    node: Any = job
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _fail(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} {why}")


# user@ or user:password@ after a scheme; a password may hold '/' (not a valid URL, so a "/" ends no host there:
# botocore echoes such an AWS_ENDPOINT_URL whole in its "not a valid URI" error). A scheme is looked for only
# where a run of its characters starts, and a password does not run past another URL's "://": else the search
# took time quadratic in the length of a word like a-b-c-... or of a text of URLs without '@' (100 KB: 20 s).
_URL_USERINFO = re.compile(
    r"(?<![a-z0-9+.-])([0-9+.-]*[a-z][a-z0-9+.-]*://)(?:[^@/\s]*|[^@/:\s]*:(?:(?!://)[^@\s])*)@",
    re.IGNORECASE,
)


def without_userinfo(text: str) -> str:
    """`text` for messages and outputs: the user:password@ of every URL in it replaced by ***@."""
    return _URL_USERINFO.sub(r"\1***@", text)


def check_metadata_columns(columns: Any) -> None:
    """data.metadata_columns: null, or a list of distinct, non-empty column names."""
    if columns is None:
        return
    if isinstance(columns, str) or not isinstance(columns, (list, tuple)):
        raise _fail(
            "data.metadata_columns",
            columns,
            "must be a list of column names, e.g. [source, difficulty] (null: all)",
        )
    for name in columns:
        if not isinstance(name, str) or not name.strip():
            raise _fail("data.metadata_columns", list(columns), f"holds {name!r}, which is no column name")
    repeated = sorted({name for name in columns if list(columns).count(name) > 1})
    if repeated:
        raise _fail("data.metadata_columns", list(columns), f"names {repeated[0]!r} twice")


def check_prompt_options(data) -> None:
    """data.prompt_template parses and is not combined with messages_column (nor either with a prompt_column
    set to another column than the default); chat messages are not combined with
    data.apply_chat_template=false; data.system_prompt has text and a chat template to go to (whether the
    model's template takes a system turn is checked when it loads)."""
    if data.messages_column and not data.apply_chat_template:
        # Messages have no text but the chat template's rendering: they were templated anyway, the key ignored.
        raise _fail(
            "data.apply_chat_template",
            False,
            f"turns the chat template off, and data.messages_column={data.messages_column!r} gives chat "
            "messages, which only the chat template turns into a prompt: remove data.apply_chat_template=false "
            "(it applies to plain prompts), or give plain prompts in data.prompt_column",
        )
    if data.prompt_template is not None:
        if data.messages_column:
            raise _fail(
                "data.prompt_template",
                data.prompt_template,
                f"builds a prompt string, and data.messages_column={data.messages_column!r} gives chat messages: "
                "set one of them",
            )
        try:
            template_fields(data.prompt_template)
        except ValueError as e:
            raise _fail("data.prompt_template", data.prompt_template, str(e)) from None
    if data.prompt_column != DataConfig.prompt_column and (data.messages_column or data.prompt_template):
        # The prompts come from the other key: the column was silently not read.
        key, value = (
            ("messages_column", data.messages_column)
            if data.messages_column
            else ("prompt_template", data.prompt_template)
        )
        raise _fail(
            "data.prompt_column",
            data.prompt_column,
            f"names a column of plain prompts, and data.{key}={value!r} gives the prompts instead, so the "
            "column would not be read: set one of them",
        )
    if data.system_prompt is not None:
        if not data.system_prompt.strip():
            raise _fail("data.system_prompt", data.system_prompt, "is empty: leave it unset (null) for none")
        if not data.apply_chat_template:
            raise _fail(
                "data.system_prompt",
                data.system_prompt[:60],
                "is a system turn of the chat template, and data.apply_chat_template=false renders none",
            )


def validate_job(job: JobConfig) -> JobConfig:
    """Raises ConfigError on the first invalid value; returns `job` unchanged otherwise."""
    for key, allowed in CHOICES.items():
        value = _get(job, key)
        if value not in allowed:
            raise _fail(key, value, f"is not one of {', '.join(allowed)}")

    positive_ints = (
        "sampler.batch_size",
        "cluster.num_workers",
        "run.shard_size",
        "run.shards_in_flight",
        "run.max_shard_attempts",
    )
    for key in positive_ints:
        value = _get(job, key)
        if value <= 0:
            raise _fail(key, value, "must be a positive integer")
    if job.cluster.num_workers > MAX_WORKERS:
        raise _fail(
            "cluster.num_workers",
            job.cluster.num_workers,
            f"is more workers than Ray runs: give at most {MAX_WORKERS:,} (Ray's tested scale is 10,000 actors "
            "in one cluster, and each worker is one actor holding the model; the job starts no more workers "
            "than the input has shards)",
        )
    try:
        check_completions(job.sampler.completions_per_prompt, "sampler.completions_per_prompt")
    except SettingsError as e:
        raise ConfigError(str(e)) from None
    for key in ("model.max_prompt_tokens", "sampler.canvas_length", "data.limit", "cluster.torch_threads"):
        value = _get(job, key)
        if value is not None and value <= 0:
            raise _fail(key, value, "must be a positive integer (or null for the default)")
    # Written `not value >= 0` so that NaN, which compares false with everything, fails too. The upper bounds
    # are Ray's: a larger (or infinite) amount failed only once Ray had started, with an OverflowError.
    if (
        job.cluster.num_gpus_per_worker is not None
        and not 0 <= job.cluster.num_gpus_per_worker <= MAX_RESOURCE
    ):
        raise _fail(
            "cluster.num_gpus_per_worker",
            job.cluster.num_gpus_per_worker,
            f"must be >= 0 and at most {MAX_RESOURCE:g} (Ray's limit)",
        )
    if not 0 <= job.cluster.num_cpus_per_worker <= MAX_RESOURCE:
        raise _fail(
            "cluster.num_cpus_per_worker",
            job.cluster.num_cpus_per_worker,
            f"must be >= 0 and at most {MAX_RESOURCE:g} (Ray's limit)",
        )
    local_cpus = job.cluster.num_workers * job.cluster.num_cpus_per_worker + 1  # ray_setup sizes the instance
    if job.cluster.mode == "local" and local_cpus > MAX_RESOURCE:
        raise ConfigError(
            f"cluster.num_workers={job.cluster.num_workers} x cluster.num_cpus_per_worker="
            f"{job.cluster.num_cpus_per_worker:g} (+1 for the driver) is {local_cpus:g} CPUs for the local Ray "
            f"instance, more than Ray's limit of {MAX_RESOURCE:g}: lower either"
        )
    if not 0 < job.cluster.worker_start_timeout_s <= MAX_WAIT_S:
        raise _fail(
            "cluster.worker_start_timeout_s",
            job.cluster.worker_start_timeout_s,
            f"must be > 0 (seconds) and at most {MAX_WAIT_S:g} (Ray's waits take no more)",
        )
    if job.run.shard_timeout_s is not None and not job.run.shard_timeout_s > 0:
        raise _fail("run.shard_timeout_s", job.run.shard_timeout_s, "must be > 0 (or null for no limit)")
    if not job.run.progress_interval_s > 0:
        raise _fail("run.progress_interval_s", job.run.progress_interval_s, "must be > 0")

    try:
        check_stops(job.sampler.stop)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        check_knobs(vars(job.sampler), prefix="sampler.")
        check_mask_knobs(vars(job.sampler.mask), prefix="sampler.mask.")
    except SettingsError as e:  # MaskSettingsError included
        raise ConfigError(str(e)) from None

    for key in ("model.path", "data.path", "data.prompt_column", "output.uri"):
        if not str(_get(job, key)).strip():
            raise _fail(key, _get(job, key), "must not be empty")
    check_prompt_options(job.data)
    check_metadata_columns(job.data.metadata_columns)
    if job.run.id is not None and not RUN_ID_PATTERN.match(job.run.id):
        raise _fail(
            "run.id",
            job.run.id,
            "must start with a letter or digit and use only letters, digits, '.', '_' and '-' (128 at most)",
        )
    if job.cluster.mode == "ray" and not job.cluster.address:
        raise _fail(
            "cluster.address",
            job.cluster.address,
            "is required with cluster=ray: give the head's address (e.g. ray://head:10001) or 'auto'",
        )
    if job.cluster.address and ("@" in job.cluster.address or SIGNED_QUERY.search(job.cluster.address)):
        # not echoed: the driver logs the address it connects to, and errors name it
        raise ConfigError(
            "cluster.address holds credentials (user:password@ or a token in a query): remove them; Ray's "
            "token authentication takes the token from RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (docs/cluster.md)"
        )
    if job.cluster.mode == "ray" and job.cluster.address.lower().startswith(("http://", "https://")):
        raise _fail(
            "cluster.address",
            without_userinfo(job.cluster.address),
            "is a dashboard / Jobs API address (the one `ray job submit` takes): a driver connects to the "
            "cluster's GCS (host:6379) or to Ray Client (ray://host:10001), or 'auto' in a submitted job",
        )
    for key in ("model.path", "data.path", "output.uri"):
        check_location(key, str(_get(job, key)))
    if is_inside(job.output.uri, job.data.path):
        raise _fail(
            "output.uri",
            job.output.uri,
            f"is inside data.path={job.data.path!r}: the next run of the same command would read this run's "
            "files (data/*.parquet, _manifest.json, ...) as input; put the output outside the input directory",
        )
    check_endpoint("output.endpoint_url", job.output.endpoint_url)
    if job.postprocess is not None:
        target = job.postprocess.get("_target_")
        if not isinstance(target, str) or "." not in target:
            raise _fail(
                "postprocess._target_",
                target,
                "must name a callable as 'module.function' (e.g. pipeline.tasks.checker.check_row)",
            )
    if isinstance(job, NightlyJobConfig):
        validate_nightly(job.nightly)
    return job


def is_inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or below it (local paths or s3:// prefixes; builtin: and hf: inputs are no
    location)."""
    if any(p.startswith(("builtin:", "hf:")) for p in (path, folder)):
        return False
    if path.startswith("s3://") != folder.startswith("s3://"):
        return False
    if path.startswith("s3://"):
        return f"{path.rstrip('/')}/".startswith(f"{folder.rstrip('/')}/")
    inner, outer = Path(path).expanduser().resolve(), Path(folder).expanduser().resolve()
    return inner == outer or outer in inner.parents


def validate_nightly(nightly: NightlyConfig) -> NightlyConfig:
    """The nightly.* values: a real date, a run prefix that makes a valid run id, non-negative durations."""
    if nightly.date is not None:
        try:
            if not DATE_PATTERN.match(nightly.date):
                raise ValueError("not YYYY-MM-DD")
            dt.date.fromisoformat(nightly.date)
        except ValueError as e:
            raise _fail(
                "nightly.date", nightly.date, f"is not a date ({e}): give YYYY-MM-DD, e.g. 2026-02-28"
            ) from None
    if not RUN_ID_PATTERN.match(f"{nightly.run_prefix}-2000-01-01"):
        raise _fail(
            "nightly.run_prefix",
            nightly.run_prefix,
            "must start with a letter or digit and use only letters, digits, '.', '_' and '-' (no '/'; "
            f"{128 - NIGHTLY_SUFFIX} characters at most): the run id <run_prefix>-<date> is one directory "
            "under output.uri",
        )
    if nightly.retention_days is not None and nightly.retention_days < 0:
        raise _fail(
            "nightly.retention_days",
            nightly.retention_days,
            "must be >= 0 (complete nights older than this many days are deleted), or null to keep every night",
        )
    if not nightly.lock_stale_s >= MIN_NIGHTLY_LOCK_STALE_S:
        raise _fail(
            "nightly.lock_stale_s",
            nightly.lock_stale_s,
            f"must be >= {MIN_NIGHTLY_LOCK_STALE_S:g} (seconds): a retried night waits this long for its dead "
            "predecessor's nightly lock, and must then find that predecessor's run lock stale too (after 120 s "
            "without a heartbeat, which comes every 30 s)",
        )
    return nightly


S3_BUCKET = re.compile(r"^[A-Za-z0-9._-]{1,255}$")  # what botocore accepts
S3_USERINFO = re.compile(r"^s3://[^/@:]+:[^@]*@[A-Za-z0-9._-]+(/|$)")  # s3://KEY:SECRET@bucket/...


# A query parameter of a presigned (or otherwise signed) URL: its signature, key id or session token.
SIGNED_QUERY = re.compile(
    r"[?&;](?:x-amz-[a-z-]*|signature|sig|awsaccesskeyid|[a-z_-]*token)=", re.IGNORECASE
)


def check_no_credentials(key: str, value: str) -> None:
    """ConfigError, not echoing `value`, when the location holds credentials: s3://KEY:SECRET@bucket, or the
    query of a presigned URL (X-Amz-Signature, X-Amz-Credential, X-Amz-Security-Token, ...)."""
    if SIGNED_QUERY.search(value):
        raise ConfigError(
            f"{key} holds a signed URL's query (a signature, key id or token after '?'): remove it; give "
            "s3://bucket/prefix or a local path, with S3 credentials from the environment or the AWS "
            "configuration chain (locations are written in logs and outputs)"
        )
    if not value.startswith("s3://"):
        return
    bucket = value[len("s3://") :].partition("/")[0]
    if "@" in bucket or S3_USERINFO.match(
        value
    ):  # not echoed: s3://KEY:SECRET@bucket (a secret may hold '/')
        raise ConfigError(
            f"{key} holds credentials (s3://user:password@bucket): remove them; S3 credentials come from the "
            "environment or the AWS configuration chain, and locations are written in logs and outputs"
        )


def check_location(key: str, value: str) -> None:
    """ConfigError unless `value` is a local path or s3://bucket[/prefix]."""
    check_no_credentials(key, value)
    scheme = URI_SCHEME.match(value)
    if scheme and not value.startswith("s3://"):  # e.g. S3://b, s3:/b, gs://b: would be a local folder
        raise _fail(
            key,
            value
            if "@" not in value
            else f"{scheme.group(0)}/...",  # https://user:pass/word@host: not echoed
            f"looks like a {scheme.group(1)!r} URI; only s3://bucket/prefix (lowercase, two slashes) and "
            "local paths are supported",
        )
    if not value.startswith("s3://"):
        return
    bucket = value[len("s3://") :].partition("/")[0]
    if not bucket:  # s3://, s3:///x
        raise _fail(key, value, "needs a bucket: s3://bucket/prefix")
    if not S3_BUCKET.match(bucket):
        raise _fail(
            key,
            value,
            f"names the bucket {bucket!r}: a bucket name has only letters, digits, '.', '-' and '_'",
        )


def check_endpoint(key: str, endpoint: str | None) -> None:
    """ConfigError unless `endpoint` is None or an http(s) URL with a host and no credentials in it."""
    if endpoint is None:
        return
    if "@" in endpoint:
        # not echoed: the value holds a password (one with a '/', as AWS secret keys have, ends the host at
        # that '/'); error messages name the endpoint
        raise ConfigError(
            f"{key} holds credentials (user:password@host): remove them; S3 credentials come from the "
            "environment or the AWS configuration chain, and an endpoint is written in logs and errors"
        )
    if "?" in endpoint or "#" in endpoint:
        # not echoed: a query is where a signed URL carries its signature and session token (X-Amz-Signature,
        # X-Amz-Security-Token), and botocore takes no endpoint with one
        raise ConfigError(
            f"{key} holds a query string or fragment ('?...' or '#...'): an endpoint is http(s)://host[:port] "
            "(a presigned URL's X-Amz-Signature or token is no setting: S3 credentials come from the "
            "environment or the AWS configuration chain)"
        )
    if not ENDPOINT_URL.match(endpoint):
        raise _fail(
            key,
            endpoint,
            "must be an http:// or https:// URL with a host, e.g. http://host:port (or null for AWS)",
        )
