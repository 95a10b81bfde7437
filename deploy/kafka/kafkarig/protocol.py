"""A tiny Kafka protocol client: just enough for the rig's readiness check."""

from __future__ import annotations

import socket
import struct


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by broker")
        buf += chunk
    return bytes(buf)


class Reader:
    """Reads a response body field by field, in order."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, fmt: str) -> int:
        """One fixed-size integer (``struct`` format, e.g. ``">i"``)."""
        value: int = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def take_string(self) -> str | None:
        """One nullable (non-compact) string."""
        length = self.take(">h")
        if length < 0:
            return None
        value = self.data[self.pos : self.pos + length].decode()
        self.pos += length
        return value


def string(value: str | None) -> bytes:
    """A Kafka protocol (non-compact) nullable string."""
    if value is None:
        return struct.pack(">h", -1)
    raw = value.encode()
    return struct.pack(">h", len(raw)) + raw


def request(
    host: str, port: int, *, api_key: int, api_version: int, body: bytes, timeout: float = 2.0
) -> bytes:
    """Send one request (header v1, so only non-flexible versions) and return the response body.

    The connection is plain TCP: on a secured broker this is the PLAINTEXT listener, whose
    principal the rig makes a super user.
    """
    client_id = b"kafka-rig"
    # Request header v1: api_key, api_version, correlation_id, client_id.
    header = struct.pack(">hhih", api_key, api_version, 1, len(client_id)) + client_id
    payload = header + body
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(struct.pack(">i", len(payload)) + payload)
        (size,) = struct.unpack(">i", _recv_exact(sock, 4))
        data = _recv_exact(sock, size)
    # Response header v0: the correlation id only.
    if struct.unpack_from(">i", data)[0] != 1:
        raise ConnectionError(f"unexpected correlation id in the response to api key {api_key}")
    return data[4:]


def probe_metadata(host: str, port: int, timeout: float = 2.0) -> tuple[str | None, list[int]]:
    """Send a Kafka Metadata request and return ``(cluster_id, ids of live brokers)``.

    Metadata v4 is used because Kafka 4.0 removed v0-v3 (KIP-896) and 3.x still has v4. No topics
    are asked for, so the answer is small. A KRaft broker lists itself only once it is unfenced,
    i.e. registered with the controller and caught up with the metadata log: that, not an open
    port, is what "ready" means here.
    """
    # Body v4: topics=[] (empty; null would mean all topics), allow_auto_topic_creation=false.
    data = request(
        host, port, api_key=3, api_version=4, body=struct.pack(">ib", 0, 0), timeout=timeout
    )
    reader = Reader(data)
    take, take_string = reader.take, reader.take_string
    take(">i")  # throttle_time_ms
    brokers = []
    for _ in range(take(">i")):
        brokers.append(take(">i"))  # node_id
        take_string()  # host
        take(">i")  # port
        take_string()  # rack
    cluster_id = take_string()
    return cluster_id, brokers
