"""Training data: an endless, seeded stream of train-split task instances, encoded exactly as at inference,
grouped into batches whose prompts share one token length.

Inference encodes a prompt as one user turn of the chat template with the generation prompt, tokenized
without extra special tokens, at positions 0..P-1; the canvas follows at P..P+L-1. Batches of one prompt
length need no padding, so the Hugging Face forward's default positions are exactly the sampler's.
The canvas target is answer + <eos> + <pad>... (canvas_length tokens).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.tasks.generators import TASKS, Instance, is_held_out
from pipeline.training.config import TaskMix


@dataclass(frozen=True)
class Example:
    task: str
    prompt_ids: tuple[int, ...]
    target: tuple[int, ...]  # [canvas_length]: answer, <eos>, <pad>...


@dataclass
class Batch:
    prompt_ids: torch.Tensor  # [B, P] int64, one prompt length for the whole batch
    target: torch.Tensor  # [B, L] int64
    tasks: list[str]


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """The sampler's prompt ids: chat template, one user turn, generation prompt, no added specials."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_target(tokenizer: Any, answer: str, canvas_length: int) -> list[int]:
    ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if len(ids) + 1 > canvas_length:
        raise ValueError(
            f"answer {answer!r} needs {len(ids) + 1} tokens with <eos>; canvas has {canvas_length}"
        )
    return ids + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (canvas_length - len(ids) - 1)


def train_instances(seed: int, mix: TaskMix) -> Iterator[Instance]:
    """Endless train-split instances; the same seed gives the same sequence (held-out prompts are skipped)."""
    rng = random.Random(f"canvasflow-train:{seed}")
    names = ["addition", "sort", "reverse"]
    weights = [mix.addition, mix.sort, mix.reverse]
    while True:
        task = rng.choices(names, weights)[0]
        size = 3 if task == "addition" and rng.random() < mix.addition_3digit else None
        inst = TASKS[task](rng, size)
        if not is_held_out(inst.prompt):
            yield inst


def encode_examples(instances: Iterator[Instance], tokenizer: Any, canvas_length: int) -> Iterator[Example]:
    for inst in instances:
        yield Example(
            task=inst.task,
            prompt_ids=tuple(encode_prompt(tokenizer, inst.prompt)),
            target=tuple(encode_target(tokenizer, inst.answer, canvas_length)),
        )


def bucket_by_length(examples: Iterator[Example], batch_size: int) -> Iterator[list[Example]]:
    """Groups examples by prompt length; a bucket is emitted the moment it holds `batch_size` examples.

    Deterministic for a deterministic input. Rare lengths wait longer, so the emitted order interleaves
    lengths (and tasks) rather than draining one length at a time.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    buckets: dict[int, list[Example]] = {}
    for ex in examples:
        bucket = buckets.setdefault(len(ex.prompt_ids), [])
        bucket.append(ex)
        if len(bucket) == batch_size:
            yield bucket
            buckets[len(ex.prompt_ids)] = []


def collate(examples: Sequence[Example]) -> Batch:
    lengths = {len(ex.prompt_ids) for ex in examples}
    if len(lengths) != 1:
        raise ValueError(f"a batch needs one prompt length (no padding); got lengths {sorted(lengths)}")
    return Batch(
        prompt_ids=torch.tensor([ex.prompt_ids for ex in examples], dtype=torch.long),
        target=torch.tensor([ex.target for ex in examples], dtype=torch.long),
        tasks=[ex.task for ex in examples],
    )


def train_batches(
    tokenizer: Any, *, seed: int, mix: TaskMix, batch_size: int, canvas_length: int
) -> Iterator[Batch]:
    """The training loop's batches: seeded task stream -> encoded examples -> length buckets -> tensors."""
    examples = encode_examples(train_instances(seed, mix), tokenizer, canvas_length)
    for group in bucket_by_length(examples, batch_size):
        yield collate(group)
