"""``examples/consumer.py`` runs against the real broker and does what docs/consumers.md says."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import rig
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from forwarder.config import Delivery, Settings
from tests.conftest import REPO
from tests.support.fake_datagrid import FakeDatagrid, generate_lines
from tests.support.kafka_helpers import read_topic
from tests.support.service_helpers import forwarder_env, run_forwarder

MakeSettings = Callable[..., Settings]
EXAMPLE = REPO / "examples" / "consumer.py"


def run_example(
    settings: Settings,
    *args: str,
    bootstrap: str | None = None,
    group: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """The example as a user runs it, pointed at this test's topics."""
    return subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            "--bootstrap",
            bootstrap or settings.kafka_bootstrap_servers,
            "--results-topic",
            settings.results_topic,
            "--dead-letter-topic",
            settings.dead_letter_topic,
            "--state-topic",
            settings.state_topic,
            "--group",
            group or f"example-{uuid.uuid4().hex[:8]}",
            "--timeout",
            "60",
            *args,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_example_consumer_dedupes_and_knows_when_batches_are_complete(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, batch_id: str
) -> None:
    """Two batches forwarded exactly-once, one of them twice (a replay): the example reports each
    complete once its state is read, with every line once, the replay's copies ignored, and the
    dead letters by reason; a failed batch is reported as failed (exit 1)."""
    settings = make_settings(delivery=Delivery.EXACTLY_ONCE)
    env = forwarder_env(settings)
    statuses = ["succeeded", "succeeded", "errored", "canceled", "expired"]
    other = f"{batch_id}_b"
    lines = [
        line.decode()
        for line in generate_lines(batch_id, {"count": 10, "line_bytes": 200, "statuses": statuses})
    ]
    fake_datagrid.configure(batch_id, lines=[*lines[:5], "{oops", "[]", *lines[5:]])
    fake_datagrid.configure(other, generate={"count": 300, "statuses": ["succeeded"]})
    for args in ((batch_id, other), (batch_id,)):  # the second forward of batch_id is a replay
        done = run_forwarder(env, "forward", *args)
        assert done.returncode == 0, done.stdout + done.stderr

    ran = run_example(settings, "--until-complete", batch_id, other)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert sorted(ran.stdout.splitlines()) == sorted(
        [
            f"{batch_id}: complete: 10 results (canceled 2, errored 2, expired 2, succeeded 4), "
            "2 dead letters (invalid_json 1, not_an_object 1), 12 duplicates ignored",
            f"{other}: complete: 300 results (succeeded 300), 0 dead letters (), "
            "0 duplicates ignored",
        ]
    )

    gone = f"{batch_id}_gone"
    fake_datagrid.configure(gone, results_gone=True)
    failed = run_forwarder(env, "forward", gone)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    ran = run_example(settings, "--until-complete", gone)
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert any(
        line.startswith(f"{gone}: failed: upstream_rejected: ") for line in ran.stdout.splitlines()
    ), ran.stdout


def line(custom_id: str, n: int) -> str:
    """A succeeded result line whose output tells it apart from any other line."""
    return json.dumps({"custom_id": custom_id, "status": "succeeded", "output": {"n": n}})


#: A batch where two lines share a custom_id (Datagrid does not refuse one): lines 2 and 4.
SHARED_ID_LINES = [line("a", 1), line("dup", 2), line("b", 3), line("dup", 4), line("c", 5)]


def stored(db: Path, batch_id: str) -> list[tuple[int, str, str]]:
    """(line, custom_id, output) of every result the example's sink holds for ``batch_id``."""
    with sqlite3.connect(db) as conn:
        query = "SELECT line, custom_id, output FROM results WHERE batch_id = ? ORDER BY line"
        return list(conn.execute(query, (batch_id,)))


def test_example_stores_both_lines_of_a_batch_that_share_a_custom_id(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, batch_id: str, tmp_path: Path
) -> None:
    """Two lines of one batch with the same custom_id are two results: the sink keeps both,
    each with its own output, and counts no duplicate."""
    settings = make_settings()
    fake_datagrid.configure(batch_id, lines=SHARED_ID_LINES)
    done = run_forwarder(forwarder_env(settings), "forward", batch_id)
    assert done.returncode == 0, done.stdout + done.stderr

    db = tmp_path / "sink.db"
    ran = run_example(settings, "--db", str(db), "--until-complete", batch_id)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.splitlines() == [
        f"{batch_id}: complete: 5 results (succeeded 5), 0 dead letters (), 0 duplicates ignored"
    ]
    assert stored(db, batch_id) == [
        (n, custom_id, json.dumps({"n": n}))
        for n, custom_id in enumerate(["a", "dup", "b", "dup", "c"], start=1)
    ]


