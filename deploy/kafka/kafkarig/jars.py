"""Downloading the broker jars from Maven Central with the pom.xml beside rig.py."""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import time
from pathlib import Path

from kafkarig.layout import POM, jars_dir, kafka_version, log


def _marker_text() -> str:
    # The pom's hash is in the marker so that any edit of pom.xml (a version bump, a new
    # dependency) makes the next fetch download again instead of trusting a stale jars dir.
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()
    return f"kafka_version={kafka_version()}\npom_sha256={digest}\n"


def fetch(force: bool = False) -> Path:
    """Download the broker jars with Maven into ``jars_dir()``, unless already complete.

    Maven copies into a temporary directory that is renamed into place only on success, and the
    marker is written last, so an interrupted fetch never looks complete. A file lock makes
    concurrent callers (parallel test workers, CI steps) wait for one download instead of racing.
    """
    target = jars_dir()
    marker = target / ".complete"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and marker.is_file() and marker.read_text() == _marker_text():
            return target
        mvn = shutil.which("mvn")
        if mvn is None:
            raise RuntimeError("Maven (mvn) is not on PATH; it is needed to fetch the Kafka jars")
        tmp = target.parent / "jars.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"fetching Kafka {kafka_version()} jars with Maven into {target}")
        started = time.monotonic()
        cmd = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(POM),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={tmp}",
        ]
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                f"{proc.stdout[-4000:]}{proc.stderr[-4000:]}"
            )
        # Never leave two versions of a jar side by side: the classpath is a plain '*'.
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        marker.write_text(_marker_text())
        log(f"fetched {len(list(target.glob('*.jar')))} jars in {time.monotonic() - started:.1f}s")
        return target
