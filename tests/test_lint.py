"""The code base stays linted, formatted and strictly typed (what pre-commit runs)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

PATHS = ["forwarder", "tests", "bench", "deploy", "examples"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_ruff_check() -> None:
    """ruff finds nothing with the project's rule list."""
    done = run("ruff", "check", *PATHS)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format() -> None:
    """Every Python file is formatted as ruff formats it."""
    done = run("ruff", "format", "--check", *PATHS)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_strict() -> None:
    """The package type-checks under mypy --strict."""
    done = run("mypy")
    assert done.returncode == 0, done.stdout + done.stderr
