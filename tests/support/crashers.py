"""Postprocess callables that break their worker on marked rows: it dies on the row (a row that can never be
generated), dies on it unless it is the first row its process sees (a failure that depends on what ran before
it, pinned on no single row), or hangs or dies once (a shard that succeeds on its second attempt)."""

from __future__ import annotations

import os
import time
from typing import Any


def crash_on(row: dict[str, Any], *, marker: str) -> dict[str, Any]:
    if marker in (row.get("prompt") or ""):
        os._exit(17)  # the worker dies mid-shard, as on a hardware fault
    return {}


_seen = 0  # rows this process has postprocessed


def crash_on_unless_first(row: dict[str, Any], *, marker: str) -> dict[str, Any]:
    global _seen
    _seen += 1
    if marker in (row.get("prompt") or "") and _seen > 1:
        os._exit(17)
    return {}


def _first_time(row: dict[str, Any], marker: str, flag: str) -> bool:
    """Whether `row` is the first marked row of the whole run, recorded by creating the file `flag`."""
    if marker not in (row.get("prompt") or ""):
        return False
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def hang_once_on(row: dict[str, Any], *, marker: str, flag: str) -> dict[str, Any]:
    """Hangs (as on a stuck device or a call that never returns) on the first marked row it sees in the whole
    run; later attempts at that row go through."""
    if _first_time(row, marker, flag):
        time.sleep(3600)
    return {}


def crash_once_on(row: dict[str, Any], *, marker: str, flag: str) -> dict[str, Any]:
    """Kills its worker on the first marked row it sees in the whole run; later attempts at that row go
    through (a worker lost once, as to a node failure)."""
    if _first_time(row, marker, flag):
        os._exit(17)
    return {}
