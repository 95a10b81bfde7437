#!/usr/bin/env python3
"""Mutation audit of the failure policy (issue 21): curated behaviour-changing mutants, each
applied alone to a scratch copy of the tree, each run against the tests that must kill it.

A generic mutation tool over the whole suite would take hours on a small machine (most of the
suite needs a broker, a fake Datagrid and subprocesses); these mutants are the failures the
failure policy exists to prevent, so each one names the fastest tests that should see it.  A
survivor is a finding: a behaviour no test pins down.

    python scripts/mutate.py                   # every mutant; prints a table and the score
    python scripts/mutate.py --only NAME ...   # some of them
    python scripts/mutate.py --list            # the mutants and their tests, nothing run

The working tree is never changed: the tracked and untracked (not ignored) files are copied to a
temporary directory, whose ``forwarder`` package comes first on ``PYTHONPATH`` (the venv's
editable install points at the working tree, and tests start ``forwarder`` subprocesses).  The
venv is reused by path.  One broker (``deploy/kafka/rig.py``, port ``$TEST_KAFKA_PORT`` or 19092)
is started for the whole run unless ``FORWARDER_KAFKA_BOOTSTRAP_SERVERS`` names one.  The named
tests first run once unmutated: a test failing then is not used (it would "kill" anything), and a
mutant left with no test is reported as not measured.

Exit status: 0 when every mutant was killed, 1 otherwise (a survivor, an error, a mutant not
measured), 2 for misuse.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = REPO / ".venv" / "bin" / "python"
#: Seconds one mutant's tests may take before the run counts it as killed by a hang.
TIMEOUT = 900


@dataclass(frozen=True)
class Mutant:
    """One behaviour change: ``old`` (occurring exactly once in ``path``) becomes ``new``."""

    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "one-line-short-complete",
        "a stream one line short of request_counts.total counts as complete",
        "forwarder/pipeline.py",
        "if expected is not None and progress.result_lines < expected:",
        "if expected is not None and progress.result_lines < expected - 1:",
        ("tests/test_edges.py::test_line_count_must_match_request_counts_total",),
    ),
    Mutant(
        "retry-after-only-on-429",
        "Retry-After ignored on a retriable status other than 429",
        "forwarder/datagrid.py",
        "retry_after=parse_retry_after(headers))",
        "retry_after=parse_retry_after(headers) if status == 429 else None)",
        (
            "tests/test_pipeline.py::test_retry_after_is_honoured_on_a_retriable_status_other_than_429",
        ),
    ),
    Mutant(
        "eos-offsets-not-sent",
        "exactly-once: the job's offsets never added to the transaction (Transaction.send_offsets)",
        "forwarder/outcome.py",
        "await self.producer.send_offsets_to_transaction(self.offsets, self.group_id)",
        "pass",
        (
            "tests/test_failure_policy.py::test_exactly_once_offsets_commit_in_the_transaction",
            "tests/test_exactly_once.py::test_service_commits_offsets_in_the_transaction",
        ),
    ),
    Mutant(
        "eos-offsets-left-to-consumer",
        "exactly-once: Worker.run_job gives the transaction no offsets (the consumer commits them)",
        "forwarder/worker.py",
        "offsets = {tp: commit} if commit is not None else None",
        "offsets = None",
        (
            "tests/test_failure_policy.py::test_exactly_once_offsets_commit_in_the_transaction",
            "tests/test_exactly_once.py::test_service_commits_offsets_in_the_transaction",
        ),
    ),
    Mutant(
        "config-spends-attempt",
        "retry() spends an attempt on a CONFIG error",
        "forwarder/retry.py",
        "            if not config:\n                transient += 1",
        "            if True:\n                transient += 1",
        ("tests/unit/test_retry.py::test_config_problems_spend_no_attempt_and_show_in_health",),
    ),
    Mutant(
        "health-not-cleared",
        "retry() leaves Health failed after the step succeeds",
        "forwarder/retry.py",
        "                health.clear(where)",
        "                pass",
        ("tests/unit/test_retry.py::test_config_problems_spend_no_attempt_and_show_in_health",),
    ),
    Mutant(
        "attempts-off-by-one",
        "retry() allows one transient failure more than policy.attempts",
        "forwarder/retry.py",
        "transient >= policy.attempts",
        "transient > policy.attempts",
        ("tests/unit/test_retry.py::test_transient_failures_are_retried_up_to_the_attempts",),
    ),
    Mutant(
        "retry-after-uncapped",
        "Backoff.delay honours a Retry-After above the cap",
        "forwarder/errors.py",
        "return min(max(retry_after, 0.0), self.cap)",
        "return max(retry_after, 0.0)",
        ("tests/unit/test_retry.py::test_waits_follow_the_backoff_and_honour_retry_after",),
    ),
    Mutant(
        "message-too-large-transient",
        "translate() does not map MessageSizeTooLarge to CONFIG",
        "forwarder/kafka.py",
        '    MessageSizeTooLargeError: "a record is larger than the topic\'s max.message.bytes",\n',
        "",
        (
            "tests/unit/test_errors.py::test_refusals_no_retry_can_mend_are_configuration_problems",
            "tests/unit/test_errors.py::test_record_too_large_and_refused_authorization_are_never_transient",
            # A state topic whose max.message.bytes is below a state record: MessageSizeTooLarge.
            "tests/test_failure_policy.py::test_a_state_topic_that_refuses_records_costs_no_copies",
        ),
    ),
    Mutant(
        "parse-job-recursion-escapes",
        "parse_job's catch-all narrowed to ValueError: a RecursionError (any other error) escapes",
        "forwarder/jobs.py",
        "except Exception as exc:  # RecursionError",
        "except ValueError as exc:  # RecursionError",
        (
            "tests/unit/test_jobs.py::test_anything_that_is_no_job_is_an_invalid_job",
            "tests/unit/test_jobs.py::test_a_decoder_that_recurses_too_deep_gives_an_invalid_job",
        ),
    ),
    Mutant(
        "invalid-job-not-committed",
        "the worker does not commit past an invalid job",
        "forwarder/worker.py",
        '            self._metrics.batches.labels(outcome="invalid").inc()\n',
        '            self._metrics.batches.labels(outcome="invalid").inc()\n            return\n',
        ("tests/test_failure_policy.py::test_records_that_are_no_jobs_are_committed_past",),
    ),
    Mutant(
        "state-write-redoes-batch",
        "Outcomes.record (Pipeline.record) raises a failed state write (the whole batch is redone) "
        "instead of retrying the write alone",
        "forwarder/outcome.py",
        "        await retry(\n            lambda: self._record_once(state, txn),",
        "        await self._record_once(state, txn)\n        await retry(\n"
        "            lambda: self._record_once(state, txn),",
        ("tests/test_failure_policy.py::test_a_state_topic_that_refuses_records_costs_no_copies",),
    ),
    Mutant(
        "bom-kept",
        "without_bom does not strip the byte order mark",
        "forwarder/ndjson.py",
        "yield head.removeprefix(BOM)",
        "yield head",
        ("tests/unit/test_ndjson.py::test_a_bom_before_line_one_is_dropped_however_it_is_split",),
    ),
    Mutant(
        "cut-object-complete",
        "is_complete_object takes any last line of a close-delimited body as complete",
        "forwarder/ndjson.py",
        "    if isinstance(line, Oversized):\n        return False\n    try:",
        "    if isinstance(line, Oversized):\n        return False\n    return True\n    try:",
        ("tests/unit/test_ndjson.py::test_a_cut_object_is_never_complete",),
    ),
    Mutant(
        "raw-upstream-codes",
        "upstream_code_label passes raw status codes through as labels",
        "forwarder/observability.py",
        "    if code in UPSTREAM_CODES:\n        return code",
        "    if True:\n        return code",
        ("tests/unit/test_observability.py::test_odd_upstream_statuses_are_counted_by_class",),
    ),
    Mutant(
        "problem-unbounded",
        "bounded_problem records an upstream problem whole, however large",
        "forwarder/state.py",
        "if len(msgspec.json.encode(problem)) <= MAX_PROBLEM_BYTES:",
        "if True:",
        (
            "tests/unit/test_observability.py::test_an_upstream_problem_is_bounded_in_the_state_record",
        ),
    ),
    Mutant(
        "dead-letter-negative-room",
        "fit_dead_letter allows a negative room (a topic too small for the headers)",
        "forwarder/publish.py",
        "    if room < 0:\n        raise KafkaConfigProblem(",
        "    if False:\n        raise KafkaConfigProblem(",
        (
            "tests/unit/test_publish.py::test_a_topic_too_small_for_the_headers_is_a_configuration_problem",
        ),
    ),
)


#: The modules of the failure policy (issue 21) that mutmut mutates; its tests are tests/unit.
MUTMUT_MODULES = (
    "errors.py",
    "health.py",
    "jobs.py",
    "kafka.py",
    "ndjson.py",
    "observability.py",
    "pipeline.py",
    "publish.py",
    "retry.py",
    "state.py",
    "worker.py",
)


def mutmut(tree: Path, env: dict[str, str]) -> int:
    """mutmut over MUTMUT_MODULES against tests/unit (no broker): every mutant it generates, in
    the scratch copy (it writes a ``mutants/`` directory beside the sources).  Prints the
    count per module and status, and the score over the mutants some unit test reaches."""
    others = sorted(
        f"forwarder/{p.name}"
        for p in (tree / "forwarder").glob("*.py")
        if p.name not in MUTMUT_MODULES
    )
    skip = {"forwarder", "tests", "mutants"}
    extra = sorted(p.name for p in tree.iterdir() if p.name not in skip and p.name[0] != ".")
    config = (
        "\n[tool.mutmut]\n"
        'source_paths = ["forwarder/"]\n'
        f"do_not_mutate = {json.dumps(others)}\n"
        'pytest_add_cli_args_test_selection = ["tests/unit/"]\n'
        # tests/conftest.py imports deploy/kafka/rig.py: the whole tree goes along.
        f"also_copy = {json.dumps(extra)}\n"
    )
    with (tree / "pyproject.toml").open("a") as f:
        f.write(config)
    # The console script, not `python -m`: mutmut records coverage in its own module, which
    # `-m` would load twice (as __main__ and as mutmut.__main__).
    cmd = [
        str(REPO / ".venv" / "bin" / "mutmut"),
        "run",
        "--max-children",
        str(os.cpu_count() or 1),
    ]
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
        print(f"mutate: mutmut run exited {done.returncode}", file=sys.stderr)
        return 1
    listed = subprocess.run(
        [str(REPO / ".venv" / "bin" / "mutmut"), "results", "--all", "true"],
        cwd=tree,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    counts: dict[str, dict[str, int]] = {}
    for name, _, status in (line.strip().rpartition(": ") for line in listed.splitlines()):
        if name.startswith("forwarder."):
            module = name.split(".")[1]
            per = counts.setdefault(module, {})
            per[status] = per.get(status, 0) + 1
    statuses = ["killed", "survived", "no tests", "timeout", "suspicious", "skipped"]
    seen = [s for s in statuses if any(s in per for per in counts.values())]
    seen += sorted({s for per in counts.values() for s in per} - set(seen))
    print("| module | " + " | ".join(seen) + " | score |")
    print("|---|" + "---|" * (len(seen) + 1))
    total: dict[str, int] = {}
    for module in sorted(counts):
        per = counts[module]
        for status, n in per.items():
            total[status] = total.get(status, 0) + n
        print(
            f"| `{module}.py` | "
            + " | ".join(str(per.get(s, 0)) for s in seen)
            + f" | {score(per)} |"
        )
    print("| all | " + " | ".join(str(total.get(s, 0)) for s in seen) + f" | {score(total)} |")
    print(
        f"\nmutmut: {sum(total.values())} mutants in {seconds:.0f} s; killed {score(total)} of"
        " those a unit test reaches ('no tests': no unit test runs that code)"
    )
    return 0


def score(per: dict[str, int]) -> str:
    """Killed over killed plus survived (the mutants some test reached), as a percentage."""
    reached = per.get("killed", 0) + per.get("survived", 0)
    return f"{100 * per.get('killed', 0) / reached:.0f}%" if reached else "-"


def copy_tree(dest: Path) -> None:
    """The working tree's tracked and untracked, not ignored, files (uncommitted edits
    included): what a commit of it would test.  ``.cache`` (broker jars, tools) is linked."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / ".cache").symlink_to(REPO / ".cache")


