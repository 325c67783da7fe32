"""Verifiable toy tasks: the tiny model's training data, the shipped prompts and the answer checker."""

from pipeline.tasks.checker import check_row
from pipeline.tasks.generators import TASKS, Instance, expected_answer, is_held_out, sample_instances

__all__ = ["TASKS", "Instance", "check_row", "expected_answer", "is_held_out", "sample_instances"]
