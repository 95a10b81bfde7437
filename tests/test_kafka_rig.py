"""Tests of the Kafka rig (deploy/kafka/rig.py) and of aiokafka against the broker it runs.

The integration tests start a private broker on free ports in a temporary data dir (so they never
touch a broker a developer runs on 9092) and check every Kafka feature the forwarder relies on:
admin topic creation (one topic compacted), the idempotent producer with acks=all,
``partitions_for``, transactions with ``send_offsets_to_transaction``, consumer groups with manual
commits, ``read_committed``, and that records survive a broker crash and restart. They are what
pins the Kafka version in deploy/kafka/pom.xml: if a Kafka upgrade drops a protocol version
aiokafka needs, they fail here first.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import ssl
import struct
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

RIG_PATH = Path(__file__).resolve().parents[1] / "deploy" / "kafka" / "rig.py"
_spec = importlib.util.spec_from_file_location("kafka_rig", RIG_PATH)
assert _spec is not None and _spec.loader is not None
rig = importlib.util.module_from_spec(_spec)
sys.modules["kafka_rig"] = rig
_spec.loader.exec_module(rig)


# --- without a JVM -----------------------------------------------------------------------------


def test_properties_are_a_single_local_node(tmp_path: Path) -> None:
    """The broker config is one KRaft node on loopback, fit for groups and transactions."""
    broker = rig.Broker(port=19092, data_dir=tmp_path)
    props = broker.properties()
    assert broker.bootstrap == "127.0.0.1:19092"
    assert broker.controller_port == 19093
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["auto.create.topics.enable"] == "false"
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["transaction.state.log.min.isr"] == "1"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["log.dirs"] == str(tmp_path / "kraft")


def test_data_dir_remembers_its_ports(tmp_path: Path) -> None:
    """A data dir formatted for some ports refuses to start on others."""
    rig.Broker(port=19092, data_dir=tmp_path)._write_config()
    with pytest.raises(rig.BrokerError, match="formatted for ports"):
        rig.Broker(port=19094, data_dir=tmp_path)._write_config()


def test_probe_metadata_parses_a_metadata_v4_response() -> None:
    """The readiness probe speaks the Kafka protocol; check it against a canned answer."""

    def string(s: str | None) -> bytes:
        return struct.pack(">h", -1) if s is None else struct.pack(">h", len(s)) + s.encode()

    body = (
        struct.pack(">i", 1)  # correlation id
        + struct.pack(">i", 0)  # throttle_time_ms
        + struct.pack(">i", 1)
        + struct.pack(">i", 1)
        + string("127.0.0.1")
        + struct.pack(">i", 9092)
        + string(None)  # one broker, no rack
        + string("cluster-abc")
        + struct.pack(">i", 1)
        + struct.pack(">i", 0)
    )
    server = socket.create_server(("127.0.0.1", 0))
    seen: list[tuple[int, int]] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            size = struct.unpack(">i", conn.recv(4))[0]
            request = conn.recv(size)
            seen.append(struct.unpack_from(">hh", request))  # api key, api version
            conn.sendall(struct.pack(">i", len(body)) + body)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert rig.probe_metadata("127.0.0.1", server.getsockname()[1]) == ("cluster-abc", [1])
    finally:
        thread.join(5)
        server.close()
    assert seen == [(3, 4)]


def test_secured_properties_add_tls_and_scram_listeners_with_acls_on(tmp_path: Path) -> None:
    """--secure adds SASL_SSL (SCRAM-SHA-512) and mutual-TLS listeners, ACLs on, PLAINTEXT kept."""
    tls = rig.TlsFiles(tmp_path / "tls")  # properties only name the files
    security = rig.Security(19094, 19095, tls, {"admin": "a", "forwarder": "f"})
    broker = rig.Broker(port=19092, data_dir=tmp_path, security=security)
    props = broker.properties()
    assert props["listeners"] == (
        "PLAINTEXT://127.0.0.1:19092,SASL_SSL://127.0.0.1:19094,SSL://127.0.0.1:19095,"
        "CONTROLLER://127.0.0.1:19093"
    )
    assert props["listener.security.protocol.map"] == (
        "PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL,CONTROLLER:PLAINTEXT"
    )
    assert props["inter.broker.listener.name"] == "PLAINTEXT"
    assert props["listener.name.ssl.ssl.client.auth"] == "required"
    assert "ssl.client.auth" not in props  # SCRAM clients need no certificate
    assert props["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert props["authorizer.class.name"].endswith("StandardAuthorizer")
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["super.users"] == "User:ANONYMOUS;User:admin"
    assert props["ssl.keystore.location"] == str(tls.broker_keystore)
    assert security.format_args() == [
        "--add-scram=SCRAM-SHA-512=[name=admin,password=a]",
        "--add-scram=SCRAM-SHA-512=[name=forwarder,password=f]",
    ]
    assert broker.sasl_ssl_bootstrap == "127.0.0.1:19094"
    assert broker.ssl_bootstrap == "127.0.0.1:19095"
    broker._write_config()
    assert json.loads((tmp_path / "rig.json").read_text()) == {
        "port": 19092,
        "controller_port": 19093,
        "sasl_ssl_port": 19094,
        "ssl_port": 19095,
    }
    with pytest.raises(rig.BrokerError, match="formatted for ports"):
        rig.Broker(port=19092, data_dir=tmp_path)._write_config()  # the same dir, unsecured
    with pytest.raises(rig.BrokerError, match="not started with secured listeners"):
        _ = rig.Broker(port=19092, data_dir=tmp_path).ssl_bootstrap


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, host: str) -> None:
    """One TLS handshake over loopback; raises the client's or the server's error."""
    listener = socket.create_server(("127.0.0.1", 0))
    errors: list[BaseException] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with (
            socket.create_connection(listener.getsockname(), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            tls.sendall(b"x")
    finally:
        thread.join(10)
        listener.close()
    if errors:
        raise errors[0]


def test_certificates_pass_hostname_checks_and_mutual_tls(tmp_path: Path) -> None:
    """The test PKI (openssl): the broker cert names 127.0.0.1 and localhost, client certs are
    accepted by a server that requires them, and another CA's client is refused."""
    files = rig.make_pki(tmp_path / "tls", ("forwarder",))
    keystore = files.broker_keystore.read_text()
    assert keystore.startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8, as Kafka's PEM store
    assert keystore.count("BEGIN CERTIFICATE") == 2  # the broker's cert, then the CA's

    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=files.ca_cert)
    server.load_cert_chain(files.broker_keystore)
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.create_default_context(cafile=files.ca_cert)  # check_hostname is on
    client.load_cert_chain(files.client_cert("forwarder"), files.client_key("forwarder"))
    for host in ("127.0.0.1", "localhost"):
        _handshake(server, client, host)
    with pytest.raises(ssl.SSLCertVerificationError, match=r"Hostname mismatch|IP address"):
        _handshake(server, client, "kafka.example.com")

    other = rig.make_pki(tmp_path / "other", ("forwarder",))
    stranger = ssl.create_default_context(cafile=other.ca_cert)
    with pytest.raises(ssl.SSLCertVerificationError):  # the broker's CA is not trusted
        _handshake(server, stranger, "127.0.0.1")
    impostor = ssl.create_default_context(cafile=files.ca_cert)
    impostor.load_cert_chain(other.client_cert("forwarder"), other.client_key("forwarder"))
    with pytest.raises((ssl.SSLError, OSError)):  # a client cert from another CA
        _handshake(server, impostor, "127.0.0.1")


