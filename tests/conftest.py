"""Shared fixtures: a real Kafka broker, the fake Datagrid over real HTTP, per-test topics.

The broker is the one named by ``FORWARDER_KAFKA_BOOTSTRAP_SERVERS`` if set (``.ci/run`` and
``make test`` start one with ``deploy/kafka/rig.py``), otherwise a private broker started here.  If
neither works the tests fail: integration tests never skip.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from forwarder.config import SecretStr, Settings
from tests.support.fake_datagrid import FakeDatagrid, start_fake_datagrid
from tests.support.service_helpers import API_TOKEN, WEBHOOK_SECRET, Forwarder

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "deploy" / "kafka"))
import rig  # noqa: E402

API_KEY = "dg_test_key_5f2c"
# Every record the session writes to the broker is checked against docs/asyncapi.yaml at its end.
pytest_plugins = ["tests.asyncapi_records"]


class _UnretrievedTasks(logging.Handler):
    """Records what asyncio logs about tasks whose exception nobody retrieved."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(autouse=True)
def no_task_dies_unobserved() -> Iterator[None]:
    """Every test fails if a task in this process died with an exception nobody retrieved."""
    handler = _UnretrievedTasks()
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    try:
        yield
        gc.collect()  # an unretrieved exception is reported when its task is collected
    finally:
        logger.removeHandler(handler)
    assert not handler.messages, f"unobserved task failures: {handler.messages[:3]}"


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of a running broker (never skipped: a missing broker fails the run)."""
    given = os.environ.get("FORWARDER_KAFKA_BOOTSTRAP_SERVERS")
    if given:
        host, _, port = given.split(",")[0].rpartition(":")
        try:
            rig.probe_metadata(host, int(port))
        except Exception as exc:
            pytest.fail(f"FORWARDER_KAFKA_BOOTSTRAP_SERVERS={given} does not answer: {exc}")
        yield given
        return
    broker = rig.Broker.on_free_ports(tmp_path_factory.mktemp("kafka"))
    try:
        broker.start(wait=90)
    except Exception as exc:
        pytest.fail(f"could not start the local Kafka broker: {exc}")
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def fake_datagrid() -> Iterator[FakeDatagrid]:
    """The fake Datagrid API, a real HTTP server in a subprocess."""
    with start_fake_datagrid(API_KEY) as fake:
        yield fake


def settings_for(kafka_bootstrap: str, fake: FakeDatagrid, **overrides: Any) -> Settings:
    """Settings pointing at the broker and the fake, with topics (and group) of their own."""
    suffix = uuid.uuid4().hex[:10]
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": kafka_bootstrap,
        "datagrid_base_url": fake.base_url,
        "datagrid_api_key": SecretStr(API_KEY),
        "results_topic": f"results-{suffix}",
        "jobs_topic": f"jobs-{suffix}",
        "dead_letter_topic": f"dlq-{suffix}",
        "state_topic": f"state-{suffix}",
        "consumer_group": f"group-{suffix}",
        "kafka_topic_partitions": 3,
        "retry_base_seconds": 0.05,
        "retry_max_seconds": 2.0,
        "datagrid_read_timeout": 5.0,
        "webhook_secrets": [SecretStr(WEBHOOK_SECRET)],
        "api_tokens": [SecretStr(API_TOKEN)],
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def make_settings(kafka_bootstrap: str, fake_datagrid: FakeDatagrid) -> Callable[..., Settings]:
    """Settings for this test (unique topics); keyword arguments override fields."""
    return functools.partial(settings_for, kafka_bootstrap, fake_datagrid)


@pytest.fixture
def batch_id() -> str:
    """A fresh batch id per test."""
    return f"bpred_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def forwarders() -> Iterator[list[Forwarder]]:
    """Every ``forwarder serve`` a test starts (``service_helpers.start``) is stopped at its end
    (and fails the test if it let an exception go unhandled)."""
    started: list[Forwarder] = []
    yield started
    for fwd in started:
        fwd.stop()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[rig.Broker]:
    """A private broker with SASL_SSL and mutual-TLS listeners, ACLs on (one per test module)."""
    broker = rig.Broker.on_free_ports(tmp_path_factory.mktemp("kafka-secured"), secured=True)
    try:
        broker.start(wait=180)
    except Exception as exc:
        pytest.fail(f"could not start the secured Kafka broker: {exc}")
    try:
        yield broker
    finally:
        broker.stop()
