"""Typed schemas of every configuration group.

These dataclasses are registered in Hydra's ConfigStore (see `store.py`), so a misspelt key or a value of
the wrong type fails while Hydra composes the config. `validate()` then checks values that types cannot
express (ranges, relations between keys) and names the offending key. Library code only ever receives
these plain, picklable dataclasses, never a Hydra DictConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BUILTIN_MODEL = "builtin:tiny-diffusiongemma"
BUILTIN_PROMPTS = "builtin:prompts"


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the key and says how to fix it."""


@dataclass
class ModelConfig:
    # A local directory in the Hugging Face layout, an s3:// prefix holding one, or a builtin model.
    path: str = BUILTIN_MODEL
    # Model family; "auto" reads config.json's model_type.
    family: str = "auto"
    # Weights dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.
    dtype: str = "auto"
    # Device for the sampler: auto (CUDA when the actor has a GPU), cpu or cuda.
    device: str = "auto"
    # Where models downloaded from s3:// are cached on each node: a node-local disk (default
    # $CANVASFLOW_CACHE/models, i.e. ~/.cache/canvasflow/models).
    cache_dir: str | None = None
    # Longest prompt (in tokens) a row may have; longer prompts become error rows. Default: the model's
    # context window minus sampler.max_new_tokens, capped at 4096 (it sizes the per-slot KV cache).
    max_prompt_tokens: int | None = None


@dataclass
class MaskSamplerConfig:
    # Mask-diffusion models (LLaDA, Dream; pipeline/sampler/mask/settings.py). None means: the model's
    # generation_config.json, else the algorithm's reference defaults: LLaDA's generate (steps =
    # max_new_tokens, block_length 32, low_confidence, temperature 0, cfg_scale 0, no threshold, no
    # self-correction, no cache) or Dream's diffusion_generate (steps = max_new_tokens, one block, origin,
    # eps 1e-3, temperature 0, no alg_temp, top_p or top_k).
    # llada (LLaDA's generate) or dream (Dream's diffusion_generate); null: the model family's own.
    algorithm: str | None = None
    # Denoising steps over all blocks (a multiple of max_new_tokens / block_length).
    steps: int | None = None
    # Semi-autoregressive block length (max_new_tokens must be a multiple of it).
    block_length: int | None = None
    # Confidence ranking masked positions: low_confidence, margin, entropy or random (Dream's names
    # maskgit_plus and topk_margin too); origin (dream only): each masked position committed with
    # probability 1 - s / t.
    remasking: str | None = None
    # 0: argmax; > 0: Gumbel-max sampling (keyed noise).
    temperature: float | None = None
    # Unsupervised classifier-free guidance scale (0: off).
    cfg_scale: float | None = None
    # Parallel decoding: commit every masked position of the block with confidence >= threshold, at least
    # one per step (Fast-dLLM); null follows the step schedule.
    threshold: float | None = None
    # Self-correction: mask again committed tokens of the current block whose probability fell below this.
    remask_threshold: float | None = None
    # Block KV caching: none (exact), prefix, dual.
    cache: str | None = None
    # Dream's algorithm only: the schedule's last point (linspace(1, eps, steps + 1)), in [0, 1).
    eps: float | None = None
    # Dream's algorithm only: > 0 draws the positions to commit in proportion to softmax(confidence / alg_temp).
    alg_temp: float | None = None
    # Dream's algorithm only: nucleus and top-k filters of the distribution predictions are drawn from.
    top_p: float | None = None
    top_k: int | None = None


