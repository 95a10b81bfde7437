"""The documentation's shell blocks run as written (docs/testing.md says how), or say why not.

Blocks that only make sense on a real cluster are run by tests/test_k8s_e2e.py; the rest that can
run here are run below, against the suite's broker and a fake Datagrid, with the substitutions of
docs/testing.md's table and nothing else.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import docblocks
from tests.docblocks import NOT_RUN, RUN_BY, Block
from tests.support.fake_datagrid import FakeDatagrid, start_fake_datagrid

REPO = docblocks.REPO
THIS = "tests/test_doc_blocks.py"
RunBlock = Callable[..., str]
# Every placeholder the table may use, and who fills it in.
PLACEHOLDERS = {
    THIS: {"kafka", "kafka_port", "datagrid", "port", "tmp"},
    "tests/test_k8s_e2e.py": {
        "pod_kafka",
        "pod_datagrid",
        "image_repository",
        "image_tag",
        "scenario",
        "batch_id",
        "service_ip",
        "api_token",
    },
}


# --- every block is run or marked; the table and the claims stay true --------------------------


def test_every_shell_block_is_run_or_marked() -> None:
    """Each shell block of the README, the chart README and docs/ has a marker: `not run here`
    with a reason, or `run by` a test file that exists and looks the block up by its id."""
    found = docblocks.blocks()
    assert len(found) >= 10, "the parser lost the documents' blocks"
    problems = []
    ids: dict[str, str] = {}
    for b in found:
        if b.marker is None:
            problems.append(f"{b.where}: no `<!-- run by ... -->` or `<!-- not run here: -->`")
        elif b.marker.kind == NOT_RUN and not b.marker.reason:
            problems.append(f"{b.where}: `not run here` without a reason")
        elif b.marker.kind == RUN_BY:
            try:
                test_file, block_id = b.marker.runner
            except ValueError as exc:
                problems.append(f"{b.where}: {exc}")
                continue
            runner = REPO / test_file
            if block_id in ids:
                problems.append(f"{b.where}: id {block_id} is also {ids[block_id]}")
            ids[block_id] = b.where
            if not runner.is_file():
                problems.append(f"{b.where}: {test_file} does not exist")
            elif f'"{block_id}"' not in runner.read_text(encoding="utf-8"):
                problems.append(f"{b.where}: {test_file} never looks up block {block_id!r}")
    assert not problems, "\n".join(problems)


def test_blocks_run_here_each_have_their_test() -> None:
    """Every block marked `run by tests/test_doc_blocks.py` is one of the ids this module runs."""
    mine = {
        b.id
        for b in docblocks.blocks()
        if b.marker and b.marker.kind == RUN_BY and b.marker.runner[0] == THIS
    }
    assert mine == set(RUNNERS)


def test_the_parser_finds_fences_markers_and_console_commands() -> None:
    """The parser takes only shell fences, the marker on the line before (blank lines allowed),
    and from a console block only the commands after `$ `."""
    text = "\n".join(
        [
            "<!-- run by tests/test_doc_blocks.py: one -->",
            "```sh",
            "echo one",
            "```",
            "<!-- not run here: a cloud -->",
            "",
            "```console",
            "$ echo two",
            "two",
            "```",
            "```yaml",
            "a: 1",
            "```",
            "  ```bash",
            "  echo three",
            "  ```",
            "```python",
            "print()",
            "```",
        ]
    )
    found = docblocks.parse("doc.md", text)
    assert [(b.line, b.language, b.text) for b in found] == [
        (2, "sh", "echo one\n"),
        (7, "console", "echo two\n"),
        (14, "bash", "echo three\n"),
    ]
    assert found[0].id == "one"
    assert found[1].marker is not None and found[1].marker.reason == "a cloud"
    assert found[2].marker is None


def test_every_substitution_row_applies_and_uses_known_placeholders() -> None:
    """No row of the substitution table is stale (its written text is in a block of its file),
    and each row's placeholders are ones the test running that block fills in."""
    table = docblocks.substitutions()
    found = docblocks.blocks()
    assert not docblocks.unused_rows(table, found)
    runners: dict[str, set[str]] = {b.path: set() for b in found}
    for b in found:
        if b.marker and b.marker.kind == RUN_BY:
            runners[b.path].add(b.marker.runner[0])
    for row in table:
        used = set(re.findall(r"\{([a-z_]+)\}", row.here))
        known = set().union(*(PLACEHOLDERS[t] for t in runners[row.path]))
        assert used <= known, f"{row}: {used - known} filled in by no test of {row.path}"


def test_the_table_changes_only_the_written_text() -> None:
    """Applying the table replaces exactly the row's text and fills its placeholders."""
    b = Block("README.md", 1, "sh", "a kafka-1:9092 b\n", None)
    table = [docblocks.Substitution("README.md", "kafka-1:9092", "{kafka}", "why")]
    assert docblocks.prepared(b, {"kafka": "127.0.0.1:1"}, table) == "a 127.0.0.1:1 b\n"
    other = Block("docs/x.md", 1, "sh", "a kafka-1:9092 b\n", None)
    assert docblocks.prepared(other, {"kafka": "127.0.0.1:1"}, table) == other.text
    with pytest.raises(KeyError, match="kafka"):
        docblocks.prepared(b, {}, table)


