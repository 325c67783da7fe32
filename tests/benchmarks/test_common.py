"""The environment every benchmark row is tagged with: the commit, and whether the checkout had uncommitted
changes to tracked files when it ran (a real git repository in a temporary folder)."""

from __future__ import annotations

import subprocess

from benchmarks.common import environment


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_rows_say_which_commit_and_whether_the_checkout_was_dirty(tmp_path, monkeypatch):
    monkeypatch.delenv("CANVASFLOW_COMMIT", raising=False)
    assert environment(str(tmp_path))["commit"] is None  # not a checkout
    assert environment(str(tmp_path))["dirty"] is None
    _git(tmp_path, "init", "-q")
    (tmp_path / "kernel.py").write_text("A = 1\n")
    _git(tmp_path, "add", "kernel.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    clean = environment(str(tmp_path))
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    (tmp_path / "notes.txt").write_text("untracked files do not count\n")
    assert environment(str(tmp_path))["dirty"] is False
    (tmp_path / "kernel.py").write_text("A = 2\n")
    changed = environment(str(tmp_path))
    assert changed["commit"] == clean["commit"] and changed["dirty"] is True


def test_a_copy_without_git_takes_the_commit_it_is_told(tmp_path, monkeypatch):
    """The GPU machine gets the working tree without .git; gpu_checks.sh's caller names the commit."""
    monkeypatch.setenv("CANVASFLOW_COMMIT", "c046842")
    assert environment(str(tmp_path))["commit"] == "c046842"
    assert environment(str(tmp_path))["dirty"] is None  # unknown: nothing to compare with
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("A = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    assert len(environment(str(tmp_path))["commit"]) == 40  # a checkout's own commit comes first
