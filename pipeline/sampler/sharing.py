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
    """The rows whose slots hold their prompt, by whole prompt and by leading blocks of `block` tokens. A row is
    added once its prompt is written and removed when it leaves, so that an admission costs the new rows' blocks,
    not every running row's."""

    def __init__(self, block: int) -> None:
        self.block = block
        self._whole: dict[tuple[int, int], dict[int, HasPrompt]] = {}
        self._blocks: dict[int, dict[int, HasPrompt]] = {}

    def add(self, row: HasPrompt) -> None:
        self._whole.setdefault(row.prompt_key, {})[id(row)] = row
        for chained in row.prompt_blocks:
            self._blocks.setdefault(chained, {})[id(row)] = row

    def remove(self, row: HasPrompt) -> None:
        for table, keys in ((self._whole, [row.prompt_key]), (self._blocks, row.prompt_blocks)):
            for key in keys:
                holders = table.get(key)
                if holders is not None and holders.pop(id(row), None) is not None and not holders:
                    del table[key]

    def source(self, row: HasPrompt) -> tuple[HasPrompt | None, int]:
        """(a row, tokens to copy from the start of its slot) for `row`'s prompt: one that holds the same prompt,
        else one that holds the most of its leading blocks; (None, 0) when none does."""
        for held in self._whole.get(row.prompt_key, {}).values():
            if held.prompt == row.prompt:
                return held, len(row.prompt)
        found, depth = None, 0
        for i, chained in enumerate(row.prompt_blocks):
            holders = self._blocks.get(chained)
            if not holders:
                break
            found, depth = next(iter(holders.values())), i + 1
        shared = depth * self.block
        if found is None or found.prompt[:shared] != row.prompt[:shared]:
            return None, 0
        return found, shared
