"""Prompts in, output rows out: tokenisation, the diffusion sampler, detokenisation and postprocessing.

`Generator` is built once per process (it loads the model) from a picklable `GenerationSpec`; the Ray
workers and the one-process `pipeline.LLM` API both use it, so both produce the same rows. Rows that cannot
be generated (prompt too long, template failure, postprocess error or filter) come back as error rows.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.config.redact import known_secrets, without_secrets
from pipeline.data.prompts import (
    API_NAMES,
    CHARS_BOUND_FACTOR,
    JOB_NAMES,
    PromptTooLong,
    check_system_prompt,
    max_token_chars,
    prompt_ids,
)
from pipeline.io.columns import RESERVED_COLUMNS
from pipeline.postprocess import load_postprocess
from pipeline.sampler.stop import StopStrings, stop_token_ids

if TYPE_CHECKING:
    from pipeline.runner.stream import SharedSampler

logger = logging.getLogger(__name__)

MAX_PROMPT_TOKENS_CAP = 4096


@dataclass
class PromptRecord:
    id: str
    prompt: str
    is_chat: bool = False
    source_index: int = -1
    metadata: str | None = None


@dataclass
class GenerationSpec:
    """Everything a process needs to build a Generator; plain values only (sent to Ray actors)."""

    model_path: str
    dtype: str = "auto"
    device: str = "auto"
    cache_dir: str | None = None
    endpoint_url: str | None = None
    region: str | None = None
    model_version: str | None = None  # an s3:// model's content identity: its cache copy is per version
    sampler: dict[str, Any] = field(default_factory=dict)  # user knob overrides (None = unset)
    batch_size: int = 8
    batching: str = "continuous"
    backend: str = "auto"
    cuda_graphs: bool = True
    max_prompt_tokens: int | None = None
    apply_chat_template: bool = True
    run_id: str = ""
    postprocess: dict[str, Any] | None = None
    completions_per_prompt: int = 1
    system_prompt: str | None = None  # a system turn before every prompt (pipeline/data/prompts.py)
    stop: tuple[str, ...] = ()  # stop strings (pipeline/sampler/stop.py)
    api: bool = False  # errors name the Python API's keywords (LLM) rather than the job's config keys


@dataclass
class GenerationOutput:
    """Rows and error rows of one `generate` call. The counters cover every row the sampler ran, including
    rows the postprocess stage then filtered out or rejected (those are in `errors`, not in `rows`)."""

    rows: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    tokens: int = 0
    denoising_steps: int = 0
    canvases: int = 0
    filtered: int = 0
    wall_s: float = 0.0


@dataclass
class Prepared:
    """Records tokenized for the sampler: `requests[i]` runs completion `requests[i].completion` of `kept[i]`,
    whose prompt has `lengths[i]` tokens (a record with n completions per prompt is kept n times, its
    requests one after another); `errors` holds the records that cannot run (stage "tokenize")."""

    requests: list[Any]
    kept: list[PromptRecord]
    lengths: list[int]
    errors: list[dict[str, Any]]


def max_prompt_tokens_for(requested: int | None, context_window: int, settings: Any) -> int:
    """The prompt budget: requested, or the context window minus the completion's positions capped at 4096.
    A DiffusionGemma completion takes whole canvases: max_new_tokens rounded up to sampler.canvas_length."""
    span, taken = settings.max_new_tokens, f"sampler.max_new_tokens={settings.max_new_tokens}"
    canvas = getattr(settings, "canvas_length", None)
    if canvas is not None and settings.max_canvases * canvas > span:
        span = settings.max_canvases * canvas
        taken += f" in canvases of sampler.canvas_length={canvas} ({span} positions)"
    room = context_window - span
    if room <= 0:
        raise ValueError(
            f"{taken} leaves no room for a prompt in the model's context window of {context_window} tokens"
        )
    if requested is None:
        return min(room, MAX_PROMPT_TOKENS_CAP)
    if requested > room:
        raise ValueError(
            f"model.max_prompt_tokens={requested} plus {taken} exceeds the model's context window of "
            f"{context_window} tokens"
        )
    return requested


class SlotsDoNotFit(MemoryError):
    """The sampler's slots and KV cache (sampler.batch_size) do not fit on the device: the user's to fix by a
    smaller batch, so a worker's start fails with this one line (pipeline/runner/worker.py start_errors)."""


