"""The Dockerfile: hadolint-clean, hardened runtime stage, and its install steps really work.

There is no Docker engine in CI, so the image is never built here. Instead the build stage's own
``RUN uv ...`` lines are read from the Dockerfile and run, with its ``ENV``, in a copy of the
build context that ``.dockerignore`` admits: the same lock file, the same flags, the same wheel
build of the project, into a fresh virtual environment; then ``forwarder`` runs from it.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from forwarder.config import setting_fields
from tests.deploy_helpers import REPO, run, tool

DOCKERFILE = REPO / "Dockerfile"


@dataclass
class Stage:
    """One ``FROM`` ... stage: its base image, name and instructions (keyword, argument text)."""

    image: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        pairs = [shlex.split(arg) for arg in self.all("ENV")]
        return dict(item.split("=", 1) for line in pairs for item in line)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages (line continuations joined, comments dropped)."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, arg = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            image, _, name = re.sub(r"\s+AS\s+", " AS ", arg, flags=re.I).partition(" AS ")
            image = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m[1]], image.strip())
            stages.append(Stage(image, name.strip()))
        elif not stages and keyword == "ARG":
            key, _, default = arg.partition("=")
            global_args[key] = default
        elif stages:
            stages[-1].instructions.append((keyword, arg))
    return global_args, stages


ARGS, STAGES = parse_dockerfile(DOCKERFILE.read_text())
BUILD = next(s for s in STAGES if s.name == "build")
RUNTIME = STAGES[-1]


def test_hadolint_passes() -> None:
    """`hadolint Dockerfile` reports nothing (its default threshold fails on any finding)."""
    run([tool("hadolint"), DOCKERFILE])


def test_base_images_are_pinned_and_shared() -> None:
    """Every base image has an exact version tag; build and runtime use the same Python image."""
    for stage in STAGES:
        repo, _, tag = stage.image.rpartition(":")
        assert repo and re.match(r"^\d+\.\d+\.\d+", tag), f"unpinned base image {stage.image}"
    assert BUILD.image == RUNTIME.image, "the venv's python symlink needs the same interpreter"
    assert RUNTIME.name == "runtime" and STAGES[-1] is RUNTIME, (
        "`docker build` must default to runtime"
    )


def test_runtime_stage_is_minimal_and_non_root() -> None:
    """The runtime stage copies only the venv, runs as a numeric non-root user, no bytecode."""
    copies = RUNTIME.all("COPY")
    assert len(copies) == 1 and copies[0].startswith("--from=build ")
    venv = BUILD.env()["UV_PROJECT_ENVIRONMENT"]
    assert copies[0].split()[-2:] == [venv, venv]
    (user,) = RUNTIME.all("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0
    env = RUNTIME.env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    # The only writable place with a read-only root filesystem is the /tmp emptyDir.
    assert env["HOME"] == env["TMPDIR"] == "/tmp"
    assert env["PATH"].startswith(f"{venv}/bin:")


def test_entrypoint_is_exec_form_forwarder_serve() -> None:
    """ENTRYPOINT ["forwarder"], CMD ["serve"], exec form: the app itself receives SIGTERM."""
    assert [json.loads(e) for e in RUNTIME.all("ENTRYPOINT")] == [["forwarder"]]
    assert [json.loads(c) for c in RUNTIME.all("CMD")] == [["serve"]]
    assert RUNTIME.all("EXPOSE") == [str(setting_fields()["http_port"].default)]
    (healthcheck,) = RUNTIME.all("HEALTHCHECK")
    assert "/healthz" in healthcheck and "FORWARDER_HTTP_PORT" in healthcheck


def test_oci_labels() -> None:
    """The runtime image carries the OCI title, version, revision, created, license, base."""
    labels = dict(item.split("=", 1) for arg in RUNTIME.all("LABEL") for item in shlex.split(arg))
    prefix = "org.opencontainers.image."
    for key in ("title", "description", "version", "revision", "created", "licenses", "base.name"):
        assert labels.get(prefix + key), key
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert f"ARG VERSION={project['version']}" in DOCKERFILE.read_text()
    assert labels[prefix + "licenses"] == project["license"]["text"]


def dockerignore_admits() -> list[str]:
    """The allow-list of .dockerignore (`*` then `!path` lines)."""
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    assert lines[0] == "*", ".dockerignore must start by excluding everything"
    return [ln[1:] for ln in lines if ln.startswith("!")]


def test_dockerignore_admits_exactly_the_build_inputs() -> None:
    """.dockerignore admits what the build stage copies or mounts, and nothing else."""
    used: set[str] = set()
    for arg in BUILD.all("COPY"):
        if not arg.startswith("--from"):
            used.update(shlex.split(arg)[:-1])
    for arg in BUILD.all("RUN"):
        used.update(re.findall(r"--mount=type=bind,source=([^,\s]+)", arg))
    assert set(dockerignore_admits()) == used


def test_build_stage_installs_from_the_lock_and_the_venv_runs(tmp_path: Path) -> None:
    """The build stage's own `uv` steps, run on the admitted context, give a working `forwarder`."""
    uv = tool("uv")
    context = tmp_path / "context"
    context.mkdir()
    for name in dockerignore_admits():
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, context / name)
    venv = tmp_path / "venv"
    env = BUILD.env()
    # Same flags; only the interpreter and the target move from image paths to this machine.
    env |= {"UV_PYTHON": sys.executable, "UV_PROJECT_ENVIRONMENT": str(venv), "UV_NO_PROGRESS": "1"}
    steps = [re.sub(r"--mount=\S+\s*", "", arg).strip() for arg in BUILD.all("RUN")]
    uv_steps = [step for step in steps if step.startswith("uv ")]
    assert uv_steps and all("--locked" in s for s in uv_steps), (
        "install from uv.lock, failing if it is stale"
    )
    assert any("--no-dev" in s and "--no-editable" in s for s in uv_steps)
    for step in uv_steps:
        run([uv, *shlex.split(step)[1:]], cwd=context, env=env, timeout=120)

    runtime_env = {
        **RUNTIME.env(),
        "PATH": f"{venv}/bin:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
    }
    workdir = tmp_path / "workdir"  # empty, like the image's: no .env to read
    workdir.mkdir()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    out = run([venv / "bin" / "forwarder", "--version"], cwd=workdir, env=runtime_env).stdout
    assert out.strip() == f"forwarder {version}"
    help_text = run([venv / "bin" / "forwarder", "--help"], cwd=workdir, env=runtime_env).stdout
    assert "serve" in help_text and "FORWARDER_DRAIN_TIMEOUT_SECONDS" in help_text

    # The project is installed as a wheel inside the venv (the runtime stage has no source tree),
    # compiled ahead of time (its filesystem is read-only), with no dev dependencies.
    site = next((venv / "lib").glob("python3.*/site-packages"))
    (dist,) = site.glob("datagrid_forwarder-*.dist-info")
    direct_url = json.loads((dist / "direct_url.json").read_text())
    assert not direct_url.get("dir_info", {}).get("editable")
    assert (site / "forwarder" / "cli.py").is_file()
    assert list((site / "forwarder" / "__pycache__").glob("cli.*.pyc"))
    for dev_only in ("pytest", "mypy", "ruff", "hypothesis"):
        assert not (site / dev_only).exists(), f"{dev_only} (dev group) is in the runtime venv"
