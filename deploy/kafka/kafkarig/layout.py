"""Where the rig keeps its files, which Kafka version it runs, and how it talks to the user."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # deploy/kafka
REPO = HERE.parent.parent
POM = HERE / "pom.xml"
LOG4J_CONFIG = HERE / "log4j2.yaml"


def cache_dir() -> Path:
    """Where the rig keeps jars and data: ``$KAFKA_RIG_CACHE``, else ``<repo>/.cache/kafka``."""
    return Path(os.environ.get("KAFKA_RIG_CACHE") or REPO / ".cache" / "kafka").resolve()


def jars_dir() -> Path:
    """The directory of the broker's jars (the JVM's classpath is ``<jars_dir>/*``)."""
    return cache_dir() / "jars"


def kafka_version() -> str:
    """The Kafka version pinned in pom.xml (the single place it is written down)."""
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text())
    if not match:
        raise RuntimeError(f"no <kafka.version> in {POM}")
    return match.group(1).strip()


def log(msg: str) -> None:
    """Progress and errors go to stderr: stdout carries only what a caller captures."""
    print(f"kafka-rig: {msg}", file=sys.stderr, flush=True)
