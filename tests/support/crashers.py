"""A postprocess callable that kills its worker process on marked rows: a shard that can never succeed."""

from __future__ import annotations

import os
from typing import Any


def crash_on(row: dict[str, Any], *, marker: str) -> dict[str, Any]:
    if marker in (row.get("prompt") or ""):
        os._exit(17)  # the worker dies mid-shard, as on a hardware fault
    return {}
