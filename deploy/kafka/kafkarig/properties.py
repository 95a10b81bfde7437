"""The broker's ``server.properties``: a fast, reliable single dev node (comments say why)."""

from __future__ import annotations

from pathlib import Path

from kafkarig.net import HOST
from kafkarig.oauth import OAUTH_LISTENER, OAuthListener
from kafkarig.security import Security

NODE_ID = 1


def server_properties(
    port: int,
    controller_port: int,
    log_dirs: Path,
    security: Security | None = None,
    oauth: OAuthListener | None = None,
) -> dict[str, str]:
    """The properties of one KRaft node; with ``security``, plus its secured listeners; with
    ``oauth``, plus its OAUTHBEARER listener."""
    listeners = {"PLAINTEXT": port}
    if security is not None:
        listeners |= {"SASL_SSL": security.sasl_ssl_port, "SSL": security.ssl_port}
    # A listener's name is its protocol, except the OAuth one: SASL_PLAINTEXT under its own name.
    protocol = {OAUTH_LISTENER: "SASL_PLAINTEXT"}
    if oauth is not None:
        listeners |= {OAUTH_LISTENER: oauth.port}
    advertised = ",".join(f"{name}://{HOST}:{p}" for name, p in listeners.items())
    protocols = ",".join(f"{name}:{protocol.get(name, name)}" for name in listeners)
    props = {
        "process.roles": "broker,controller",
        "node.id": str(NODE_ID),
        "controller.quorum.bootstrap.servers": f"{HOST}:{controller_port}",
        "listeners": f"{advertised},CONTROLLER://{HOST}:{controller_port}",
        "advertised.listeners": advertised,
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": f"{protocols},CONTROLLER:PLAINTEXT",
        "log.dirs": str(log_dirs),
        # Topics are created explicitly (as the forwarder does in production); a typo in a
        # topic name must fail, not silently create a new topic.
        "auto.create.topics.enable": "false",
        "num.partitions": "3",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        # One node: internal topics must not ask for 3 replicas, or groups and transactions
        # never work. Fewer partitions than the default 50 make their creation quick.
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "5",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "5",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # Consumer groups in tests should not idle 3 s waiting for more members to join.
        "group.initial.rebalance.delay.ms": "0",
        # Small segments so compaction and retention have something to act on in a test;
        # a small cleaner buffer (default 128 MiB) so it fits in the capped heap.
        "log.segment.bytes": str(16 * 1024 * 1024),
        "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
        # Two cores: a handful of threads is plenty and starts faster.
        "num.network.threads": "2",
        "num.io.threads": "4",
        "num.recovery.threads.per.data.dir": "1",
        "background.threads": "4",
    }
    if security is not None:
        props |= security.properties()
    if oauth is not None:
        props |= oauth.properties()
    return props
