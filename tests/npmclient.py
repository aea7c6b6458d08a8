"""Real client programs from npm (Claude Code, Codex CLI) installed into the checkout's .cache/ for
the end-to-end tests that run them; a test skips with the reason when npm or the package is missing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def npm_client(prefix: Path, package: str, version: str, binary: str) -> Path:
    """The path of `binary` from `package@version`, installed under `prefix` on first use."""
    path = prefix / "node_modules" / ".bin" / binary
    if not path.exists():
        if shutil.which("npm") is None:
            pytest.skip(f"npm is not installed (.ci/run installs it): cannot install {package}")
        proc = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(prefix),
                               f"{package}@{version}"], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not path.exists():
            pytest.skip(f"npm could not install {package}@{version}: {proc.stderr[-500:]}")
    return path
