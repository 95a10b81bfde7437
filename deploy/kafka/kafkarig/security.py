"""The opt-in secured listeners: SASL_SSL with SCRAM-SHA-512 and SSL with client certificates.

As production runs Kafka: TLS with hostname verification on both listeners, SCRAM-SHA-512 logins
on one, mutual TLS on the other, and ACLs on (``StandardAuthorizer``, nothing allowed without an
ACL). The PLAINTEXT listener stays: it is the rig's admin door (its principal ``User:ANONYMOUS``
is a super user, as is the SCRAM user ``admin``), which the readiness probe, the inter-broker and
controller traffic and a test's admin steps (topics, ACLs) use. It listens on 127.0.0.1 only.

Principals: a SCRAM login is ``User:<name>``; a client certificate ``CN=<name>`` is mapped to the
same ``User:<name>`` (``ssl.principal.mapping.rules``), so one set of ACLs serves both listeners.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kafkarig.tls import TlsFiles, make_pki

SCRAM_MECHANISM = "SCRAM-SHA-512"
AUTHORIZER = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
ADMIN_USER = "admin"
#: The users made when none are given: the admin, and one for the service under test.
DEFAULT_USERS = {ADMIN_USER: "admin-secret", "forwarder": "forwarder-secret"}


@dataclass(frozen=True)
class Security:
    """Ports, certificates and SCRAM users of the secured listeners.

    SCRAM credentials are written into the metadata log when the data dir is formatted
    (``kafka-storage format --add-scram``), so they exist before the broker first answers; users
    added to ``scram_users`` after that first start are ignored.
    """

    sasl_ssl_port: int
    ssl_port: int
    tls: TlsFiles
    scram_users: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_USERS))
    super_users: tuple[str, ...] = (ADMIN_USER,)

    @classmethod
    def create(
        cls,
        sasl_ssl_port: int,
        ssl_port: int,
        tls_dir: Path,
        scram_users: Mapping[str, str] | None = None,
    ) -> Security:
        """Security with a test PKI in ``tls_dir``: a client certificate for every SCRAM user."""
        users = dict(scram_users if scram_users is not None else DEFAULT_USERS)
        return cls(sasl_ssl_port, ssl_port, make_pki(tls_dir, tuple(users)), users)

    def ports(self) -> dict[str, int]:
        """The secured listeners' ports, as recorded in the data dir's ``rig.json``."""
        return {"sasl_ssl_port": self.sasl_ssl_port, "ssl_port": self.ssl_port}

    def properties(self) -> dict[str, str]:
        """server.properties entries that add the secured listeners and switch ACLs on."""
        super_users = ";".join(["User:ANONYMOUS", *(f"User:{u}" for u in self.super_users)])
        return {
            "sasl.enabled.mechanisms": SCRAM_MECHANISM,
            "listener.name.sasl_ssl.sasl.enabled.mechanisms": SCRAM_MECHANISM,
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
            # One PEM key store and trust store for both TLS listeners.
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(self.tls.broker_keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.tls.ca_cert),
            # Mutual TLS on the SSL listener only: SCRAM clients need no certificate.
            "listener.name.ssl.ssl.client.auth": "required",
            "ssl.principal.mapping.rules": "RULE:^CN=([^,]+)$/$1/,DEFAULT",
            "authorizer.class.name": AUTHORIZER,
            "allow.everyone.if.no.acl.found": "false",
            "super.users": super_users,
        }

    def format_args(self) -> list[str]:
        """``kafka-storage format`` arguments that create the SCRAM credentials."""
        args = []
        for user, password in self.scram_users.items():
            args.append(f"--add-scram={SCRAM_MECHANISM}=[name={user},password={password}]")
        return args
