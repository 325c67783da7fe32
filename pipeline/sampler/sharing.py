"""Which KV-cache slot already holds (the start of) a prompt, so that a row copies it instead of encoding it.

A row's prompt stays at the start of its slot, unchanged, for as long as the row runs (its canvases are
appended after it), and the encoder is causal: the keys and values of a prompt's first n tokens depend on those
tokens only. So a row whose prompt another slot holds (the completions of one prompt, a dataset's repeated
prompts) copies it whole, and a row whose prompt starts with whole blocks that another starts with (a system
prompt, a template's fixed text, few-shot examples) copies those and encodes only the rest after them.
"""

from __future__ import annotations

from typing import Protocol


class HasPrompt(Protocol):
    prompt: tuple[int, ...]
    prompt_key: tuple[int, int]  # (length, hash) of the prompt
    prompt_blocks: list[int]  # prefix_hashes(prompt, block)


def prefix_hashes(tokens: tuple[int, ...], block: int) -> list[int]:
    """For each whole block of `tokens`, a hash of it and every block before it (equal hashes: equal prefixes,
    but for collisions, which PromptIndex rules out by comparing the tokens)."""
    out, chained = [], 0
    for start in range(0, len(tokens) - block + 1, block):
        chained = hash((chained, tokens[start : start + block]))
        out.append(chained)
    return out


class PromptIndex:
    """The rows whose slots hold their prompt, by whole prompt and by leading blocks of `block` tokens."""

    def __init__(self, block: int) -> None:
        self.block = block
        self._whole: dict[tuple[int, int], tuple[int, HasPrompt]] = {}
        self._blocks: dict[int, tuple[int, HasPrompt]] = {}

    def add(self, slot: int, row: HasPrompt) -> None:
        self._whole.setdefault(row.prompt_key, (slot, row))
        for chained in row.prompt_blocks:
            self._blocks.setdefault(chained, (slot, row))

    def source(self, row: HasPrompt) -> tuple[int | None, int]:
        """(slot, tokens to copy from its start) for `row`'s prompt: a slot that holds the same prompt, else the
        one that holds the most of its leading blocks; (None, 0) when none does."""
        held = self._whole.get(row.prompt_key)
        if held is not None and held[1].prompt == row.prompt:
            return held[0], len(row.prompt)
        found, depth = None, 0
        for i, chained in enumerate(row.prompt_blocks):
            if chained not in self._blocks:
                break
            found, depth = self._blocks[chained], i + 1
        shared = depth * self.block
        if found is None or found[1].prompt[:shared] != row.prompt[:shared]:
            return None, 0
        return found[0], shared
