"""The documentation's shell blocks: found, marked, made runnable here, and run.

``docs/testing.md`` ("How the documentation is tested") is the one place that says how: every
fenced ``bash`` / ``sh`` / ``console`` / ``shell`` block of ``README.md``,
``helm/forwarder/README.md`` and ``docs/*.md`` carries a marker on the line before it (blank lines
between are allowed)::

    <!-- run by tests/test_doc_blocks.py: quickstart -->
    <!-- not run here: a registry (no chart has been published) -->

and the edits this machine needs (addresses, ports, image) are the rows of the substitution table
in ``docs/testing.md``, parsed here, never copies of the commands kept in a test. A block whose
marker names a test file is run by that test, which looks it up by its id (:func:`block`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTING_MD = REPO / "docs" / "testing.md"
SHELL_LANGUAGES = frozenset({"bash", "sh", "console", "shell"})
NOT_RUN, RUN_BY = "not run here", "run by"

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_MARKER = re.compile(r"^\s*<!--\s*(not run here|run by)\s*(.*?)\s*-->\s*$")
_RUN_BY = re.compile(r"^(tests/[\w/]+\.py):\s*([\w-]+)$")
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")

# Defined before every block: servers a block starts are waited for with it, then stopped.
PRELUDE = r"""set -euo pipefail
wait_http() {  # wait_http URL: until URL answers 2xx, while the last background job lives
    local pid=$! deadline=$((SECONDS + ${DOC_WAIT_SECONDS:-120}))
    until curl -fsS -o /dev/null --max-time 5 "$1"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "wait_http: the server exited before $1 answered" >&2; return 1
        fi
        if ((SECONDS >= deadline)); then
            echo "wait_http: $1 did not answer 2xx in time" >&2; return 1
        fi
        sleep 1
    done
}
"""


def documents() -> list[Path]:
    """The documents whose shell blocks are checked."""
    docs = sorted((REPO / "docs").glob("*.md"))
    return [REPO / "README.md", REPO / "helm" / "forwarder" / "README.md", *docs]


@dataclass(frozen=True)
class Marker:
    """What the document says about a block: ``not run here`` (with the reason) or ``run by``."""

    kind: str
    detail: str

    @property
    def runner(self) -> tuple[str, str]:
        """(test file, block id) of a ``run by`` marker; ValueError for anything else."""
        match = _RUN_BY.match(self.detail.removeprefix(":").strip())
        if self.kind != RUN_BY or match is None:
            raise ValueError(f"not a `run by tests/<file>.py: <id>` marker: {self}")
        return match[1], match[2]

    @property
    def reason(self) -> str:
        """The reason of a ``not run here`` marker (empty if none was given)."""
        return self.detail.removeprefix(":").strip() if self.kind == NOT_RUN else ""


@dataclass(frozen=True)
class Block:
    """One fenced shell block: where it is, its commands as written, and its marker."""

    path: str  # relative to the repository
    line: int  # 1-based line of the opening fence
    language: str
    text: str  # for `console`, the commands only (prompt removed, output dropped)
    marker: Marker | None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def id(self) -> str | None:
        """The id of a ``run by`` marker, if the block has one."""
        if self.marker is None or self.marker.kind != RUN_BY:
            return None
        return self.marker.runner[1]


def parse(path: str, text: str) -> list[Block]:
    """The shell blocks of one Markdown document (``path`` is only used to name them)."""
    lines = text.splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        indent, ticks, language = fence[1], fence[2], fence[3].lower()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(ticks):
            end += 1
        if language in SHELL_LANGUAGES:
            body = [line.removeprefix(indent) for line in lines[i + 1 : end]]
            if language == "console":
                body = [line[2:] for line in body if line.startswith("$ ")]
            found.append(Block(path, i + 1, language, "\n".join(body) + "\n", _marker(lines, i)))
        i = end + 1
    return found


def _marker(lines: list[str], fence: int) -> Marker | None:
    j = fence - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    match = _MARKER.match(lines[j]) if j >= 0 else None
    return Marker(match[1], match[2]) if match else None


def blocks() -> list[Block]:
    """Every shell block of every checked document, in document order."""
    return [
        b
        for doc in documents()
        for b in parse(str(doc.relative_to(REPO)), doc.read_text(encoding="utf-8"))
    ]


def block(block_id: str) -> Block:
    """The one block marked ``run by ...: <block_id>``."""
    matches = [b for b in blocks() if b.id == block_id]
    if len(matches) != 1:
        raise AssertionError(
            f"expected one block marked `run by ...: {block_id}`, found "
            f"{[b.where for b in matches] or 'none'}: was the marker or the block removed?"
        )
    return matches[0]


@dataclass(frozen=True)
class Substitution:
    """One row of docs/testing.md's substitution table."""

    path: str
    written: str
    here: str
    why: str