def test_example_stores_each_line_of_a_replayed_batch_once(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, batch_id: str, tmp_path: Path
) -> None:
    """A batch forwarded twice at-least-once (a replay, so every line is on the topic twice):
    the sink holds each line exactly once, the repeated custom_id's two lines included, and
    counts every copy as a duplicate."""
    settings = make_settings(delivery=Delivery.AT_LEAST_ONCE)
    fake_datagrid.configure(batch_id, lines=SHARED_ID_LINES)
    for _ in range(2):
        done = run_forwarder(forwarder_env(settings), "forward", batch_id)
        assert done.returncode == 0, done.stdout + done.stderr
    copies = asyncio.run(read_topic(settings.kafka_bootstrap_servers, settings.results_topic))
    assert len(copies) == 10  # the premise: both forwards are on the topic

    db = tmp_path / "sink.db"
    ran = run_example(settings, "--db", str(db), "--until-complete", batch_id)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.splitlines() == [
        f"{batch_id}: complete: 5 results (succeeded 5), 0 dead letters (), 5 duplicates ignored"
    ]
    assert [row[0] for row in stored(db, batch_id)] == [1, 2, 3, 4, 5]


def test_example_takes_a_copy_without_cloudevents_headers_as_the_same_line(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, batch_id: str
) -> None:
    """Records without ce_* headers (as an older forwarder wrote them) are keyed by
    (datagrid-batch-id, datagrid-line): alone they are stored, and beside the same lines with
    the headers (a replay after an upgrade) each line is stored once."""
    settings = make_settings()
    fake_datagrid.configure(batch_id, lines=[*SHARED_ID_LINES, "{oops"])
    done = run_forwarder(forwarder_env(settings), "forward", batch_id)
    assert done.returncode == 0, done.stdout + done.stderr
    bootstrap = settings.kafka_bootstrap_servers
    topics = (settings.results_topic, settings.dead_letter_topic)
    records = [r for t in topics for r in asyncio.run(read_topic(bootstrap, t))]
    assert len(records) == 6 and all("ce_id" in r.headers for r in records)

    async def copy(prefix: str, *, with_ce: bool) -> None:
        # Onto topics of their own (as many partitions as the forwarder's): the suite's record
        # audit holds the forwarder's topics to the current format, which these copies are not.
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            partitions = settings.kafka_topic_partitions
            new = [NewTopic(prefix + t, partitions, 1) for t in topics]
            await admin.create_topics([t for t in new if t.name not in await admin.list_topics()])
        finally:
            await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for r in records:
                headers = [(k, v) for k, v in r.headers.items() if with_ce or k[:3] != "ce_"]
                await producer.send_and_wait(
                    prefix + r.topic, r.value, r.key, partition=r.partition, headers=headers
                )
        finally:
            await producer.stop()

    asyncio.run(copy("legacy.", with_ce=False))  # an older forwarder's records alone
    asyncio.run(copy("mixed.", with_ce=True))  # the same lines forwarded before and after
    asyncio.run(copy("mixed.", with_ce=False))
    want = (
        f"{batch_id}: complete: 5 results (succeeded 5), 1 dead letters (invalid_json 1), "
        "{} duplicates ignored"
    )
    for prefix, duplicates in (("legacy.", 0), ("mixed.", 6)):
        ran = run_example(
            settings,
            "--results-topic",
            prefix + settings.results_topic,
            "--dead-letter-topic",
            prefix + settings.dead_letter_topic,
            "--until-complete",
            batch_id,
        )
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert ran.stdout.splitlines() == [want.format(duplicates)], prefix


def test_example_logs_in_over_sasl_ssl_with_only_read_acls(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, secured: rig.Broker, batch_id: str
) -> None:
    """Over SASL_SSL (SCRAM-SHA-512, the rig's CA, host name checked) as a user that may only
    read the three topics and use its group, the example reads a batch to completion with the
    password from KAFKA_SASL_PASSWORD, never printing it; a wrong password gets nothing."""
    assert secured.security is not None
    user, password = "forwarder", rig.DEFAULT_USERS["forwarder"]
    # The forwarder writes through the PLAINTEXT listener, whose principal is a super user.
    settings = make_settings(kafka_bootstrap_servers=secured.bootstrap)
    fake_datagrid.configure(batch_id, lines=[*SHARED_ID_LINES, "{oops"])
    done = run_forwarder(forwarder_env(settings), "forward", batch_id)
    assert done.returncode == 0, done.stdout + done.stderr
    group = f"example-{uuid.uuid4().hex[:8]}"
    topics = (settings.results_topic, settings.dead_letter_topic, settings.state_topic)
    secured.create_acls(
        [rig.Acl(f"User:{user}", "topic", t, "Read") for t in topics]
        + [rig.Acl(f"User:{user}", "group", group, "Read")]
    )
    login = [
        "--security-protocol",
        "SASL_SSL",
        "--sasl-mechanism",
        "SCRAM-SHA-512",
        "--sasl-username",
        user,
        "--ssl-cafile",
        str(secured.security.tls.ca_cert),
    ]

    def example(secret: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KAFKA_SASL_PASSWORD": secret}
        return run_example(
            settings,
            *login,
            "--until-complete",
            batch_id,
            bootstrap=secured.sasl_ssl_bootstrap,
            group=group,
            env=env,
        )

    ran = example(password)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.splitlines() == [
        f"{batch_id}: complete: 5 results (succeeded 5), 1 dead letters (invalid_json 1), "
        "0 duplicates ignored"
    ]
    assert password not in ran.stdout + ran.stderr
    refused = example("not-the-password")
    assert refused.returncode != 0
    assert "complete" not in refused.stdout
    assert "not-the-password" not in refused.stdout + refused.stderr