@dataclass
class SamplerConfig:
    # Knobs of the DiffusionGemma reference. None means: the model's generation_config.json, else the
    # reference defaults (256, 48, 0.4, 0.8, 0.1, 1, 0.005).
    max_new_tokens: int | None = None
    max_denoising_steps: int | None = None
    t_min: float | None = None
    t_max: float | None = None
    entropy_bound: float | None = None
    stability_threshold: int | None = None
    confidence_threshold: float | None = None
    # Tokens per canvas; None means the model config's canvas_length.
    canvas_length: int | None = None
    # Base seed of the keyed random numbers: a row's draws depend on (seed, row id, canvas, step, position).
    seed: int = 0
    # Completions generated for each prompt (best-of-n, rejection sampling, preference pairs): output rows
    # share the prompt's id and differ by completion_index (0..n-1), each with its own keyed randomness
    # (completion 0 is the row's single completion).
    completions_per_prompt: int = 1
    # Stop strings: a completion ends where one of them first appears in its text, which is cut before it
    # (finish_reason "stop"); the row leaves the batch then instead of denoising more canvases. In a config
    # file: stop: ["\n\nQuestion:", "</answer>"]; on the command line: "sampler.stop=[Question:,'</answer>']" (a
    # value with symbols, or a number, in Hydra's quotes). A string or a list of strings (pipeline/sampler/stop.py).
    stop: Any = None
    # Rows denoised together per actor (KV-cache slots).
    batch_size: int = 8
    # continuous: a finished row leaves its slot at once and a queued row takes it.
    # static: every row runs until the slowest of its batch finishes (the reference's behaviour).
    batching: str = "continuous"
    # Vocabulary head / step kernels: auto (Triton on CUDA, torch elsewhere), torch or triton. LLaDA, Dream: the
    # attention kernels of the block caches (triton with mask.cache=none runs none: refused).
    backend: str = "auto"
    # Stop a canvas early once it is stable and confident; false runs max_denoising_steps every canvas.
    adaptive_stopping: bool = True
    # Self-correction: accepted tokens may be revised in later steps (the reference). false keeps every
    # accepted token fixed for the rest of the canvas (an ablation).
    revise_accepted: bool = True
    # Record each row's argmax canvas after every step (debugging; costs memory).
    record_drafts: bool = False
    # On CUDA, replay the decoder step as CUDA graphs of bucketed batch sizes (continuous batching).
    cuda_graphs: bool = True
    # Knobs of the mask-diffusion sampler (model families llada, dream); set for a DiffusionGemma model, they
    # fail at start-up.
    mask: MaskSamplerConfig = field(default_factory=MaskSamplerConfig)


@dataclass
class DataConfig:
    # JSONL / Parquet file or directory, a saved Hugging Face dataset directory, local or s3://,
    # "hf:<name>" for datasets.load_dataset, or the shipped prompts.
    path: str = BUILTIN_PROMPTS
    # auto (from the path), jsonl, parquet, hf_disk (save_to_disk directory), hf (load_dataset).
    format: str = "auto"
    # Column holding the prompt string.
    prompt_column: str = "prompt"
    # Column holding chat messages ([{"role", "content"}, ...]); used instead of prompt_column when set.
    messages_column: str | None = None
    # A prompt built from the row's columns instead of prompt_column: a str.format string with {column}
    # fields ({{ and }} for braces), e.g. "Question: {question}\nContext: {context}". Numbers are written as
    # text; a row missing a column, or with a null or non-scalar value, becomes an error row.
    prompt_template: str | None = None
    # A system turn put before every prompt by the chat template (a chat row's own system message wins).
    system_prompt: str | None = None
    # Column with a unique row id; None derives a stable id from each row's content and position.
    id_column: str | None = None
    # Render string prompts with the tokenizer's chat template as a single user turn (when it has one). Chat
    # messages (messages_column) are always rendered with it: false with messages_column fails at start-up.
    apply_chat_template: bool = True
    # Arguments for datasets.load_dataset when format=hf (e.g. {name: ..., split: train}).
    hf_kwargs: dict[str, Any] = field(default_factory=dict)
    # Split of a saved DatasetDict (format hf_disk / hf); refused on JSONL and Parquet files (no splits).
    split: str | None = None
    # Only the first N input rows (None: all).
    limit: int | None = None
    # The input columns carried to the output's `metadata` (JSON): None carries every column but the prompt's
    # and the id's; a list carries only those (e.g. [source, difficulty]; [] none), and a Parquet input's other
    # columns are not read at all (an image or a long document column costs nothing, and its values cannot
    # make a row an error row).
    metadata_columns: list[str] | None = None


