"""The README's Python example runs and prints what the README says it prints."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_example_prints_what_the_readme_shows():
    text = README.read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    expected = [line[2:] for line in code.splitlines() if line.startswith("# ")]
    assert expected, "the example documents its output in '# ' comment lines"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), {})
    assert printed.getvalue().splitlines() == expected


def test_readme_starts_with_the_two_commands():
    first_block = README.read_text(encoding="utf-8").split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in first_block.splitlines() if line and not line.startswith("#")]
    assert commands == [
        'python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt torch==2.13.0 -e ".[test]" '
        "&& .venv/bin/python jobs/generate.py",
        ".venv/bin/python -m pytest",
    ]
    ci = (README.parent / ".ci" / "run").read_text()
    # The README's install, without compiling every installed module ahead (.ci/run says why).
    assert '.venv/bin/pip install -q --no-compile -c constraints.txt torch==2.13.0 -e ".[test]"' in ci
    assert "\n.venv/bin/python -m pytest\n" in ci, "CI runs the README's test command"


def _section(title: str) -> str:
    return README.read_text(encoding="utf-8").split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_output_tree_names_every_object_of_the_run_layout():
    from pipeline.io import commit
    from pipeline.io.columns import COLUMNS

    tree = _section("Output").split("```", 2)[1]
    names = {
        line.split()[0] for line in tree.splitlines()[2:] if line.strip() and not line.startswith(" " * 4)
    }
    expected = {
        commit.data_key(0).replace("00000", "<shard>"),
        commit.errors_key(0).replace("00000", "<shard>"),
        commit.COMMITS + "shard-<shard>.json",
        COLUMNS,
        commit.RUN_FILE,
        commit.RUN_LOCK,
        commit.SUCCESS,
        commit.MANIFEST,
        "_config.yaml",
        "stats.json",
        "README.md",
    }
    assert names == expected


def test_output_columns_are_those_of_the_parts():
    from pipeline.io.parts import OUTPUT_SCHEMA

    text = _section("Output").split("Output columns:", 1)[1].split("plus any columns", 1)[0]
    listed = [name for name in re.findall(r"`([a-z_]+)`", text) if name not in ("eos", "length", "stop")]
    assert listed == OUTPUT_SCHEMA.names
