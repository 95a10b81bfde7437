"""Shared by the delivery tests (Dockerfile, Helm chart, compose file): paths, tools, settings.

Tools are never skipped for: a missing one fails the test that needs it, with the way to get it.
``helm`` and ``kubeconform`` come from ``deploy/tools/install.sh``, which :func:`tool` runs once per
session (idempotent: about 20 ms when the pinned versions are already in ``.cache/tools/bin``,
a few minutes of ``go install`` when they are not). ``hadolint`` and ``kubernetes-validate`` are
Python packages of the dev group, found next to the running interpreter. ``uv`` is the one
``scripts/bootstrap.sh`` pins in ``.cache/uv``. No tool is looked up on ``PATH``: a tool that is
only there because someone installed it by hand would pass here and fail on a fresh machine.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from forwarder.config import ENV_PREFIX, setting_fields

REPO = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = REPO / "deploy" / "tools" / "install.sh"
GO_TOOLS = ("helm", "kubeconform")
UV = REPO / ".cache" / "uv" / "bin" / "uv"


def run(
    args: Sequence[str | Path],
    *,
    cwd: Path = REPO,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise an AssertionError carrying its output."""
    proc = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=None if env is None else {**os.environ, **env},
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


@functools.cache
def _go_tools_bin() -> Path:
    """Run deploy/tools/install.sh (once per session) and return the directory it installed into."""
    proc = run(["bash", INSTALL_SCRIPT], timeout=900)
    return Path(proc.stdout.strip().splitlines()[-1])


def tool(name: str) -> str:
    """Absolute path of a delivery tool; fails (never skips) when it cannot be had."""
    if name in GO_TOOLS:
        path = _go_tools_bin() / name
    elif name == "uv":
        path = UV
    else:
        # Console scripts of the dev group live beside the interpreter running the tests.
        path = Path(sys.executable).parent / name
    if not path.exists():
        raise AssertionError(
            f"{name} not found at {path}: run scripts/bootstrap.sh (uv and the Python tools) "
            f"or {INSTALL_SCRIPT} (helm, kubeconform)"
        )
    return str(path)


@functools.cache
def setting_variables() -> frozenset[str]:
    """Every environment variable the service reads: one per Settings field, plus its aliases."""
    return frozenset(name for field in setting_fields().values() for name in field.variables)


def settings_default(variable: str) -> object:
    """The service's default for a ``FORWARDER_*`` variable, as the environment would spell it."""
    field = variable.removeprefix(ENV_PREFIX).lower()
    default = setting_fields()[field].default
    return getattr(default, "value", default)