def claims() -> list[tuple[str, str]]:
    """(claim, test id) rows of docs/testing.md's claims table."""
    text = docblocks.TESTING_MD.read_text(encoding="utf-8")
    section = text.partition("\n## Claims and the tests that back them\n")[2].partition("\n## ")[0]
    return re.findall(r"^\| (.+?) \| `(tests/[^`]+)` \|$", section, re.M)


def test_every_claim_names_a_test_that_exists() -> None:
    """Each test id in docs/testing.md's claims table names a test function in an existing file."""
    rows = claims()
    assert len(rows) >= 5, "the claims table is empty or unparsed"
    missing = []
    for claim, test_id in rows:
        path, _, name = test_id.partition("::")
        name = name.partition("[")[0]
        source = REPO / path
        if not source.is_file() or not re.search(
            rf"^(async )?def {re.escape(name)}\(", source.read_text(encoding="utf-8"), re.M
        ):
            missing.append(f"{claim}: {test_id}")
    assert not missing, "\n".join(missing)


# --- the blocks that run here ------------------------------------------------------------------


def free_port(span: int = 1) -> int:
    """A port such that ``span`` consecutive ports from it are free on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + span < 65536 and all(_free(port + i) for i in range(1, span)):
            return port
    raise AssertionError(f"no {span} consecutive free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def git_status() -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@pytest.fixture
def run_block(kafka_bootstrap: str, tmp_path: Path) -> Iterator[RunBlock]:
    """Runs a block by id with the suite's broker; checks the working tree is left as it was."""
    before = git_status()
    port = kafka_bootstrap.split(",")[0].rpartition(":")[2]

    def run(block_id: str, path_first: str = "", **values: str) -> str:
        # A free port always: a row may also touch a comment of another block (`forwarder serve`).
        base = {"kafka": kafka_bootstrap, "kafka_port": port, "tmp": str(tmp_path)}
        base["port"] = str(free_port())
        env = docblocks.clean_environment()
        # The project's tools first (as scripts/test.sh does), then anything the test adds.
        tools = [str(REPO / ".venv" / "bin"), str(REPO / ".cache" / "tools" / "bin")]
        env["PATH"] = ":".join([p for p in [path_first, *tools, env["PATH"]] if p])
        b = docblocks.block(block_id)
        return docblocks.run(b, {**base, **values}, env).stdout

    yield run
    assert git_status() == before, "running the block changed the working tree"


def test_quickstart_block_runs(run_block: RunBlock) -> None:
    """README's first block, `make demo`, forwards the demo batch through the suite's broker."""
    out = run_block("quickstart")
    assert "bpred_demo_1" in out and '"status": "forwarded"' in out, out[-3000:]


@pytest.fixture
def datagrid_for_readme() -> Iterator[FakeDatagrid]:
    """A fake Datagrid of its own for the README's block: its key, and the batch it forwards."""
    with start_fake_datagrid("dg_...") as fake:
        fake.configure("bpred_123", generate={"count": 25, "distinct_ids": 25})
        yield fake


def test_own_kafka_block_runs(
    run_block: RunBlock, datagrid_for_readme: FakeDatagrid, tmp_path: Path
) -> None:
    """README's "Against your own Kafka and Datagrid": `pip install .` into a fresh venv, then
    `forwarder serve` becomes ready and `forwarder forward bpred_123` forwards all 25 lines."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
    out = run_block(
        "own-kafka",
        path_first=str(venv / "bin"),
        datagrid=datagrid_for_readme.base_url,
        port=str(free_port()),
    )
    assert "bpred_123: forwarded: 25 lines" in out, out[-3000:]
    assert (venv / "bin" / "forwarder").is_file(), "forwarder came from the venv pip filled"


def test_chart_files_block_runs(run_block: RunBlock) -> None:
    """The chart README's `cp` commands run, and leave the chart's copies as they are (the
    fixture fails if they changed anything: the copies are current)."""
    run_block("chart-files")


def test_prometheus_block_runs(run_block: RunBlock) -> None:
    """docs/observability.md's `prometheus` command loads the project's configuration and rules
    and becomes ready."""
    run_block("prometheus", port=str(free_port()))


def test_secure_rig_block_runs(run_block: RunBlock) -> None:
    """docs/security.md's `rig.py start --secure` starts the secured broker (and the block's
    exit stops it: its port is free again)."""
    port = free_port(span=4)
    out = run_block("secure-rig", port=str(port))
    assert f"127.0.0.1:{port}" in out, out
    assert _free(port), f"the secured broker still listens on {port}"


RUNNERS = {
    "quickstart": test_quickstart_block_runs,
    "own-kafka": test_own_kafka_block_runs,
    "chart-files": test_chart_files_block_runs,
    "prometheus": test_prometheus_block_runs,
    "secure-rig": test_secure_rig_block_runs,
}
