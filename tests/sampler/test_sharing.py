"""PromptIndex: which slot holds a prompt, or the most of its leading blocks; hash matches are checked."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.sampler.sharing import PromptIndex, prefix_hashes


@dataclass
class Row:
    prompt: tuple[int, ...]
    prompt_key: tuple[int, int] = (0, 0)
    prompt_blocks: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.prompt_key = (len(self.prompt), hash(self.prompt))
        self.prompt_blocks = prefix_hashes(self.prompt, 4)


def test_whole_prompt_then_deepest_common_block_run():
    index = PromptIndex(4)
    index.add(0, Row(tuple(range(10))))  # blocks [0..3], [4..7]; 2 tokens more
    index.add(1, Row(tuple(range(4)) + (9, 9, 9, 9, 9)))
    assert index.source(Row(tuple(range(10)))) == (0, 10), "the same prompt: copied whole"
    assert index.source(Row(tuple(range(8)) + (5,))) == (0, 8)
    assert index.source(Row(tuple(range(4)) + (9, 9, 9, 9))) == (1, 8)
    assert index.source(Row(tuple(range(4)) + (7,))) in ((0, 4), (1, 4))
    assert index.source(Row(tuple(range(3)))) == (None, 0), "no whole block in common"
    assert index.source(Row((1, 0, 2, 3, 4))) == (None, 0)


def test_a_hash_match_with_other_tokens_is_not_a_source():
    index = PromptIndex(4)
    held = Row(tuple(range(8)))
    index.add(0, held)
    impostor = Row((5, 5, 5, 5, 5, 5, 5, 5))
    impostor.prompt_key, impostor.prompt_blocks = (
        held.prompt_key,
        list(held.prompt_blocks),
    )  # as if they collided
    assert index.source(impostor) == (None, 0)
