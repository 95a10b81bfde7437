"""Creating ACLs on a secured rig broker: a CreateAcls request over the PLAINTEXT (super user) door.

Standard library only, like the rest of the rig, and without a JVM start per ACL (the Kafka admin
CLI needs the kafka-tools jar and a few seconds each). CreateAcls v1 is the oldest version Kafka
4.x still serves (KIP-896 removed v0) and the newest without flexible (tagged) fields. Kafka
forwards it to the controller; the ACLs then reach the authorizer through the metadata log.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kafkarig.protocol import Reader, request, string

#: Kafka's wire codes (org.apache.kafka.common.resource / acl).
RESOURCE_TYPES = {"topic": 2, "group": 3, "cluster": 4, "transactional-id": 5}
PATTERN_TYPES = {"literal": 3, "prefixed": 4}
OPERATIONS = {
    "All": 2,
    "Read": 3,
    "Write": 4,
    "Create": 5,
    "Delete": 6,
    "Alter": 7,
    "Describe": 8,
    "ClusterAction": 9,
    "DescribeConfigs": 10,
    "AlterConfigs": 11,
    "IdempotentWrite": 12,
}
ALLOW = 3
CREATE_ACLS = 30


class AclError(RuntimeError):
    """The broker refused to create an ACL."""


@dataclass(frozen=True)
class Acl:
    """One ALLOW rule: ``principal`` may do ``operation`` on a resource, from any host."""

    principal: str  # "User:forwarder"
    resource_type: str  # a key of RESOURCE_TYPES
    name: str  # topic/group/transactional id, or "kafka-cluster"
    operation: str  # a key of OPERATIONS
    pattern: str = "literal"  # or "prefixed"

    def encode(self) -> bytes:
        """The CreateAcls v1 ``creations`` entry."""
        return (
            struct.pack(">b", RESOURCE_TYPES[self.resource_type])
            + string(self.name)
            + struct.pack(">b", PATTERN_TYPES[self.pattern])
            + string(self.principal)
            + string("*")
            + struct.pack(">bb", OPERATIONS[self.operation], ALLOW)
        )


def create_acls(host: str, port: int, acls: list[Acl], timeout: float = 30.0) -> None:
    """Create ``acls`` (ALLOW, any host) through the broker at ``host:port``; raise on refusal."""
    body = struct.pack(">i", len(acls)) + b"".join(acl.encode() for acl in acls)
    data = request(host, port, api_key=CREATE_ACLS, api_version=1, body=body, timeout=timeout)
    reader = Reader(data)
    reader.take(">i")  # throttle_time_ms
    failures = []
    for acl in acls[: reader.take(">i")]:
        code, message = reader.take(">h"), reader.take_string()
        if code:
            failures.append(f"{acl}: error {code} {message or ''}".rstrip())
    if failures:
        raise AclError("creating ACLs failed:\n" + "\n".join(failures))
