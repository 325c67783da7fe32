"""One-process Python API for notebooks and tests, in the spirit of vLLM's `LLM.generate`.

    from pipeline import LLM
    llm = LLM("builtin:tiny-diffusiongemma", max_denoising_steps=32)
    outs = llm.generate(["Add: 482+519", "Sort: 3 1 2"])
    outs[0].completion, outs[0].denoising_steps

The model is loaded once; results carry the same fields as the pipeline's output rows and, with the same
seed and settings, the same completions (randomness is keyed by row id, so give ids to match a run).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from numbers import Integral
from typing import Any

from pipeline.config.schema import BUILTIN_MODEL
from pipeline.config.validate import CHOICES, check_endpoint, check_no_credentials
from pipeline.data.records import derived_id
from pipeline.data.values import SURROGATE_HINT, blank_problem, check_prompt_value, has_surrogate
from pipeline.generation import GenerationSpec, Generator, PromptRecord
from pipeline.models.loader import MASK_FAMILIES, ModelError
from pipeline.sampler.settings import (
    USER_KNOBS,
    SettingsError,
    check_completions,
    is_int,
    max_length_note,
)
from pipeline.sampler.stop import check_stops

logger = logging.getLogger(__name__)
# The job's keys in a message, as the API's keywords: 'sampler.' before a sampler key (sampler.mask.steps=16 reads
# mask.steps=16), 'model.' before the model keys LLM takes as keywords, model.path= as model=. Only as words of
# their own: not within a path or name ('/runs/sampler.v2', 'my-model.dtype').
NOT_WITHIN = r"(?<![\w./~-])"
JOB_KEY = re.compile(
    rf"{NOT_WITHIN}sampler\.(?=[a-z_])|{NOT_WITHIN}model\.(?=(?:dtype|device|max_prompt_tokens|endpoint_url)\b)"
)
MODEL_PATH = re.compile(rf"{NOT_WITHIN}model\.path=")
JOB_GROUPS = (
    ("sampled with sampler.mask.* (", "sampled with mask={...} ("),
    ("sampled with sampler.* (", "sampled with LLM(...) keywords ("),
)


def api_message(text: str) -> str:
    """An error as the API's user writes settings: keywords, not the job's sampler.* and model.* keys."""
    for job, api in JOB_GROUPS:
        text = text.replace(job, api)
    return JOB_KEY.sub("", MODEL_PATH.sub("model=", text))


@dataclass
class Completion:
    id: str
    prompt: str
    completion: str
    completion_tokens: int
    prompt_tokens: int
    denoising_steps: int
    canvases: int
    finish_reason: str
    model: str
    seed: int
    extra: dict[str, Any] = field(default_factory=dict)  # postprocess columns, drafts
    error: str | None = None  # set (and completion empty) when the row could not be generated
    completion_index: int = 0  # which of the prompt's completions (LLM(completions_per_prompt=n))


class LLM:
    """Loads a diffusion LM once and generates for lists of prompts.

    Args:
        model: a Hugging Face model directory (a str or a pathlib.Path), an s3:// prefix, or a builtin
            (default: the tiny model).
        dtype, device: as `model.dtype` / `model.device` of the job config ("auto" picks for the device).
        batch_size: KV-cache slots (rows denoised together).
        apply_chat_template: render plain prompts as one user turn of the tokenizer's chat template.
        system_prompt: a system turn before every prompt (needs the chat template; ValueError if the model's
            template refuses one).
        completions_per_prompt: completions of each prompt (generate returns a list of them per prompt).
        stop: stop strings; a completion ends before the first of them in its text (finish_reason "stop").
        postprocess: optional `{"_target_": "module.fn", ...}` verify/postprocess stage.
        **sampler: sampler knobs (max_new_tokens, max_denoising_steps, t_min, t_max, entropy_bound,
            stability_threshold, confidence_threshold, canvas_length, seed, adaptive_stopping,
            revise_accepted, record_drafts); unset knobs come from the model's generation_config.json.
            LLaDA / Dream models take max_new_tokens, seed, record_drafts and `mask={"steps": ...,
            "block_length": ..., "cache": "dual", ...}` (the sampler.mask.* knobs; `"algorithm": "dream"`
            and Dream's `top_p`, `top_k`, `alg_temp`, `eps` among them).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = BUILTIN_MODEL,
        *,
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int = 8,
        batching: str = "continuous",
        backend: str = "auto",
        cuda_graphs: bool = True,
        max_prompt_tokens: int | None = None,
        apply_chat_template: bool = True,
        postprocess: dict[str, Any] | None = None,
        endpoint_url: str | None = None,
        completions_per_prompt: int = 1,
        system_prompt: str | None = None,
        stop: Sequence[str] | None = None,
        **sampler: Any,
    ) -> None:
        model = _model_path(model)
        # mask: a dict of the mask-diffusion knobs (LLaDA, Dream), as sampler.mask.* in the job config
        valid = (*USER_KNOBS, "mask")
        unknown = sorted(set(sampler) - set(valid))
        if unknown:
            named = [
                p for p in inspect.signature(LLM.__init__).parameters if p not in ("self", "model", "sampler")
            ]
            raise TypeError(
                f"unknown setting(s) {unknown}; valid ones: {', '.join(named)}, and the sampler's {', '.join(valid)}"
            )
        _check_arguments(
            dtype=dtype,
            device=device,
            batching=batching,
            backend=backend,
            batch_size=batch_size,
            max_prompt_tokens=max_prompt_tokens,
            cuda_graphs=cuda_graphs,
            apply_chat_template=apply_chat_template,
            mask=sampler.get("mask"),
            postprocess=postprocess,
        )
        # as the job checks model.endpoint_url: no user:password@ (echoed by every S3 error), an http(s) URL
        check_endpoint("endpoint_url", endpoint_url)
        check_no_credentials("model", model)  # as the job checks model.path: errors name the model
        check_completions(completions_per_prompt, "completions_per_prompt")
        if system_prompt is not None and (not isinstance(system_prompt, str) or not system_prompt.strip()):
            raise ValueError(f"system_prompt={system_prompt!r} must be a non-empty string (or None for none)")
        self.spec = GenerationSpec(
            model_path=model,
            dtype=dtype,
            device=device,
            endpoint_url=endpoint_url,
            sampler=dict(sampler),
            batch_size=batch_size,
            batching=batching,
            backend=backend,
            cuda_graphs=cuda_graphs,
            max_prompt_tokens=max_prompt_tokens,
            apply_chat_template=apply_chat_template,
            run_id="",
            postprocess=postprocess,
            completions_per_prompt=completions_per_prompt,
            system_prompt=system_prompt,
            stop=check_stops(stop, "stop"),
            api=True,
        )
        try:
            self.generator = Generator(self.spec)
        except ValueError as e:  # settings, model and backend errors name the job's keys: name the keyword
            if type(e) is not ValueError and not isinstance(e, (SettingsError, ModelError)):
                raise  # another kind (a UnicodeDecodeError): as it is
            raise type(e)(api_message(str(e))) from None
        info = self.generator.loaded.info
        if info.family not in MASK_FAMILIES:
            note = max_length_note(self.spec.sampler, info.generation_config)
            if note:
                logger.warning("%s", note)

    @property
    def settings(self):
        """The resolved sampler settings (user values over the model's generation config)."""
        return self.generator.settings

    @property
    def tokenizer(self):
        return self.generator.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[dict[str, str]]],
        *,
        ids: Sequence[str] | None = None,
        progress: bool = True,
    ) -> list[Completion] | list[list[Completion]]:
        """Completions in prompt order. A prompt is a string or a chat (a list of {role, content} messages).
        `ids` key each row's randomness (default: derived from position and content, as the pipeline does).
        With completions_per_prompt=n > 1, each prompt's n completions in a list (completion_index 0..n-1;
        a prompt that cannot run gives n error completions). `progress`: a progress bar (tqdm, on stderr or
        in a notebook) of the completions sampled, with tokens per second."""
        if not isinstance(progress, bool):
            raise TypeError(f"progress={progress!r} must be True or False")
        prompts = _prompt_list(prompts)
        n = self.generator.completions
        if ids is not None:
            ids = _id_list(ids, len(prompts))
        records, by_index = [], {}
        for i, prompt in enumerate(prompts):
            text, is_chat, problem = check_prompt_value(prompt)
            rid = ids[i] if ids is not None else derived_id(i, text if text is not None else repr(prompt))
            if problem:  # rejected as the job rejects such an input row: an error row, the others generate
                for c in range(n):
                    by_index[i, c] = self._error(rid, prompt if isinstance(prompt, str) else "", problem, c)
            else:
                records.append(PromptRecord(rid, text, is_chat, i))
        with _progress_bar(len(records) * n, progress) as on_row:
            out = self.generator.generate(records, on_row)
        names = {f.name for f in fields(Completion)} - {"extra", "error"}
        for row in out.rows:
            base = {k: row[k] for k in names}
            extra = {
                k: v
                for k, v in row.items()
                if k not in names and k not in ("run_id", "source_index", "metadata")
            }
            by_index[row["source_index"], row["completion_index"]] = Completion(**base, extra=extra)
        record_of = {record.source_index: record for record in records}
        for err in out.errors:  # a tokenize error stands for every completion; a postprocess one for its own
            record = record_of[err["source_index"]]
            for c in range(n):
                if (err["source_index"], c) not in by_index:
                    reason = api_message(err["reason"])  # a prompt too long names max_prompt_tokens, ...
                    by_index[err["source_index"], c] = self._error(record.id, record.prompt, reason, c)
                    if err["stage"] == "postprocess":
                        break
        if n == 1:
            return [by_index[i, 0] for i in range(len(prompts))]
        return [[by_index[i, c] for c in range(n)] for i in range(len(prompts))]

    def _error(self, rid: str, prompt: str, reason: str, completion: int = 0) -> Completion:
        return Completion(
            id=rid,
            prompt=prompt,
            completion="",
            completion_tokens=0,
            prompt_tokens=0,
            denoising_steps=0,
            canvases=0,
            finish_reason="error",
            model=self.generator.model_name,
            seed=self.settings.seed,
            error=reason,
            completion_index=completion,
        )


