"""pipeline/data/json_document.py against json itself, on random documents cut into blocks anywhere: every valid
JSON container is recognised, and text holding two values never is (the readers' cases: test_reader_fixes.py)."""

from __future__ import annotations

import json
import random
import string

import pytest

from pipeline.data.json_document import document_kind

# Characters that strings draw from: JSON's punctuation, quotes and backslashes (escaped by json.dumps), non-ASCII.
STRING_CHARS = string.printable + 'é"\\/[]{},:\u2028😀'


def _value(rng: random.Random, depth: int = 0):
    pick = rng.random()
    if depth > 4 or pick < 0.4:
        return rng.choice(
            [
                lambda: "".join(rng.choice(STRING_CHARS) for _ in range(rng.randint(0, 12))),
                lambda: rng.randint(-(10**6), 10**6),
                lambda: rng.uniform(-1, 1) * 10 ** rng.randint(-30, 30),
                lambda: rng.choice([True, False, None, float("nan"), float("inf"), -float("inf")]),
            ]
        )()
    if pick < 0.7:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = (
        "".join(rng.choice(STRING_CHARS) for _ in range(rng.randint(0, 5))) for _ in range(rng.randint(0, 4))
    )
    return {key: _value(rng, depth + 1) for key in keys}


def _container(rng: random.Random):
    while not isinstance(value := _value(rng), (list, dict)):
        pass
    return value


def _dumps(rng: random.Random, value) -> str:
    return json.dumps(
        value,
        indent=rng.choice([None, 0, 2, "\t"]),
        separators=rng.choice([None, (",", ":")]),
        ensure_ascii=rng.random() < 0.5,
    )


def _blocks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("seed", range(4))
def test_random_containers_are_recognised_and_two_values_never_at_any_block_size(seed):
    rng = random.Random(seed)
    for _ in range(400):
        value = _container(rng)
        text = _dumps(rng, value) + rng.choice(["", "\n", "\n \n"])
        size = rng.choice([1, 2, 3, 7, 64, 1 << 16])
        assert document_kind(_blocks(text, size)) == type(value).__name__, (text, size)
        second = text + rng.choice(["", " ", "\n"]) + json.dumps(_value(rng))
        with pytest.raises(ValueError):
            document_kind(_blocks(second, size))
        # One character changed: what json still reads as a container is recognised (the check is looser than
        # json elsewhere, e.g. misspelled scalars, but never stricter).
        at = rng.randrange(len(text) + 1)
        mutant = text[:at] + rng.choice(["", ",", '"', "[", "]", "{", "}", ":", "1", "\n"]) + text[at + 1 :]
        try:
            truth = json.loads(mutant)
        except (ValueError, RecursionError):
            continue
        if isinstance(truth, (list, dict)):
            assert document_kind(_blocks(mutant, size)) == type(truth).__name__, (mutant, size)


def test_a_string_longer_than_many_blocks_is_carried_whole():
    text = json.dumps(["x" * 200_000 + '\\"' * 1000, 1])
    blocks = _blocks(text, 7)  # ~29k blocks (the scan waits for as much text again before rescanning it)
    assert document_kind(blocks) == "list"
