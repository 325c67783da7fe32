"""The prompts shipped with canvasflow (`data.path=builtin:prompts`): held-out task instances.

Regenerate with `python -m pipeline.tasks.shipped`; a test checks the file matches this definition.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.tasks.generators import sample_instances

SHIPPED_PATH = Path(__file__).resolve().parents[1] / "assets" / "prompts" / "prompts.jsonl"
MIX = (("addition", 120, 3), ("sort", 60, None), ("reverse", 60, None))


def shipped_rows() -> list[dict[str, str]]:
    rows = []
    for task, count, size in MIX:
        for i, inst in enumerate(sample_instances(task, count, seed=2026, split="heldout", size=size)):
            rows.append({"id": f"{task}-{i:03d}", "prompt": inst.prompt, "task": task})
    return rows


def render() -> str:
    return "".join(json.dumps(row) + "\n" for row in shipped_rows())


if __name__ == "__main__":
    SHIPPED_PATH.write_text(render(), encoding="utf-8")
    print(f"wrote {SHIPPED_PATH}")
