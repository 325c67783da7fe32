"""Per-row verify/postprocess stage, configured as `postprocess: {_target_: module.callable, **kwargs}`.

The callable gets each output row as a dict and returns the columns to add (a dict) or None to filter the
row out (filtered rows are recorded in errors/ with stage "postprocess", so no input row disappears). It may
declare its columns' Arrow types as a `columns` attribute ({name: "string" | "bool" | "double" | "int64"});
otherwise they are inferred. An exception on a row turns that row into an error row.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Any

PostprocessFn = Callable[[dict[str, Any]], "dict[str, Any] | None"]


class PostprocessError(ValueError):
    """The postprocess target cannot be loaded; the message names it."""


def load_postprocess(spec: dict[str, Any] | None) -> tuple[PostprocessFn | None, str | None, dict[str, str]]:
    """(callable, its dotted name, declared column types) for a `{_target_: ..., kwargs}` spec."""
    if not spec:
        return None, None, {}
    spec = dict(spec)
    target = spec.pop("_target_", None)
    if not isinstance(target, str) or "." not in target:
        raise PostprocessError(f"postprocess._target_={target!r} must be 'module.callable'")
    module_name, _, attr = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        missing = getattr(e, "name", None)
        if isinstance(e, ModuleNotFoundError) and missing and f"{module_name}.".startswith(f"{missing}."):
            hint = (  # the module itself (or its package) is not on the path, not one of its own imports
                "; for a module in the current directory run the job with PYTHONPATH=. (the workers inherit "
                "it), else install its package into the environment that runs the job"
            )
        else:
            hint = " (raised while importing it: fix the module, or install what it imports)"
        raise PostprocessError(
            f"postprocess._target_={target!r}: cannot import {module_name!r}: {e}{hint}"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise PostprocessError(
            f"postprocess._target_={target!r}: {attr!r} is not a callable of {module_name}"
        )
    columns = dict(getattr(fn, "columns", {}) or {})
    _check_kwargs(fn, target, spec)
    if spec:
        fn = functools.partial(fn, **spec)
    return fn, target, columns


def _check_kwargs(fn: Callable[..., Any], target: str, kwargs: dict[str, Any]) -> None:
    """PostprocessError unless `fn(row, **kwargs)` binds: a misspelt keyword argument (or a callable that
    takes no row, or needs another argument) would otherwise fail every row, after sampling. A callable
    without an inspectable signature is left to its first row."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    params = signature.parameters
    shown = ", ".join(params) or "none"
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = [
            k for k in kwargs if k not in params or params[k].kind is inspect.Parameter.POSITIONAL_ONLY
        ]
        if unknown:
            raise PostprocessError(
                f"postprocess.{unknown[0]} is not a keyword argument of {target} (its parameters: {shown}); "
                "fix its spelling or remove it"
            )
    try:
        signature.bind(None, **kwargs)  # the row comes first, positionally
    except TypeError as e:
        given = "".join(f" and postprocess.{k}" for k in kwargs)
        raise PostprocessError(
            f"{target} cannot be called with the row{given}: {e} (its parameters: {shown})"
        ) from None
