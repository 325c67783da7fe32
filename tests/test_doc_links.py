"""Every relative link in the project's Markdown (README.md, docs/, infra/, benchmarks/) names a file that
exists, and every #anchor a heading of its target, as GitHub renders them: the README links into
docs/input.md's headings, and a renamed heading broke such links without a word."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(
    p
    for p in [
        ROOT / "README.md",
        *ROOT.glob("docs/*.md"),
        *ROOT.glob("infra/**/*.md"),
        *ROOT.glob("benchmarks/*.md"),
    ]
    if p.is_file()
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but '-' and '_' dropped, spaces as '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M):
        name, n = anchor(heading), 1
        while name in found:  # a repeated heading gets -1, -2, ...
            name = f"{anchor(heading)}-{n}"
            n += 1
        found.add(name)
    return found


def links(path: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", path.read_text(encoding="utf-8")))


def test_anchor_matches_githubs_rule():
    assert anchor("Checking a job: `run.dry_run=true`") == "checking-a-job-rundry_runtrue"
    assert anchor("Start-up failures (exit code 2)") == "start-up-failures-exit-code-2"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(doc: Path):
    broken = []
    for target in links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file, _, fragment = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif fragment and path.suffix == ".md" and fragment not in anchors(path):
            broken.append(f"{target}: no heading #{fragment} in {path.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)
