"""The code base stays linted, formatted and strictly typed (what pre-commit runs), and every
GitHub workflow is one GitHub would run as meant (actionlint, pinned actions, the README's command).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from tests.deploy_helpers import run as run_tool
from tests.deploy_helpers import tool

PATHS = ["forwarder", "tests", "bench", "deploy", "examples"]
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.y*ml"))
CI_WORKFLOW = REPO / ".github" / "workflows" / "ci.yaml"


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


# --- GitHub workflows (actionlint over all of them: tests/test_helm.py) --------------------------


def actionlint_stdin(name: str, text: str) -> str:
    """actionlint (beside helm, from deploy/tools/install.sh) with the dev group's shellcheck on
    one workflow's text; an AssertionError carries its findings."""
    binary = Path(tool("helm")).parent / "actionlint"
    assert binary.exists(), f"{binary} missing: run deploy/tools/install.sh"
    args = [binary, "-no-color", "-oneline", "-shellcheck", tool("shellcheck")]
    return run_tool([*args, "-stdin-filename", name, "-"], input=text).stdout


def _workflow(path: Path) -> dict[Any, Any]:
    return yaml.safe_load(path.read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_workflow_pins_its_actions_to_commits(path: Path) -> None:
    """Every action of every workflow is pinned to a full commit SHA, its tag in a comment."""
    uses = re.findall(r"uses: (\S+)(.*)$", path.read_text(), re.M)
    assert uses, "no action found: the scan is broken"
    for action, comment in uses:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", action), action
        assert re.fullmatch(r"\s+# v\d+\.\d+\.\d+", comment), action


def test_workflows_include_pull_request_ci() -> None:
    """Besides the release workflow there is one a contributor's pull request runs."""
    assert {p.name for p in WORKFLOWS} >= {"ci.yaml", "release.yaml"}
    assert "pull_request" in _workflow(CI_WORKFLOW)[True]  # YAML 1.1 reads "on" as True


def test_ci_runs_the_readme_test_command_through_ci_run() -> None:
    """The pull-request job's last step is .ci/run, which ends in the README's `make test`."""
    steps = _workflow(CI_WORKFLOW)["jobs"]["test"]["steps"]
    assert steps[-1]["run"].strip() == ".ci/run"
    ci_run = (REPO / ".ci" / "run").read_text().strip().splitlines()
    assert ci_run[-1] == "make test"
    readme = (REPO / "README.md").read_text()
    assert re.search(r"^make test +# .*\(what CI runs\)$", readme, re.M)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("group: ci-${{ github.ref }}", "group: ci-${{ github.reff }}", "property"),
        ("runs-on: ubuntu-24.04", "runs-on: ubuntu-24.4", "label"),
        ("contents: read", "contents: reed", "permission"),
    ],
)
def test_actionlint_catches_a_broken_ci_workflow(old: str, new: str, message: str) -> None:
    """A wrong context property, an unknown runner label or a bad permission fails the check."""
    text = CI_WORKFLOW.read_text()
    assert old in text
    actionlint_stdin("ci.yaml", text)  # the file as committed passes
    with pytest.raises(AssertionError, match=message):
        actionlint_stdin("ci.yaml", text.replace(old, new, 1))
