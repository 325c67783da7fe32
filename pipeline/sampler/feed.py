"""Where a continuous-batching sampler takes its rows from: a fixed list, or a feed that others add to.

`DiffusionSampler.serve` and `MaskDiffusionSampler.serve` run until their feed is closed and empty, asking it
for rows whenever slots are free: with `wait=False` between steps (whatever is there now, possibly nothing),
with `wait=True` when the batch is empty (block until rows arrive; [] once the feed is closed). A worker that
holds several shards feeds them all to one running sampler, so a shard's last rows share the batch with the
next shard's first ones instead of leaving slots empty (pipeline/runner/stream.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Protocol


class Feed(Protocol):
    def pull(self, count: int, wait: bool) -> list:
        """Up to `count` requests; with `wait`, blocks until at least one is there or the feed is closed."""


class ListFeed:
    """A fixed set of requests, in order; closed once they are all taken."""

    def __init__(self, requests: Iterable) -> None:
        self._requests = iter(requests)

    def pull(self, count: int, wait: bool) -> list:
        return list(islice(self._requests, max(count, 0)))


def check_prompt(request, max_prompt_tokens: int) -> None:
    """A request a sampler cannot run: no prompt tokens, or more than its slots hold."""
    if not 0 < len(request.prompt_ids) <= max_prompt_tokens:
        raise ValueError(
            f"row {request.row_id!r}: prompt has {len(request.prompt_ids)} tokens; it must have between 1 and "
            f"max_prompt_tokens={max_prompt_tokens}"
        )