def substitutions(testing_md: Path = TESTING_MD) -> list[Substitution]:
    """The rows of the table under ``## The substitution table`` in docs/testing.md."""
    text = testing_md.read_text(encoding="utf-8")
    section = text.partition("\n## The substitution table\n")[2].partition("\n## ")[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("|") or set(line) <= set("|- "):
            continue
        cells = [_cell(c) for c in line.strip().strip("|").split(" | ")]
        if cells[0] == "file":  # the header
            continue
        if len(cells) != 4:
            raise ValueError(f"{testing_md}: a substitution row has 4 cells: {line}")
        rows.append(Substitution(*cells))
    if not rows:
        raise ValueError(f"{testing_md}: no rows under `## The substitution table`")
    return rows


def _cell(cell: str) -> str:
    cell = cell.strip()
    if cell.startswith("`") and cell.endswith("`"):
        cell = cell[1:-1]
    return cell


def prepared(b: Block, values: Mapping[str, str], table: list[Substitution] | None = None) -> str:
    """The block's text with every row of the table for its file applied, placeholders filled.

    A row for the block's file whose written text is not in the block is not an error here (a
    file's rows may concern another of its blocks); :func:`unused_rows` finds rows matching none.
    """
    text = b.text
    for row in substitutions() if table is None else table:
        if row.path == b.path and row.written in text:
            text = text.replace(row.written, fill(row.here, values))
    return text


def fill(template: str, values: Mapping[str, str]) -> str:
    """``template`` with each ``{name}`` replaced by ``values[name]``."""

    def one(match: re.Match[str]) -> str:
        if match[1] not in values:
            raise KeyError(f"the substitution table uses {{{match[1]}}}, which the test lacks")
        return values[match[1]]

    return _PLACEHOLDER.sub(one, template)


def unused_rows(table: list[Substitution], found: list[Block]) -> list[Substitution]:
    """Rows whose written text appears in no block of their file (stale after a doc edit)."""
    return [
        row for row in table if not any(b.path == row.path and row.written in b.text for b in found)
    ]


# Variables of the test process that must not leak into a block: a reader's shell has none of them,
# and the block must work with what it sets itself plus the table.
_FOREIGN = ("FORWARDER_", "DATAGRID_", "KUBECONFIG", "VIRTUAL_ENV", "PYTEST_", "KAFKA_RIG")


def clean_environment(**extra: str) -> dict[str, str]:
    """The test process's environment without the project's settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN)}
    return {**env, **extra}


def run(
    b: Block,
    values: Mapping[str, str],
    env: Mapping[str, str],
    *,
    cwd: Path = REPO,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run the prepared block with bash (``set -euo pipefail``), in its own process group.

    Whatever the block started in the background (a server) is stopped when it ends: SIGTERM to
    the group, SIGKILL after 20 s. Fails with the file and line of the block and its output.
    """
    script = PRELUDE + prepared(b, values)
    # Output goes to files, not pipes: a server the block leaves in the background would hold a
    # pipe open, and reading it to the end would wait for the server instead of the block.
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(
            ["bash", "-c", script],
            cwd=cwd,
            env=dict(env),
            stdout=stdout,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _stop_group(proc.pid)
            proc.wait()
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    if group_alive(proc.pid):
        raise AssertionError(f"{b.where}: processes the block started outlived SIGKILL")
    if timed_out:
        raise AssertionError(
            f"{b.where}: the block did not finish in {timeout:.0f}s\n" + _tail(out, err)
        )
    if proc.returncode != 0:
        raise AssertionError(
            f"{b.where}: the block exited {proc.returncode}\n--- as run\n{script}\n"
            + _tail(out, err)
        )
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _stop_group(pgid: int) -> None:
    """SIGTERM the process group, SIGKILL what is left after 20 s."""
    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not group_alive(pgid):
                return
            time.sleep(0.2)


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _tail(out: str, err: str) -> str:
    return f"--- stdout\n{out[-4000:]}\n--- stderr\n{err[-4000:]}"
