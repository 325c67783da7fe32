"""The task checker as a postprocess callable: `postprocess=task_checker` adds task, expected, is_correct
and score columns to every output row (see pipeline.runner.postprocess for the callable contract)."""

from __future__ import annotations

from typing import Any

from pipeline.tasks.generators import expected_answer


def check_row(row: dict[str, Any], *, drop_incorrect: bool = False) -> dict[str, Any] | None:
    """Returns the columns to add to `row`, or None to drop the row (when drop_incorrect and it is wrong).

    score is the fraction of answer characters right at their position (partial credit); is_correct needs
    the completion, stripped of surrounding whitespace, to equal the answer exactly.
    """
    parsed = expected_answer(row.get("prompt") or "")
    if parsed is None:
        return {"task": None, "expected": None, "is_correct": None, "score": None}
    task, answer = parsed
    got = (row.get("completion") or "").strip()
    correct = got == answer
    if drop_incorrect and not correct:
        return None
    matches = sum(a == b for a, b in zip(got, answer, strict=False))
    score = matches / max(len(answer), len(got), 1)
    return {"task": task, "expected": answer, "is_correct": correct, "score": float(score)}


check_row.columns = {"task": "string", "expected": "string", "is_correct": "bool", "score": "double"}