def check_snippets(mutants: tuple[Mutant, ...]) -> list[str]:
    """A mutant whose snippet is gone or ambiguous would test nothing: say so before running."""
    problems = []
    for m in mutants:
        count = (REPO / m.path).read_text().count(m.old)
        if count != 1:
            problems.append(f"{m.name}: the snippet occurs {count} times in {m.path}")
    return problems


def pytest(
    tree: Path, env: dict[str, str], tests: list[str], *, first_failure: bool = True
) -> tuple[int, float, str, str]:
    """Run ``tests`` in ``tree``: exit code (124 on timeout), seconds, the output's last line
    and the whole output."""
    start = time.monotonic()
    try:
        done = subprocess.run(
            [
                *(str(PYTHON), "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider"),
                *(["-x"] if first_failure else []),
                *tests,
            ],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        code, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        # The partial output is bytes, whatever text=True asked for.
        partial = (exc.stdout or b"").decode(errors="replace")
        code, out = 124, f"timed out after {TIMEOUT} s\n{partial}"
    lines = [line for line in out.splitlines() if line.strip()]
    return code, time.monotonic() - start, lines[-1] if lines else "", out


def start_broker(data: Path) -> str:
    port = os.environ.get("TEST_KAFKA_PORT", "19092")
    rig = REPO / "deploy" / "kafka" / "rig.py"
    cmd = [str(PYTHON), str(rig), "start", "--port", port, "--data-dir", str(data)]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def stop_broker(data: Path) -> None:
    rig = REPO / "deploy" / "kafka" / "rig.py"
    subprocess.run([str(PYTHON), str(rig), "stop", "--data-dir", str(data)], check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants; run nothing")
    parser.add_argument(
        "--mutmut",
        action="store_true",
        help="instead of the curated mutants: mutmut over the failure policy's modules against "
        "tests/unit (no broker), a table per module",
    )
    args = parser.parse_args(argv)
    mutants = MUTANTS
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTANTS}
        if unknown:
            parser.error(f"no such mutant: {', '.join(sorted(unknown))}")
        mutants = tuple(m for m in MUTANTS if m.name in args.only)
    if args.list:
        for m in mutants:
            print(f"{m.name}: {m.what}\n    {m.path}; killed by {', '.join(m.tests)}")
        return 0
    if args.mutmut:
        with tempfile.TemporaryDirectory(prefix="forwarder-mutmut-") as scratch:
            copy_tree(Path(scratch))
            env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
            return mutmut(Path(scratch), env)
    if problems := check_snippets(mutants):
        print("mutate: stale mutants:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    if not PYTHON.exists():
        print("mutate: no .venv: run scripts/bootstrap.sh (make install)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="forwarder-mutate-") as scratch:
        tree = Path(scratch) / "tree"
        tree.mkdir()
        copy_tree(tree)
        env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
        env["PYTHONPATH"] = str(tree)
        bin_dirs = [
            REPO / ".venv" / "bin",
            REPO / ".cache" / "uv" / "bin",
            REPO / ".cache" / "tools" / "bin",
        ]
        env["PATH"] = os.pathsep.join([*map(str, bin_dirs), env.get("PATH", "")])
        data = Path(scratch) / "kafka"
        own_broker = not env.get("FORWARDER_KAFKA_BOOTSTRAP_SERVERS")
        if own_broker:
            env["FORWARDER_KAFKA_BOOTSTRAP_SERVERS"] = start_broker(data)
        try:
            return run(tree, env, mutants)
        finally:
            if own_broker:
                stop_broker(data)


def failing(tests: list[str], out: str) -> set[str]:
    """Which of ``tests`` pytest's short summary (``-rfE``) names as failed or in error."""
    named = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    return {t for t in tests if any(n == t or n.startswith((f"{t}[", f"{t} ")) for n in named)}


def run(tree: Path, env: dict[str, str], mutants: tuple[Mutant, ...]) -> int:
    tests = list(dict.fromkeys(t for m in mutants for t in m.tests))
    code, seconds, tail, out = pytest(tree, env, tests, first_failure=False)
    print(f"baseline: {len(tests)} tests, exit {code} in {seconds:.0f} s: {tail}", flush=True)
    broken = failing(tests, out)
    if code != 0 and not broken:
        print(out[-6000:], file=sys.stderr)
        print("mutate: the unmutated run failed, naming no test", file=sys.stderr)
        return 1
    for test in sorted(broken):
        # A test that fails without a mutant kills every mutant: it measures nothing.
        print(f"baseline: {test} fails unmutated: not used", flush=True)
    rows = []
    for m in mutants:
        usable = [t for t in m.tests if t not in broken]
        if not usable:
            rows.append((m, "NOT MEASURED", 0.0))
            print(
                f"{m.name:30}     0 s  NOT MEASURED: every test of it fails unmutated", flush=True
            )
            continue
        target = tree / m.path
        original = target.read_text()
        target.write_text(original.replace(m.old, m.new, 1))
        try:
            code, seconds, tail, out = pytest(tree, env, usable, first_failure=False)
        finally:
            target.write_text(original)
        # pytest exits 1 when a test failed; 124 is our timeout (a hang is a visible failure);
        # anything else (collection error, usage) means the mutant broke the run, not a test.
        verdict = {0: "SURVIVED", 1: "killed", 124: "killed (timeout)"}.get(code, f"error {code}")
        if code == 1:
            # Which tests saw it: a mutant only an integration test kills is a unit-test gap.
            killers = failing(usable, out)
            verdict += f" by {', '.join(sorted(t.split('::')[-1] for t in killers)) or '?'}"
        rows.append((m, verdict, seconds))
        print(f"{m.name:30} {seconds:5.0f} s  {verdict}: {tail}", flush=True)
    print("\n| mutant | module | behaviour changed | tests | result |\n|---|---|---|---|---|")
    for m, verdict, _ in rows:
        names = "<br>".join(
            f"`{t}`" + (" (fails unmutated)" if t in broken else "") for t in m.tests
        )
        print(f"| `{m.name}` | `{m.path}` | {m.what} | {names} | {verdict} |")
    killed = sum(v.startswith("killed") for _, v, _ in rows)
    measured = sum(v != "NOT MEASURED" for _, v, _ in rows)
    print(
        f"\nscore: {killed}/{measured} measured mutants killed"
        f" ({100 * killed / max(measured, 1):.0f}%); {len(rows) - measured} not measured"
    )
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
