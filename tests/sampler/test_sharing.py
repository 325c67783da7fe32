"""PromptIndex: which row holds a prompt, or the most of its leading blocks; hash matches are checked."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.sampler.sharing import PromptIndex, prefix_hashes


@dataclass(eq=False)
class Row:
    prompt: tuple[int, ...]
    prompt_key: tuple[int, int] = (0, 0)
    prompt_blocks: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.prompt_key = (len(self.prompt), hash(self.prompt))
        self.prompt_blocks = prefix_hashes(self.prompt, 4)


def test_whole_prompt_then_deepest_common_block_run():
    index = PromptIndex(4)
    first, second = Row(tuple(range(10))), Row(tuple(range(4)) + (9, 9, 9, 9, 9))  # blocks of 4 tokens
    index.add(first)
    index.add(second)
    assert index.source(Row(tuple(range(10)))) == (first, 10), "the same prompt: copied whole"
    assert index.source(Row(tuple(range(8)) + (5,))) == (first, 8)
    assert index.source(Row(tuple(range(4)) + (9, 9, 9, 9))) == (second, 8)
    assert index.source(Row(tuple(range(4)) + (7,)))[1] == 4
    assert index.source(Row(tuple(range(3)))) == (None, 0), "no whole block in common"
    assert index.source(Row((1, 0, 2, 3, 4))) == (None, 0)
    index.remove(first)
    assert index.source(Row(tuple(range(8)) + (5,))) == (second, 4), "a row that left is no source"
    index.remove(second)
    assert index.source(Row(tuple(range(10)))) == (None, 0)
    assert not index._whole and not index._blocks, "nothing left behind"


def test_a_hash_match_with_other_tokens_is_not_a_source():
    index = PromptIndex(4)
    held = Row(tuple(range(8)))
    index.add(held)
    impostor = Row((5, 5, 5, 5, 5, 5, 5, 5))
    impostor.prompt_key, impostor.prompt_blocks = (
        held.prompt_key,
        list(held.prompt_blocks),
    )  # as if they collided
    assert index.source(impostor) == (None, 0)