@dataclass
class OutputConfig:
    # Local directory or s3://bucket/prefix; the run is written to <uri>/<run.id>/.
    uri: str = "./outputs"
    # Endpoint of an S3-compatible store (SeaweedFS, MinIO, R2, ...); None uses AWS.
    endpoint_url: str | None = None
    # Region for S3; None uses the standard AWS configuration chain.
    region: str | None = None
    # Parquet compression codec (a resumed run keeps the codec it was started with, recorded in _run.json).
    compression: str = "zstd"


@dataclass
class ClusterConfig:
    # local: start a Ray instance in this process. ray: connect to a running cluster at `address`.
    mode: str = "local"
    # Ray address for mode=ray ("auto" finds the cluster this job was submitted to).
    address: str | None = None
    # Actors, each loading the model once.
    num_workers: int = 2
    # GPUs per actor; None means 1 when the cluster has GPUs, else 0.
    num_gpus_per_worker: float | None = None
    # CPUs per actor.
    num_cpus_per_worker: float = 1.0
    # torch threads per actor on CPU; None divides the machine's cores between local actors.
    torch_threads: int | None = None
    # Give up (exit code 2) when the workers cannot all start within this time, e.g. because the cluster
    # has fewer free GPUs than num_workers x num_gpus_per_worker.
    worker_start_timeout_s: float = 600.0


@dataclass
class RunConfig:
    # Run id: the output goes to <output.uri>/<id>/. None derives it from the input and config, so that
    # running the same command again resumes the same run.
    id: str | None = None
    # Allow reusing an existing run id with a different input or config (its old outputs are removed).
    overwrite: bool = False
    # Rows per shard: the unit of work, retry and commit.
    shard_size: int = 64
    # Shards each worker holds at once. With continuous batching their rows share one sampler, so a shard's
    # last rows share the batch with the next shard's first ones instead of leaving slots empty, and a shard
    # is written and committed while the next one generates (pipeline/runner/stream.py). 1: one at a time.
    shards_in_flight: int = 2
    # Attempts per shard after a worker failure before the shard is reported as failed (a shard whose failed
    # attempts all shared their worker with other shards gets one more, alone). A shard that killed its worker
    # on each is searched for the rows that do, each of which gets as many attempts alone before it becomes an
    # error row (stage "worker") and the shard is committed without it, with as many attempts again
    # (pipeline/runner/isolate.py).
    max_shard_attempts: int = 3
    # Seconds a worker may go without finishing a shard (one shard's time, the shards in flight being worked
    # through in turn) before it is taken as hung (a stuck device, a deadlock, a storage call that never
    # returns): the worker is killed and replaced, and each shard it held counts a failed attempt. A
    # replacement's shards wait for its model load (at most cluster.worker_start_timeout_s), then get this.
    # null: no limit. Raise it for shards that legitimately take longer (large shard_size, long outputs).
    shard_timeout_s: float | None = 3600.0
    # Seconds between progress lines.
    progress_interval_s: float = 5.0
    # true: every start-up check (config, model, input, output), then what the run would do (new run or resume
    # and how much is left, rejected rows, the first prompt as the model sees it, prompt lengths in tokens);
    # nothing written, no worker started (pipeline/runner/dry_run.py).
    dry_run: bool = False


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # Optional per-row verify/postprocess stage: {_target_: "module.callable", ...kwargs}.
    postprocess: dict[str, Any] | None = None


@dataclass
class NightlyConfig:
    # Scheduled date (YYYY-MM-DD); None means today in `timezone`. The run id is <run_prefix>-<date>.
    date: str | None = None
    # IANA time zone in which "today" is taken (the schedule's time zone).
    timezone: str = "UTC"
    # Each prefix has its own lock and pointer: <output.uri>/LATEST for "nightly", LATEST-<run_prefix> for
    # any other.
    run_prefix: str = "nightly"
    # Delete complete nights older than this many days (None keeps everything). Incomplete runs are kept.
    retention_days: int | None = None
    # A lock whose holder has not heartbeated for this long is considered abandoned and taken over.
    lock_stale_s: float = 300.0
    # Run a night even though a newer one is already complete (a backfill); LATEST is not moved back.
    allow_late: bool = False


@dataclass
class NightlyJobConfig(JobConfig):
    nightly: NightlyConfig = field(default_factory=NightlyConfig)
