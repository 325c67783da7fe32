"""Generated tasks with exactly one correct answer each, where parallel refinement and self-correction matter:

  addition  "Add: 482+519"        -> "1001"        (carries couple every digit to the ones right of it)
  sort      "Sort: 7 3 9 1 4"     -> "1 3 4 7 9"   (every output position depends on the whole input)
  reverse   "Reverse: planet"     -> "tenalp"      (position i depends on position n-1-i)

A fixed hash of the prompt splits instances into train (95%) and held-out (5%): training never sees a
held-out prompt, and evaluation and the shipped prompts draw only held-out ones.
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Instance:
    task: str
    prompt: str
    answer: str


def _addition(rng: random.Random, digits: int | None = None) -> Instance:
    d1 = digits or rng.randint(1, 4)
    d2 = digits or rng.randint(1, 4)
    a = rng.randint(10 ** (d1 - 1) if d1 > 1 else 0, 10**d1 - 1)
    b = rng.randint(10 ** (d2 - 1) if d2 > 1 else 0, 10**d2 - 1)
    return Instance("addition", f"Add: {a}+{b}", str(a + b))


def _sort(rng: random.Random, digits: int | None = None) -> Instance:
    n = digits or rng.randint(3, 8)
    values = [rng.randint(0, 9) for _ in range(n)]
    return Instance("sort", "Sort: " + " ".join(map(str, values)), " ".join(map(str, sorted(values))))


def _reverse(rng: random.Random, digits: int | None = None) -> Instance:
    n = digits or rng.randint(3, 10)
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(n))
    return Instance("reverse", f"Reverse: {word}", word[::-1])


TASKS: dict[str, Callable[..., Instance]] = {"addition": _addition, "sort": _sort, "reverse": _reverse}
HELD_OUT_BUCKETS = 20  # 1 in 20 prompts is held out


def is_held_out(prompt: str) -> bool:
    digest = hashlib.blake2b(prompt.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") % HELD_OUT_BUCKETS == 0


def sample_instances(
    task: str, count: int, *, seed: int, split: str = "train", size: int | None = None
) -> list[Instance]:
    """`count` distinct instances of `task` from `split` ("train" or "heldout"), deterministic for a seed.
    `size` fixes the digit count (addition) or list/word length (sort, reverse)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r} must be 'train' or 'heldout'")
    rng = random.Random(f"{task}:{split}:{seed}:{size}")
    want_held_out = split == "heldout"
    seen: set[str] = set()
    out: list[Instance] = []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 200 * count + 10_000:
            raise ValueError(f"cannot draw {count} distinct {split} instances of {task} (size={size})")
        inst = TASKS[task](rng, size)
        if inst.prompt in seen or is_held_out(inst.prompt) != want_held_out:
            continue
        seen.add(inst.prompt)
        out.append(inst)
    return out


_PATTERNS = {
    "addition": re.compile(r"^Add: (\d+)\+(\d+)$"),
    "sort": re.compile(r"^Sort: (\d(?: \d)*)$"),
    "reverse": re.compile(r"^Reverse: ([a-z]+)$"),
}


def expected_answer(prompt: str) -> tuple[str, str] | None:
    """(task, answer) for a task prompt, or None if the prompt is not one of the tasks."""
    text = prompt.strip()
    if m := _PATTERNS["addition"].match(text):
        return "addition", str(int(m.group(1)) + int(m.group(2)))
    if m := _PATTERNS["sort"].match(text):
        return "sort", " ".join(sorted(m.group(1).split(), key=int))
    if m := _PATTERNS["reverse"].match(text):
        return "reverse", m.group(1)[::-1]
    return None