@contextlib.contextmanager
def _progress_bar(total: int, show: bool) -> Iterator[Callable[[int, int], None] | None]:
    """The `on_row(tokens, steps)` callback of a tqdm bar over `total` completions (None when not shown)."""
    if not show or not total:
        yield None
        return
    from tqdm.auto import tqdm

    tokens, started = 0, time.perf_counter()
    with tqdm(total=total, desc="generating", unit="row", dynamic_ncols=True) as bar:

        def on_row(row_tokens: int, steps: int) -> None:
            nonlocal tokens
            tokens += row_tokens
            bar.set_postfix_str(
                f"{tokens / max(time.perf_counter() - started, 1e-9):.1f} tok/s", refresh=False
            )
            bar.update(1)

        yield on_row


def _model_path(model: Any) -> str:
    """`model` as the loader takes it: a string (a pathlib.Path, as transformers' from_pretrained takes, is one)."""
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str):
        raise TypeError(
            f"model={model!r} must be a Hugging Face model directory (a str or a path), an s3:// URI or a "
            f"builtin:... name, got {type(model).__name__}"
        )
    return model


def _check_arguments(**values: Any) -> None:
    """The engine arguments checked as the job checks model.* and sampler.* (pipeline/config/validate.py), with
    errors naming the keyword: before the model loads."""
    for name, key in (
        ("dtype", "model.dtype"),
        ("device", "model.device"),
        ("batching", "sampler.batching"),
        ("backend", "sampler.backend"),
    ):
        if values[name] not in CHOICES[key]:
            raise ValueError(f"{name}={values[name]!r} is not one of {', '.join(CHOICES[key])}")
    for name, optional in (("batch_size", False), ("max_prompt_tokens", True)):
        value = values[name]
        if optional and value is None:
            continue
        if not is_int(value) or value < 1:
            raise ValueError(
                f"{name}={value!r} must be a positive integer" + (" (or None)" if optional else "")
            )
    for name in ("cuda_graphs", "apply_chat_template"):
        if not isinstance(values[name], bool):
            raise TypeError(f"{name}={values[name]!r} must be True or False")
    if values["mask"] is not None and not isinstance(values["mask"], Mapping):
        raise TypeError(
            f"mask={values['mask']!r} must be a dict of the mask-diffusion settings, e.g. "
            "mask={'steps': 64, 'cache': 'dual'}"
        )
    postprocess = values["postprocess"]
    if postprocess is not None and not isinstance(postprocess, Mapping):
        raise TypeError(
            f"postprocess={postprocess!r} must be a dict naming an importable callable, e.g. "
            "postprocess={'_target_': 'mymodule.score'} (its other keys are the callable's keyword arguments)"
            + _target_hint(postprocess)
        )


