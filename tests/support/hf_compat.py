"""transformers renamed DiffusionGemma's `past_key_values` to `cache` (arguments and output fields) after 5.17;
the GPU machine's image has 5.17, CI has 5.24. These let the reference calls of the tests run on both."""

from __future__ import annotations

import inspect

from transformers import DiffusionGemmaForBlockDiffusion

CACHE_KW = (
    "cache"
    if "cache" in inspect.signature(DiffusionGemmaForBlockDiffusion.forward).parameters
    else "past_key_values"
)


def cache_kw(value) -> dict:
    """{<the cache keyword of this transformers>: value}, for **-passing."""
    return {CACHE_KW: value}


def cache_of(output):
    """The KV cache of a DiffusionGemma forward's output."""
    return output.cache if hasattr(output, "cache") else output.past_key_values
