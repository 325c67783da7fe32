"""Registers the schemas in Hydra's ConfigStore, turns a composed DictConfig into a JobConfig, and runs a job's
`@hydra.main` with the documented exit codes."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import sys
import threading
import traceback
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pipeline.config.schema import ConfigError, JobConfig, NightlyJobConfig
from pipeline.config.validate import validate_job

STARTUP_FAILED = 2  # the exit code of a job that could not start (README: exit codes)
INTERRUPTED = 130  # Ctrl-C (SIGINT), as shells report it: 128 + 2
TERMINATED = 143  # SIGTERM (Kubernetes, `ray job stop`, `kill`): 128 + 15


_terminated = threading.Event()  # set by SIGTERM: the KeyboardInterrupt that follows is a termination


def on_sigterm(signum, frame) -> None:
    """Stops the job as Ctrl-C does, so that its finally blocks run (actors stopped, run lock released). It
    raises KeyboardInterrupt, the exception Ray's blocking calls pass on as such (another exception raised
    inside them comes out as SystemError), and notes that it was SIGTERM for the exit code."""
    _terminated.set()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise KeyboardInterrupt


@contextlib.contextmanager
def signals_deferred(what: str) -> Iterator[None]:
    """Runs a step of the job's way out (`what`: stopping Ray, releasing the run lock) to its end though Ctrl-C
    or SIGTERM arrives meanwhile: the signal is handled as it would have been once the step is done. A Ctrl-C
    that cut `ray.shutdown()` short (a second one while the first stopped the job) left Ray's agents running and
    the process exiting 1 ("some shards failed") after saying exit code 130; one that cut the lock's release short
    left the lock to be waited out. One more signal while deferred stops the step at once. Outside the main
    thread (no signal handler runs there) the step just runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # Not one ignored, nor one whose handler was not set from Python (getsignal gives None: nothing to put back).
    signums = [
        s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) not in (signal.SIG_IGN, None)
    ]
    previous = {s: signal.getsignal(s) for s in signums}
    received: list[int] = []  # the signal deferred, then (a second one) the one that stopped the step

    def restore() -> None:
        for s, handler in previous.items():
            if signal.getsignal(s) is defer:  # not one that the step itself put in its place
                signal.signal(s, handler)

    def defer(signum, frame) -> None:
        received.append(signum)
        if len(received) > 1:  # asked again: stop now, as without the deferral
            restore()
            signal.raise_signal(signum)
            return
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        # os.write, not sys.stderr: the signal may land inside a write to that stream (a reentrant call).
        with contextlib.suppress(OSError):
            os.write(2, f"{name}: {what} first (a moment); {name} again to stop at once\n".encode())

    try:
        for s in signums:  # in the try: a signal between two of these finds the first put back
            signal.signal(s, defer)
        yield
    finally:
        restore()
        if len(received) == 1:  # its handler runs now (KeyboardInterrupt for Ctrl-C and, in a job, SIGTERM)
            signal.raise_signal(received[0])


def install_sigterm_handler() -> None:
    """SIGTERM interrupts the main thread (ray.init installs its own handler; ray_setup puts this one back)."""
    if threading.current_thread() is threading.main_thread():
        _terminated.clear()
        signal.signal(signal.SIGTERM, on_sigterm)


# Keys that every option of their group sets, some as `???` for the user to give (conf/output/s3.yaml's uri,
# conf/model/llada.yaml's path). In the schema stored for Hydra they are `???` too: merged onto the dataclass
# default, a `???` keeps the default (output=s3 without output.uri wrote to ./outputs on local disk).
SET_BY_GROUP_OPTIONS = ("model.path", "output.uri")


def _schema_node(schema: type[JobConfig]) -> Any:
    from omegaconf import MISSING, OmegaConf

    node = OmegaConf.structured(schema)
    for key in SET_BY_GROUP_OPTIONS:
        OmegaConf.update(node, key, MISSING)
    return node


def register_configs() -> None:
    """Stores the job schema as `canvasflow_schema`: the first entry of conf/config.yaml's defaults, it types
    every group, so a misspelt key or a wrong type fails while Hydra composes."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="canvasflow_schema", node=_schema_node(JobConfig))
    ConfigStore.instance().store(name="canvasflow_nightly_schema", node=_schema_node(NightlyJobConfig))


def to_job_config(cfg: Any, schema: type[JobConfig] = JobConfig) -> JobConfig:
    """Converts a composed Hydra config to a validated `schema` instance (raises ConfigError naming the key)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(cfg, JobConfig):
        return validate_job(cfg)
    try:
        unknown = unknown_keys(OmegaConf.to_container(cfg, resolve=False), schema)
        if unknown:
            raise ConfigError(
                f"{unknown[0]} is not a configuration key (a misspelling, or a key added with '+'): remove it "
                "or fix its spelling; `--cfg job` prints every key. Keys can be added only under "
                "data.hf_kwargs and postprocess"
                + (f" (also unknown: {', '.join(unknown[1:])})" if unknown[1:] else "")
            )
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:  # checked before the merge below, which would put the schema's defaults in their place
            raise ConfigError(
                f"{missing[0]} has no value: set {missing[0]}=... (the group option chosen leaves it to you, "
                "e.g. output=s3 needs output.uri=s3://bucket/prefix, model=llada needs model.path=<dir or s3://>)"
                + (f" (also unset: {', '.join(missing[1:])})" if missing[1:] else "")
            )
        job = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).replace("\n", " ")) from None
    assert isinstance(job, schema)
    return validate_job(job)