def test_create_acls_speaks_create_acls_v1() -> None:
    """ACLs go out as one CreateAcls v1 request; a per-ACL error code is raised with the ACL."""
    acls = [
        rig.Acl("User:forwarder", "topic", "t1", "Write"),
        rig.Acl("User:forwarder", "transactional-id", "g-", "Write", "prefixed"),
    ]

    def string(s: str | None) -> bytes:
        return struct.pack(">h", -1) if s is None else struct.pack(">h", len(s)) + s.encode()

    answer = (
        struct.pack(">iii", 1, 0, 2)  # correlation id, throttle_time_ms, 2 results
        + struct.pack(">h", 0)
        + string(None)
        + struct.pack(">h", 87)
        + string("Invalid ACL")
    )
    server = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            size = struct.unpack(">i", conn.recv(4))[0]
            seen.append(conn.recv(size))
            conn.sendall(struct.pack(">i", len(answer)) + answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(rig.AclError, match=r"transactional-id.*error 87 Invalid ACL"):
            rig.create_acls("127.0.0.1", server.getsockname()[1], acls)
    finally:
        thread.join(5)
        server.close()
    [request] = seen
    assert struct.unpack_from(">hh", request) == (30, 1)  # CreateAcls v1
    body = request[8 + 2 + len("kafka-rig") :]
    assert body.startswith(struct.pack(">i", 2) + struct.pack(">b", 2) + string("t1"))
    assert string("User:forwarder") + string("*") + struct.pack(">bb", 4, 3) in body


# --- against a real broker ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[rig.Broker]:
    b = rig.Broker.on_free_ports(tmp_path_factory.mktemp("kafka"))
    try:
        b.start(wait=90)
        yield b
    finally:
        b.stop()


async def _exercise_aiokafka(bootstrap: str) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic("rig.jobs", num_partitions=1, replication_factor=1),
                NewTopic("rig.results", num_partitions=3, replication_factor=1),
                NewTopic(
                    "rig.state",
                    num_partitions=3,
                    replication_factor=1,
                    topic_configs={"cleanup.policy": "compact"},
                ),
            ]
        )
        assert {"rig.jobs", "rig.results", "rig.state"} <= set(await admin.list_topics())
        [described] = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, "rig.state", {"cleanup.policy": None})]
        )
        configs = {c[0]: c[1] for c in described.resources[0][4]}
        assert configs["cleanup.policy"] == "compact"
    finally:
        await admin.close()

    # At-least-once mode: idempotent producer, acks=all.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        assert await producer.partitions_for("rig.results") == {0, 1, 2}
        meta = await producer.send_and_wait(
            "rig.jobs",
            b'{"batch_id":"b1"}',
            key=b"b1",
            headers=[("content-type", b"application/json")],
        )
        assert (meta.partition, meta.offset) == (0, 0)
    finally:
        await producer.stop()

    # Exactly-once mode: consume a job in a group, write its results and the job's offset in one
    # transaction; a second, aborted transaction must stay invisible to read_committed.
    group = "rig-workers"
    consumer = AIOKafkaConsumer(
        "rig.jobs",
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    txn = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id="rig-worker-1")
    await consumer.start()
    await txn.start()
    try:
        job = await asyncio.wait_for(consumer.getone(), 30)
        async with txn.transaction():
            for i in range(10):
                value = f'{{"custom_id":"c{i}"}}'.encode()
                await txn.send("rig.results", value, key=f"c{i}".encode())
            await txn.send("rig.state", b'{"status":"forwarded"}', key=b"b1")
            tp = TopicPartition(job.topic, job.partition)
            await txn.send_offsets_to_transaction({tp: job.offset + 1}, group)
        await txn.begin_transaction()
        await txn.send("rig.results", b'{"custom_id":"aborted"}', key=b"aborted")
        await txn.abort_transaction()
        assert await consumer.committed(tp) == 1
    finally:
        await txn.stop()
        await consumer.stop()

    # A plain consumer group with manual commit sees exactly the committed results.
    reader = AIOKafkaConsumer(
        "rig.results",
        bootstrap_servers=bootstrap,
        group_id="rig-readers",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await reader.start()
    try:
        keys: list[bytes] = []
        while len(keys) < 10:
            batches = await asyncio.wait_for(reader.getmany(timeout_ms=1000), 30)
            keys += [r.key for records in batches.values() for r in records]
        more = await reader.getmany(timeout_ms=1000)
        keys += [r.key for records in more.values() for r in records]
        assert sorted(keys) == sorted(f"c{i}".encode() for i in range(10))
        await reader.commit()
        committed = [await reader.committed(TopicPartition("rig.results", p)) for p in range(3)]
        assert sum(c or 0 for c in committed) > 10  # 10 records plus transaction markers
    finally:
        await reader.stop()


async def _count(bootstrap: str, topic: str) -> int:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        n, idle = 0, 0
        while idle < 2:
            batches = await consumer.getmany(timeout_ms=1000)
            got = sum(len(r) for r in batches.values())
            n, idle = n + got, (0 if got else idle + 1)
        return n
    finally:
        await consumer.stop()


def test_aiokafka_features_the_forwarder_uses(broker: rig.Broker) -> None:
    """aiokafka's admin, idempotent, transactional and group APIs all work on this Kafka."""
    asyncio.run(_exercise_aiokafka(broker.bootstrap))


def test_data_survives_crash_and_restart(broker: rig.Broker) -> None:
    """Records written with acks=all are still there after SIGKILL and after a clean stop."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    async def produce() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic("rig.persist", 3, 1)])
        finally:
            await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        await producer.start()
        try:
            for i in range(20):
                await producer.send_and_wait("rig.persist", b"{}", key=f"k{i}".encode())
        finally:
            await producer.stop()

    asyncio.run(produce())
    assert asyncio.run(_count(broker.bootstrap, "rig.persist")) == 20
    broker.kill()  # SIGKILL: no controlled shutdown, log recovery on the next start
    assert not broker.is_running() and not broker.is_ready()
    broker.start(wait=90)
    assert asyncio.run(_count(broker.bootstrap, "rig.persist")) == 20
    broker.stop()  # graceful
    assert not broker.is_running()
    broker.start(wait=90)
    assert asyncio.run(_count(broker.bootstrap, "rig.persist")) == 20
