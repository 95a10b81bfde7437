#!/usr/bin/env python3
"""A real, single-node Apache Kafka broker for development and tests, without Docker.

The broker jars come from Maven Central (the pom.xml beside this file), so all this needs is
Java 17+ and Maven (and openssl for the secured listeners). The node runs in KRaft combined mode
(broker + controller, node.id=1) and listens on 127.0.0.1 only.

CLI (stdout carries only the bootstrap address, so ``BOOT=$(python deploy/kafka/rig.py start)``
works; progress and errors go to stderr)::

    python deploy/kafka/rig.py fetch
    python deploy/kafka/rig.py start [--port 9092] [--controller-port N] [--data-dir DIR]
                                     [--wait 60] [--secure [--scram-user NAME=PASSWORD ...]]
    python deploy/kafka/rig.py status [--port 9092] [--data-dir DIR]
    python deploy/kafka/rig.py stop [--port 9092] [--data-dir DIR]

Python API (for tests that need a private broker to stop, kill or freeze mid-test)::

    broker = Broker.on_free_ports(tmp_path / "kafka")   # or Broker(port, data_dir, controller_port)
    broker.start()                     # fetches jars if needed, formats once, waits until ready
    broker.bootstrap                   # "127.0.0.1:<port>"
    broker.kill(); broker.start()      # crash and restart on the same data: records persist
    broker.pause(); broker.resume()    # SIGSTOP/SIGCONT: a hung broker, its sockets still open
    broker.stop()

    secured = Broker.on_free_ports(tmp_path / "kafka", secured=True)  # SASL_SSL + mTLS, ACLs on
    secured.sasl_ssl_bootstrap, secured.ssl_bootstrap, secured.security.tls.ca_cert

    oauth = Broker.on_free_ports(tmp_path / "kafka", oauth_jwks_url=jwks, oauth_issuer=iss)
    oauth.oauth_bootstrap              # SASL_PLAINTEXT, OAUTHBEARER JWTs checked against the JWKS

Layout: ``$KAFKA_RIG_CACHE`` (default ``<repo>/.cache/kafka``) holds ``jars/`` and the default data
dirs ``data-<port>/``. A data dir holds ``server.properties``, ``kraft/`` (the Kafka log dirs),
``logs/server.log`` (log4j), ``broker.out`` (JVM stdout/stderr), ``broker.pid``, ``rig.json`` and,
when secured, ``tls/``. Each concern lives in its own module of the ``kafkarig`` package beside
this file; this module is the entry point and re-exports the public API.

Standard library only (Python 3.11+), so it runs before the project's venv exists.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # also when loaded by file path (importlib), not as ``import rig``
    sys.path.insert(0, str(HERE))

from kafkarig.acls import Acl, AclError, create_acls  # noqa: E402
from kafkarig.broker import DEFAULT_PORT, JVM_OPTS, Broker, BrokerError  # noqa: E402
from kafkarig.cli import main as _main  # noqa: E402
from kafkarig.jars import fetch  # noqa: E402
from kafkarig.layout import (  # noqa: E402
    LOG4J_CONFIG,
    POM,
    REPO,
    cache_dir,
    jars_dir,
    kafka_version,
)
from kafkarig.net import HOST, free_port, free_ports  # noqa: E402
from kafkarig.oauth import BROKER_JWT_VALIDATOR, OAuthListener  # noqa: E402
from kafkarig.properties import NODE_ID  # noqa: E402
from kafkarig.protocol import probe_metadata  # noqa: E402
from kafkarig.security import ADMIN_USER, DEFAULT_USERS, SCRAM_MECHANISM, Security  # noqa: E402
from kafkarig.tls import TlsFiles, make_ca, make_client_cert, make_pki  # noqa: E402

__all__ = [
    "ADMIN_USER",
    "BROKER_JWT_VALIDATOR",
    "DEFAULT_PORT",
    "DEFAULT_USERS",
    "HOST",
    "JVM_OPTS",
    "LOG4J_CONFIG",
    "NODE_ID",
    "POM",
    "REPO",
    "SCRAM_MECHANISM",
    "Acl",
    "AclError",
    "Broker",
    "BrokerError",
    "OAuthListener",
    "Security",
    "TlsFiles",
    "cache_dir",
    "create_acls",
    "fetch",
    "free_port",
    "free_ports",
    "jars_dir",
    "kafka_version",
    "main",
    "make_ca",
    "make_client_cert",
    "make_pki",
    "probe_metadata",
]


def main(argv: list[str] | None = None) -> int:
    """The CLI (see the module docstring)."""
    return _main(argv, description=(__doc__ or "").split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