def check_text_overrides(overrides: list[str], schema: type[JobConfig] = JobConfig) -> None:
    """ConfigError for a command-line override of a text key (run.id, output.uri, nightly.run_prefix, ...) whose
    value Hydra read as a number or a boolean that does not read back as it was typed: run.id=1.10 ran as run
    1.1, run.id=1e3 as 1000.0, run.id=true as True. Quoted, Hydra keeps the text. And for a boolean key
    (run.overwrite, run.dry_run, ...) whose value is not true or false."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(overrides):
        value = override.value()
        if override.is_delete():
            continue
        key, typed = override.key_or_group, override.input_line.split("=", 1)[1]
        if (
            _field_type(key, schema) in (bool, bool | None)
            and not isinstance(value, bool)
            and value is not None
            and not (isinstance(value, str) and "${" in value)  # an interpolation: OmegaConf resolves it
        ):
            # OmegaConf reads any integer and 'yes', 'on', '1' as a boolean: run.overwrite=2 deleted a run.
            raise ConfigError(f"{key}={typed} is not a boolean: write {key}=true or {key}=false")
        if not isinstance(value, (bool, int, float)):
            continue
        if str(value) == typed or _field_type(key, schema) not in (str, str | None):
            continue
        kind = "boolean" if isinstance(value, bool) else "number"
        raise ConfigError(
            f"{key}={typed} is read by Hydra as the {kind} {value!r}, which as text is {str(value)!r}, not "
            f"{typed!r}: quote the value to keep it as typed, '{key}=\"{typed}\"' (the outer quotes for the "
            "shell)"
        )


def _field_type(key: str, schema: type) -> Any:
    """The annotated type of the dotted `key` in `schema` (a dataclass, nested); None when it has no such key."""
    node: Any = schema
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return None
        node = typing.get_type_hints(node).get(part)
    return node


def unknown_keys(values: Any, schema: type, prefix: str = "") -> list[str]:
    """Full names of the keys of `values` that `schema` (a dataclass, nested) does not have; the contents of
    dict-typed fields (data.hf_kwargs, postprocess) are free-form. Merging into the schema would drop them
    silently (`+sampler.bogus=1` ran the job as if it were not there)."""
    if not isinstance(values, dict) or not dataclasses.is_dataclass(schema):
        return []
    hints = typing.get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema)}
    unknown = []
    for key, value in values.items():
        if key not in names:
            unknown.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(hints.get(key)):
            unknown += unknown_keys(value, hints[key], f"{prefix}{key}.")
    return unknown


RESUME_NOTE = "every committed shard is kept; rerun the same command to resume the run"


def run_cli(
    hydra_main: Callable[[], Any],
    task_started: Callable[[], bool],
    script: str,
    schema: type = JobConfig,
    interrupted_note: str | Callable[[], str] = RESUME_NOTE,
) -> None:
    """Calls a `@hydra.main` function so that a failure before the job's task ran exits 2, not Hydra's 1.

    `schema` is the dataclass the script's config is typed by (its dict-typed fields take new keys with '+');
    `interrupted_note` (or the function giving it, called then) says, after Ctrl-C or SIGTERM, what was kept
    and what to do.
    Hydra reports a config that does not compose (an unknown key, a value of the wrong type, a missing group
    option, an override it cannot parse) and exits 1, which the README reserves for "shards failed, rerun".
    Exit codes the task itself chose (0, 1, 2, 3) pass through unchanged; Ctrl-C exits 130 and SIGTERM 143,
    each with one line, not a traceback."""
    has_postprocess = any(f.name == "postprocess" for f in dataclasses.fields(schema))
    problem = _postprocess_key_without_option(sys.argv[1:]) if has_postprocess else None
    if problem:
        sys.stderr.write(
            f"could not start (exit code {STARTUP_FAILED}): {problem} sets a key of the postprocess stage, but no "
            "postprocess option is chosen (the stage is off). Choose one first: postprocess=callable "
            "postprocess._target_=module.function [+postprocess.<kwarg>=<value> ...], or "
            "postprocess=task_checker.\n"
        )
        sys.exit(STARTUP_FAILED)
    install_sigterm_handler()
    streams = sys.stdout, sys.stderr
    # Until the task runs, what Hydra prints (a compose error echoing an override, --cfg job, --help) has the
    # values of secret-like keys redacted, as _config.yaml has.
    wrappers = [_RedactedUntilStarted(stream, task_started) for stream in streams]
    sys.stdout, sys.stderr = wrappers
    try:
        hydra_main()
    except (
        KeyboardInterrupt
    ):  # Ctrl-C or SIGTERM: the job's finally blocks ran (lock released, Ray shut down)
        what, code = (
            ("terminated by SIGTERM", TERMINATED) if _terminated.is_set() else ("interrupted", INTERRUPTED)
        )
        note = interrupted_note() if callable(interrupted_note) else interrupted_note
        sys.stderr.write(f"{what} (exit code {code}): {note}\n")
        sys.exit(code)
    except SystemExit as e:
        if e.code in (None, 0) or task_started():
            raise
        sys.stderr.write(_compose_failure(e.__context__, script, schema) + "\n")
        sys.exit(STARTUP_FAILED)
    except Exception as e:
        if task_started():
            raise
        # HYDRA_FULL_ERROR=1: Hydra raises its compose error instead of exiting 1; printed here, while stderr
        # still redacts, not by the interpreter after the streams are restored.
        traceback.print_exc()
        sys.stderr.write(_compose_failure(e, script, schema) + "\n")
        sys.exit(STARTUP_FAILED)
    finally:
        for wrapper in wrappers:
            wrapper.flush()
        sys.stdout, sys.stderr = streams


class _RedactedUntilStarted:
    """A text stream whose output goes through redact_text until `started()` (the job's own output, which
    logs no secret, is left as it is).

    Until then writes are held and redacted together at flush() (a logging handler flushes after each
    record), when the task starts, or when run_cli restores the streams: print("secret_key:", value) is two
    writes, and a key and its value redacted apart would let the value through."""

    def __init__(self, stream: Any, started: Callable[[], bool]) -> None:
        self._stream, self._started = stream, started
        self._held: list[str] = []

    def write(self, text: str) -> int:
        if self._started():
            self._release()
            self._stream.write(text)
        else:
            self._held.append(text)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._release()
        self._stream.flush()

    def _release(self) -> None:
        if self._held:
            from pipeline.config.redact import redact_text

            text = "".join(self._held)
            self._held.clear()
            self._stream.write(redact_text(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


_POSTPROCESS_OPTION = re.compile(r"^(?:\+\+|\+)?postprocess=(.*)$")
_POSTPROCESS_KEY = re.compile(r"^(?:\+\+|\+)?postprocess\.[^=]*=")
_CONFIG_NAME_FLAGS = ("--config-name", "-cn", "--config-dir", "-cd", "--config-path", "-cp")


def _postprocess_key_without_option(argv: list[str]) -> str | None:
    """The first `postprocess.<key>=...` override when no postprocess option is chosen on the command line:
    conf/config.yaml and conf/nightly.yaml default the group to null, and Hydra fails setting a key in a null
    node with an AssertionError and its traceback. None when another primary config is given (it may choose
    an option of its own)."""
    if any(a.split("=", 1)[0] in _CONFIG_NAME_FLAGS for a in argv):
        return None
    chosen = any((m := _POSTPROCESS_OPTION.match(a)) and m.group(1) not in ("", "null") for a in argv)
    keys = [a.split("=", 1)[0] for a in argv if _POSTPROCESS_KEY.match(a)]
    return keys[0] if keys and not chosen else None


def _free_form_field(key: str, schema: type) -> str | None:
    """The dict-typed field of `schema` (a dataclass, nested) that `key` lies below, e.g. data.hf_kwargs for
    data.hf_kwargs.data_files; None when the key is not below one."""
    parts = key.split(".")
    node: Any = schema
    for i, part in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(node):
            return None
        hint = typing.get_type_hints(node).get(part)
        if hint is None:
            return None
        options = (
            typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        )
        if any(o is dict or typing.get_origin(o) is dict for o in options):
            return ".".join(parts[: i + 1])
        node = hint
    return None


def _compose_failure(error: BaseException | None, script: str, schema: type = JobConfig) -> str:
    """The line added after Hydra's own report: which key, and how to fix it."""
    cause = getattr(error, "__cause__", None)
    key = getattr(cause, "full_key", None) or getattr(error, "full_key", None)
    name = type(cause).__name__ if cause is not None else type(error).__name__
    free_form = _free_form_field(key, schema) if key else None
    if free_form and name in ("ConfigAttributeError", "ConfigKeyError"):
        fix = (
            f"{key} is a new key under {free_form}, whose keys are free-form: add it with a '+', "
            f"+{key}=... (without one, Hydra only changes keys that the config already has)"
        )
    elif key and name in ("ConfigAttributeError", "ConfigKeyError"):
        fix = f"{key} is not a configuration key: fix its spelling (`python {script} --cfg job` prints every key)"
    elif key and name == "ValidationError":
        fix = (
            f"{key} got a value of the wrong type: give one of its type (`python {script} --cfg job` prints "
            "every key with its value; pipeline/config/schema.py types them)"
        )
    elif name == "MissingConfigException":
        fix = f"A group option does not exist: pick one of those listed above (`python {script} --help`)"
    elif name == "OverrideParseException":
        fix = "An override is not key=value in Hydra's syntax: quote values with special characters"
    else:
        fix = f"See the error above (`python {script} --help` lists what can be set, `--cfg job` every key)"
    return f"could not start (exit code {STARTUP_FAILED}): the configuration did not compose. {fix}."