class Generator:
    def __init__(self, spec: GenerationSpec) -> None:
        from pipeline.models.loader import MASK_FAMILIES, load_model
        from pipeline.sampler.engine import DiffusionSampler
        from pipeline.sampler.settings import diffusion_gemma_user_values, resolve_settings

        self.spec = spec
        # Calls from several threads (a worker's shards in flight) tokenize, decode and postprocess one at a
        # time: tokenizers and user callables need not be thread-safe; only the sampler runs alongside.
        self._host_lock = threading.Lock()
        # Without a SharedSampler, each call runs a batch of its own in the sampler's slots and cache: one at a
        # time (two threads of LLM.generate took each other's slots).
        self._sampler_lock = threading.Lock()
        self.loaded = load_model(
            spec.model_path,
            dtype=spec.dtype,
            device=spec.device,
            cache_dir=spec.cache_dir,
            endpoint_url=spec.endpoint_url,
            region=spec.region,
            version=spec.model_version,
        )
        info = self.loaded.info
        names = API_NAMES if spec.api else JOB_NAMES
        check_system_prompt(self.loaded.tokenizer, spec.system_prompt, spec.apply_chat_template, names)
        self.stop = self._stop_strings(spec)
        if info.family in MASK_FAMILIES:  # LLaDA, Dream: the mask-diffusion sampler (pipeline/sampler/mask)
            self._init_mask_sampler(spec)
            return
        user = diffusion_gemma_user_values(spec.sampler, info.family)  # a mask-sampler knob set is an error
        self.settings = resolve_settings(
            user,
            info.generation_config,
            canvas_length=info.canvas_length,
            eos_token_ids=info.eos_token_ids,
            pad_token_id=info.pad_token_id,
        )
        self.max_prompt_tokens = max_prompt_tokens_for(
            spec.max_prompt_tokens, info.context_window, self.settings
        )
        self.sampler = DiffusionSampler(
            self.loaded.model,
            self.settings,
            max_batch=spec.batch_size,
            max_prompt_tokens=self.max_prompt_tokens,
            backend=spec.backend,
            step_graphs="auto" if spec.cuda_graphs else "off",
            stop=self.stop,
        )
        self.tokenizer = self.loaded.tokenizer
        self.postprocess, self.postprocess_name, self.postprocess_columns = load_postprocess(spec.postprocess)
        self.postprocess_secrets = _postprocess_secrets(spec.postprocess)

    def _init_mask_sampler(self, spec: GenerationSpec) -> None:
        from pipeline.sampler.mask.engine import MaskDiffusionSampler
        from pipeline.sampler.mask.settings import check_mask_backend, mask_user_values, resolve_mask_settings

        info = self.loaded.info
        self.settings = resolve_mask_settings(
            mask_user_values(spec.sampler, info.family),
            info.generation_config,
            family=info.family,
            mask_token_id=info.mask_token_id,
            eos_token_ids=info.eos_token_ids,
            pad_token_id=info.pad_token_id,
        )
        self.settings.check_completions(spec.completions_per_prompt)
        check_mask_backend(self.settings, spec.backend)
        self.max_prompt_tokens = max_prompt_tokens_for(
            spec.max_prompt_tokens, info.context_window, self.settings
        )
        self.sampler = MaskDiffusionSampler(
            self.loaded.model,
            self.settings,
            max_batch=spec.batch_size,
            max_prompt_tokens=self.max_prompt_tokens,
            backend=spec.backend,
            stop=self.stop,
        )
        self.tokenizer = self.loaded.tokenizer
        self.postprocess, self.postprocess_name, self.postprocess_columns = load_postprocess(spec.postprocess)
        self.postprocess_secrets = _postprocess_secrets(spec.postprocess)

    def _stop_strings(self, spec: GenerationSpec) -> StopStrings | None:
        """The samplers' stop-string check, with a tokenizer of its own: it runs in the sampler's thread, beside
        the shards' tokenizing and decoding (under _host_lock), and tokenizers need not be thread-safe."""
        if not spec.stop:
            return None
        tokenizer = copy.deepcopy(self.loaded.tokenizer)
        token_ids = stop_token_ids(spec.stop, tokenizer, "stop" if spec.api else "sampler.stop")
        return StopStrings(spec.stop, lambda ids: tokenizer.decode(ids, skip_special_tokens=True), token_ids)

    @property
    def model_name(self) -> str:
        return self.loaded.info.name

    def reserve_memory(self) -> None:
        """Takes the sampler's slots and KV cache now rather than at its first batch, so that a batch the device
        cannot hold fails the worker's start (exit 2, "could not start") instead of every shard at run time."""
        import torch

        try:
            self.sampler._ensure_storage()
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
                raise
            raise SlotsDoNotFit(
                f"the sampler's {self.spec.batch_size} slots (sampler.batch_size) and their KV cache do not fit "
                f"on {self.loaded.model.device}: lower sampler.batch_size (or sampler.canvas_length / "
                f"model.max_prompt_tokens). {str(e).strip().splitlines()[-1][:300]}"
            ) from None

    def _error(
        self, record: PromptRecord, stage: str, reason: str, completion: int | None = None
    ) -> dict[str, Any]:
        """An errors/ row for `record`; `completion`: the completion it is about, named in the reason when the
        prompt has several (a postprocess rejects completions one by one)."""
        if completion is not None and self.completions > 1:
            reason = f"completion {completion}: {reason}"
        return {
            "id": record.id,
            "source_index": record.source_index,
            "stage": stage,
            "reason": reason,
            "raw": record.prompt[:2000],
            "run_id": self.spec.run_id,
        }

    def _check_extra(self, extra: Any, row: dict[str, Any]) -> str | None:
        """Why a postprocess result cannot be added to `row` (None if it can)."""
        name = self.postprocess_name
        if not isinstance(extra, Mapping):
            shown = repr(extra)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            return (
                f"{name} returned a {type(extra).__name__} ({shown}); a postprocess callable must return a "
                "dict of the columns to add, e.g. {'score': 0.5}, or None to filter the row out"
            )
        bad = [k for k in extra if not isinstance(k, str) or not k]
        if bad:
            return f"{name} returned column names that are not non-empty strings: {bad[:5]!r}"
        taken = [k for k in extra if k in row or k in RESERVED_COLUMNS]
        if taken:
            return (
                f"{name} returned columns the output already has: {taken[:5]}; a postprocess adds columns and "
                "cannot replace the row's own (id, completion, provenance): rename them"
            )
        return None

    @functools.cached_property
    def _token_chars(self) -> int:
        return max_token_chars(self.tokenizer)

    @property
    def _max_prompt_chars(self) -> int:
        """Rendered prompts longer than this cannot fit in max_prompt_tokens: rejected untokenized."""
        return self.max_prompt_tokens * self._token_chars * CHARS_BOUND_FACTOR

    @property
    def completions(self) -> int:
        """Completions generated for each prompt (GenerationSpec.completions_per_prompt)."""
        return self.spec.completions_per_prompt

    def generate(
        self,
        records: list[PromptRecord],
        on_row: Callable[[int, int], None] | None = None,
        *,
        shared: SharedSampler | None = None,
    ) -> GenerationOutput:
        """Generates `completions` completions of every record; `on_row(tokens, steps)` is called as each
        finishes. With `shared` (this generator's sampler running in a thread, pipeline/runner/stream.py) the
        rows join those of other calls in flight instead of running in a batch of their own."""
        start = time.perf_counter()
        with self._host_lock:
            prepared = self.prepare(records)

        def finished(result) -> None:
            if on_row is not None:
                on_row(len(result.token_ids), result.denoising_steps)

        if shared is not None:
            results = shared.run(prepared.requests, on_result=finished)
        else:
            with self._sampler_lock:
                results = self.sampler.generate(
                    prepared.requests, batching=self.spec.batching, on_result=finished
                )
        with self._host_lock:
            return self.finish(prepared, results, started=start)

    def prepare(self, records: list[PromptRecord]) -> Prepared:
        """Tokenizes the records into sampler requests; rows that cannot run become tokenize errors."""
        from pipeline.sampler.engine import Request

        prepared = Prepared(requests=[], kept=[], lengths=[], errors=[])
        requests, kept, lengths, errors = prepared.requests, prepared.kept, prepared.lengths, prepared.errors
        for record in records:
            try:
                ids = prompt_ids(
                    self.tokenizer,
                    record.prompt,
                    is_chat=record.is_chat,
                    apply_chat_template=self.spec.apply_chat_template,
                    max_chars=self._max_prompt_chars,
                    system_prompt=self.spec.system_prompt,
                )
            except PromptTooLong as e:
                errors.append(
                    self._error(
                        record,
                        "tokenize",
                        f"{e}: far more than model.max_prompt_tokens={self.max_prompt_tokens} tokens can hold "
                        f"(no token of this tokenizer covers more than {self._token_chars} characters); not "
                        "tokenized",
                    )
                )
                continue
            except Exception as e:  # noqa: BLE001 - a bad row never stops the job
                errors.append(self._error(record, "tokenize", f"cannot render the prompt: {e}"))
                continue
            if not ids:
                errors.append(self._error(record, "tokenize", "the prompt has no tokens"))
            elif len(ids) > self.max_prompt_tokens:
                errors.append(
                    self._error(
                        record,
                        "tokenize",
                        f"prompt has {len(ids)} tokens, more than fit: model.max_prompt_tokens={self.max_prompt_tokens} "
                        f"(context window {self.loaded.info.context_window}, "
                        f"sampler.max_new_tokens={self.settings.max_new_tokens})",
                    )
                )
            else:
                for completion in range(self.completions):
                    requests.append(Request(record.id, ids, completion))
                    kept.append(record)
                    lengths.append(len(ids))

        return prepared

    def finish(self, prepared: Prepared, results: list, *, started: float) -> GenerationOutput:
        """The output rows of `prepared`'s sampler results (in request order), through the postprocess stage."""
        out = GenerationOutput(rows=[], errors=list(prepared.errors))
        for record, n_prompt, request, result in zip(
            prepared.kept, prepared.lengths, prepared.requests, results, strict=True
        ):
            index = request.completion
            completion = self.tokenizer.decode(result.token_ids, skip_special_tokens=True)
            if result.finish_reason == "stop":  # the text ends before the stop string
                completion = self.stop.cut(completion)
            row = {
                "id": record.id,
                "completion_index": index,
                "prompt": record.prompt,
                "completion": completion,
                "completion_tokens": len(result.token_ids),
                "prompt_tokens": n_prompt,
                "denoising_steps": result.denoising_steps,
                "canvases": result.canvases,
                "finish_reason": result.finish_reason,
                "model": self.model_name,
                "seed": self.settings.seed,
                "run_id": self.spec.run_id,
                "source_index": record.source_index,
                "metadata": record.metadata,
            }
            if result.drafts is not None:
                row["drafts"] = [[self.tokenizer.decode(d) for d in canvas] for canvas in result.drafts]
            out.tokens += row["completion_tokens"]
            out.denoising_steps += result.denoising_steps
            out.canvases += result.canvases
            if self.postprocess is not None:
                try:
                    extra = self.postprocess(dict(row))
                except Exception as e:  # noqa: BLE001 - a bad row never stops the job
                    # e.g. an HTTP client's error naming the URL with its ?key=: the callable's secrets not shown
                    reason = without_secrets(
                        f"{self.postprocess_name} raised {e!r}", self.postprocess_secrets
                    )
                    out.errors.append(self._error(record, "postprocess", reason, index))
                    continue
                if extra is None:
                    out.filtered += 1
                    out.errors.append(
                        self._error(record, "postprocess", f"filtered out by {self.postprocess_name}", index)
                    )
                    continue
                problem = self._check_extra(extra, row)
                if problem is not None:
                    out.errors.append(self._error(record, "postprocess", problem, index))
                    continue
                row.update(extra)
            out.rows.append(row)
        out.wall_s = time.perf_counter() - started
        return out


def _postprocess_secrets(postprocess: dict[str, Any] | None) -> list[str]:
    """What a postprocess callable's exception must not show in errors/: the secret-like values it was given
    and those of this process's environment (an API key it reads from os.environ itself), longest first."""
    return known_secrets(postprocess) if postprocess else []
