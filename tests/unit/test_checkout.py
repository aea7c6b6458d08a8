"""What a clone gets: no link into somebody's machine (a committed `.venv -> /work/main/.venv`
leaves a fresh clone a dangling .venv that run.sh cannot create its venv in), and nothing the
repository's own .gitignore ignores."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")


def test_no_tracked_link_points_outside_the_repository():
    links = [line.split("\t", 1)[1] for line in git("ls-files", "-s", "-z").split("\0") if line.startswith("120000 ")]
    outside = []
    for path in links:
        target = git("cat-file", "-p", f"HEAD:{path}") if path else ""
        resolved = os.path.normpath(ROOT / Path(path).parent / target)
        if os.path.isabs(target) or not resolved.startswith(str(ROOT) + os.sep):
            outside.append(f"{path} -> {target}")
    assert outside == []


def test_nothing_tracked_is_ignored():
    assert git("ls-files", "-ci", "--exclude-standard") == ""