def _target_hint(fn: Any) -> str:
    """For a callable given as `postprocess`: the `_target_` that names it, where an import can find it."""
    if not callable(fn):
        return ""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    named = f": postprocess={{'_target_': '{module}.{name}'}}" if module and name.isidentifier() else ""
    return f"; give the dict, not the callable itself{named}"


def _prompt_list(prompts: Any) -> list[Any]:
    """`generate`'s prompts as a list: one string, or any iterable of prompts (strings or chats)."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (bytes, bytearray)):
        raise TypeError("prompts must be a string, a chat or a list of them; got bytes: decode them first")
    if isinstance(prompts, Mapping) or not isinstance(prompts, Iterable):
        raise TypeError(
            f"prompts must be a string, a chat or a list of them; got {type(prompts).__name__}"
            + (
                ": to pass one chat, wrap its messages in a list, generate([messages])"
                if isinstance(prompts, Mapping)
                else ""
            )
        )
    prompts = list(prompts)
    if prompts and all(isinstance(p, Mapping) and "role" in p for p in prompts):
        raise TypeError(
            "prompts is a list of messages, which is one chat: pass generate([messages]) (a list of chats), "
            "or generate([text, ...]) for text prompts"
        )
    return prompts


def _id_list(ids: Any, count: int) -> list[str]:
    """`generate`'s ids, checked as the job checks an id column: strings or integers, not empty, unique (they
    key each row's random numbers), one per prompt."""
    if isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Iterable):
        raise TypeError(
            f"ids must be a list of strings or integers, one per prompt; got {type(ids).__name__}"
        )
    ids = list(ids)
    if len(ids) != count:
        raise ValueError(f"ids has {len(ids)} entries for {count} prompts")
    first: dict[str, int] = {}
    for i, value in enumerate(ids):
        if isinstance(value, uuid.UUID):
            value = str(value)  # its canonical text, as a job's UUID id column gives it
        if isinstance(value, bool) or not isinstance(value, (str, Integral)):  # NumPy's integers are Integral
            raise TypeError(f"ids[{i}]={value!r} must be a string or an integer, got {type(value).__name__}")
        text = str(value) if isinstance(value, str) else str(int(value))
        ids[i] = text
        if has_surrogate(text):
            raise ValueError(f"ids[{i}]={value!r} is {SURROGATE_HINT}")
        if problem := blank_problem(
            text, f"ids[{i}]={value!r}"
        ):  # empty, or NUL or zero-width characters only
            raise ValueError(problem)
        if text in first:
            raise ValueError(
                f"ids[{i}]={value!r} repeats ids[{first[text]}]: ids key each row's random numbers, so they "
                "must be unique (to sample one prompt several times, use completions_per_prompt)"
            )
        first[text] = i
    return ids
