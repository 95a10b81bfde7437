"""`make release-artifacts` (scripts/release-artifacts.sh): a release's files, built here.

The script runs once for the module, into a temporary directory. Its image step is
deploy/k8s/image.sh's build: when scripts/test.sh has already built the image for the real-cluster
test (the whole suite), podman's cache makes it a re-use, not a second build. Needs what the
script installs itself (podman from deploy/k8s/packages.sh, helm from deploy/tools/install.sh):
nothing is skipped.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import tarfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy_helpers import REPO, run, tool

SCRIPT = REPO / "scripts" / "release-artifacts.sh"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
IMAGE = yaml.safe_load((REPO / "helm/forwarder/values.yaml").read_text())["image"]["repository"]
CHART_FILE = f"forwarder-{VERSION}.tgz"
IMAGE_FILE = f"datagrid-forwarder-{VERSION}.oci.tar"


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory scripts/release-artifacts.sh filled (it prints it last)."""
    out = tmp_path_factory.mktemp("dist")
    done = run(["bash", SCRIPT, out], timeout=1800)
    assert done.stdout.strip().splitlines()[-1] == str(out)
    return out


def _git(*args: str) -> str:
    return run(["git", *args]).stdout.strip()


def test_the_artifacts_are_exactly_the_chart_the_image_and_their_checksums(dist: Path) -> None:
    """The script writes the chart package, the OCI archive and SHA256SUMS, and nothing else."""
    assert sorted(p.name for p in dist.iterdir()) == sorted([CHART_FILE, IMAGE_FILE, "SHA256SUMS"])


def test_checksums_verify_and_catch_a_changed_byte(dist: Path, tmp_path: Path) -> None:
    """`sha256sum -c SHA256SUMS` passes on both files, and fails once one byte of one changes."""
    sums = (dist / "SHA256SUMS").read_text().splitlines()
    assert sorted(line.split()[1] for line in sums) == sorted([CHART_FILE, IMAGE_FILE])
    checked = run(["sha256sum", "-c", "SHA256SUMS"], cwd=dist).stdout
    assert checked.count(": OK") == 2
    for name in (CHART_FILE, "SHA256SUMS"):
        (tmp_path / name).write_bytes((dist / name).read_bytes())
    chart = bytearray((tmp_path / CHART_FILE).read_bytes())
    chart[-1] ^= 1
    (tmp_path / CHART_FILE).write_bytes(bytes(chart))
    tampered = subprocess.run(
        ["sha256sum", "-c", "--ignore-missing", "SHA256SUMS"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert tampered.returncode != 0 and f"{CHART_FILE}: FAILED" in tampered.stdout


def test_chart_package_is_the_chart_and_templates(dist: Path, tmp_path: Path) -> None:
    """The packaged chart carries this version, passes helm lint, and renders a Deployment of
    this version's image (what `helm install ... dist/forwarder-<version>.tgz` would create)."""
    helm = tool("helm")
    env = {f"HELM_{kind}_HOME": str(tmp_path / kind) for kind in ("CACHE", "CONFIG", "DATA")}
    chart = yaml.safe_load(run([helm, "show", "chart", dist / CHART_FILE], env=env).stdout)
    assert (chart["name"], chart["version"], chart["appVersion"]) == ("forwarder", VERSION, VERSION)
    run([helm, "lint", "--strict", dist / CHART_FILE], env=env)
    values = REPO / "helm/forwarder/ci/default-values.yaml"
    rendered = run(
        [helm, "template", "forwarder", dist / CHART_FILE, "-n", "datagrid", "-f", values], env=env
    ).stdout
    [deployment] = [o for o in yaml.safe_load_all(rendered) if o and o["kind"] == "Deployment"]
    images = {c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert images == {f"{IMAGE}:{VERSION}"}


def test_chart_package_is_reproducible(dist: Path) -> None:
    """Every file in the chart package is dated the commit's time and gzip stores no timestamp,
    so the same commit packs to the same bytes."""
    data = (dist / CHART_FILE).read_bytes()
    assert data[4:8] == b"\0\0\0\0", "gzip header carries a modification time"
    commit_time = int(_git("log", "-1", "--format=%ct"))
    with tarfile.open(dist / CHART_FILE) as tar:
        members = tar.getmembers()
    assert len(members) > 10
    assert {m.mtime for m in members} == {commit_time}
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert {(m.uid, m.gid) for m in members} == {(0, 0)}
    gzip.decompress(data)  # the stream is complete


def _blob(archive: tarfile.TarFile, digest: str) -> bytes:
    """A content-addressed blob of the OCI layout, checked against its digest."""
    algorithm, _, hexdigest = digest.partition(":")
    assert algorithm == "sha256", digest
    member = archive.extractfile(f"blobs/sha256/{hexdigest}")
    assert member is not None, digest
    data = member.read()
    assert hashlib.sha256(data).hexdigest() == hexdigest, f"blob {digest} is corrupt"
    return data


def test_image_archive_is_this_version_of_the_image(dist: Path) -> None:
    """The OCI archive names <image.repository>:<version>; its config's labels carry the version
    and this commit, its user and entrypoint are the Dockerfile's; every layer it lists is in it."""
    with tarfile.open(dist / IMAGE_FILE) as archive:
        layout = json.load(archive.extractfile("oci-layout"))  # type: ignore[arg-type]
        assert layout["imageLayoutVersion"] == "1.0.0"
        index = json.load(archive.extractfile("index.json"))  # type: ignore[arg-type]
        [descriptor] = index["manifests"]
        assert (
            descriptor["annotations"]["org.opencontainers.image.ref.name"] == f"{IMAGE}:{VERSION}"
        )
        manifest: dict[str, Any] = json.loads(_blob(archive, descriptor["digest"]))
        config: dict[str, Any] = json.loads(_blob(archive, manifest["config"]["digest"]))
        for layer in manifest["layers"]:
            assert len(_blob(archive, layer["digest"])) == layer["size"]
    labels = config["config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.revision"] == _git("rev-parse", "HEAD")
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert config["config"]["User"] == "10001:10001"
    assert config["config"]["Entrypoint"] == ["forwarder"]
