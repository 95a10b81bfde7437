"""The documentation stays true: every setting is in the README, and nothing links outside."""

from __future__ import annotations

import re
from pathlib import Path

from forwarder.cli import build_parser
from forwarder.environment import describe_variables

REPO = Path(__file__).resolve().parent.parent


def test_readme_configuration_table_lists_every_setting_with_its_default() -> None:
    """The README's table has one row per setting, with the default the code uses."""
    readme = (REPO / "README.md").read_text()
    table = readme.partition("\n## Configuration\n")[2].partition("\n## ")[0]
    rows = dict(re.findall(r"^\| `([^`]+)` \| (?:`([^`]*)`)? \|", table, re.M))
    assert rows == {variable: default for variable, default, _ in describe_variables()}


def test_help_lists_every_variable() -> None:
    """`forwarder --help` names every variable."""
    help_text = build_parser().format_help()
    for variable, _, _ in describe_variables():
        assert variable in help_text


def test_nothing_links_outside_the_repository() -> None:
    """The README, docs, chart and deploy files never point at files outside the repository."""
    paths = [REPO / "README.md", *(REPO / "docs").rglob("*"), *(REPO / "helm").rglob("*")]
    paths += [*(REPO / "deploy").rglob("*.md"), *(REPO / "deploy").rglob("*.yaml")]
    for path in paths:
        if path.is_file():
            assert "../shared" not in path.read_text(errors="replace"), path
