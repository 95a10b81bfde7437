"""Security checks against a real ``forwarder serve``: bearer tokens on the admin routes, secrets
never leaking anywhere, and oversized webhook bodies cut off without being read.

Every secret below carries the marker ``LEAKCHECK``, so a leak of any fragment of one is caught,
not just of the whole value.
"""

from __future__ import annotations

import asyncio
import base64
import select
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from forwarder.config import SecretStr, Settings
from tests.conftest import settings_for
from tests.support.fake_datagrid import FakeDatagrid
from tests.support.kafka_helpers import read_topic
from tests.support.service_helpers import Forwarder, event_body, run_forwarder, wait_until

MARKER = "LEAKCHECK"
SECRETS = {
    "api_key": f"dgkey-{MARKER}-7f3a9c1e5b2d",
    "webhook_old": f"whsec-{MARKER}-OLD-c0ffee1122",
    "webhook_new": f"whsec-{MARKER}-NEW-deadbeef33",
    "token_admin": f"tok-{MARKER}-ADMIN-a1b2c3d4e5",
    "token_ci": f"tok-{MARKER}-CI-f6a7b8c9d0",
    "sasl_password": f"sasl-{MARKER}-pw-9d8c7b6a5f",
}
ADMIN = SECRETS["token_admin"]
MAX_BODY = 65_536


def secure_settings(kafka_bootstrap: str, fake: FakeDatagrid, **overrides: Any) -> Settings:
    """Settings full of distinctive secrets. The API key is not the fake's, so every upstream
    call is a 401; SASL settings are set but ignored under PLAINTEXT."""
    values: dict[str, Any] = {
        "datagrid_api_key": SecretStr(SECRETS["api_key"]),
        "kafka_sasl_mechanism": "PLAIN",
        "kafka_sasl_username": "svc-forwarder",
        "kafka_sasl_password": SecretStr(SECRETS["sasl_password"]),
        "kafka_topic_partitions": 2,
        "max_attempts": 2,
        "webhook_secrets": [SecretStr(SECRETS["webhook_old"]), SecretStr(SECRETS["webhook_new"])],
        "api_tokens": [SecretStr(ADMIN), SecretStr(SECRETS["token_ci"])],
        "webhook_max_body_bytes": MAX_BODY,
        "log_level": "DEBUG",
    }
    return settings_for(kafka_bootstrap, fake, **{**values, **overrides})


@pytest.fixture(scope="module")
def service(
    kafka_bootstrap: str, fake_datagrid: FakeDatagrid, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Forwarder]:
    """A ready ``forwarder serve`` configured with SECRETS, logging at DEBUG."""
    fwd = Forwarder(
        secure_settings(kafka_bootstrap, fake_datagrid),
        tmp_path_factory.mktemp("security"),
        name="secure",
    ).start()
    try:
        fwd.wait_ready(60)
        yield fwd
    finally:
        fwd.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_unauthorized(response: httpx.Response) -> None:
    """401 problem+json with a Bearer challenge."""
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == 401 and body["type"].endswith("/unauthorized")
    assert body["title"] and body["detail"]


# ------------------------------------------------------------------------------------------------
# Bearer tokens on the admin routes
# ------------------------------------------------------------------------------------------------

BAD_AUTH: dict[str, dict[str, str]] = {
    "missing": {},
    "empty": {"Authorization": ""},
    "basic-user-pass": {
        "Authorization": "Basic " + base64.b64encode(f"{ADMIN}:".encode()).decode()
    },
    "basic-raw-token": {"Authorization": f"Basic {ADMIN}"},
    "bearer-nothing": {"Authorization": "Bearer"},
    "no-scheme": {"Authorization": ADMIN},
    "other-scheme": {"Authorization": f"Token {ADMIN}"},
    "wrong": bearer("not-a-token"),
    "prefix-of-token": bearer(ADMIN[:-1]),
    "token-plus-char": bearer(ADMIN + "0"),
    "token-other-case": bearer(ADMIN.lower()),
    "two-tokens": bearer(f"{ADMIN},{SECRETS['token_ci']}"),
    "webhook-secret": bearer(SECRETS["webhook_new"]),
    "api-key": bearer(SECRETS["api_key"]),
}


@pytest.mark.parametrize("auth", list(BAD_AUTH.values()), ids=list(BAD_AUTH))
def test_admin_routes_refuse_missing_malformed_or_wrong_tokens(
    service: Forwarder, auth: dict[str, str]
) -> None:
    """POST and GET /v1/batches answer 401 problem+json with WWW-Authenticate: Bearer, before
    looking at the body or the batch."""
    assert_unauthorized(
        service.http.post("/v1/batches", json={"batch_id": "bpred_1"}, headers=auth)
    )
    assert_unauthorized(service.http.post("/v1/batches", content=b"{not json", headers=auth))
    assert_unauthorized(service.http.get("/v1/batches/bpred_1", headers=auth))


def state_of(fwd: Forwarder, batch: str, token: str = ADMIN) -> dict[str, Any] | None:
    """GET /v1/batches/{batch} with ``token``; None until the batch has a state."""
    response = fwd.http.get(f"/v1/batches/{batch}", headers=bearer(token))
    return response.json() if response.status_code == 200 else None


def test_each_configured_token_works(service: Forwarder, fake_datagrid: FakeDatagrid) -> None:
    """Either configured token (rotation) queues a batch and reads its state; the scheme is
    case-insensitive."""
    batch = f"bpred_tok_{uuid.uuid4().hex[:8]}"
    fake_datagrid.configure(batch, lines=['{"custom_id":"a"}'])
    for token in (ADMIN, SECRETS["token_ci"]):
        response = service.http.post("/v1/batches", json={"batch_id": batch}, headers=bearer(token))
        assert response.status_code == 202, response.text
    lower = {"Authorization": f"bearer {ADMIN}"}
    assert (
        service.http.post("/v1/batches", json={"batch_id": batch}, headers=lower).status_code == 202
    )
    state = wait_until(lambda: state_of(service, batch, SECRETS["token_ci"]), 30, "its state")
    assert state["batch_id"] == batch
    unknown = service.http.get("/v1/batches/bpred_never_seen", headers=bearer(ADMIN))
    assert unknown.status_code == 404


def test_without_api_tokens_every_admin_request_is_refused(
    kafka_bootstrap: str, fake_datagrid: FakeDatagrid, tmp_path: Path
) -> None:
    """With FORWARDER_API_TOKENS empty (or only blanks), every admin request is 401, whatever it
    carries."""
    settings = secure_settings(kafka_bootstrap, fake_datagrid, api_tokens=[])
    fwd = Forwarder(settings, tmp_path, name="notokens", FORWARDER_API_TOKENS=" , ,").start()
    try:
        wait_until(lambda: _status(fwd, "/healthz") == 200, 30, "liveness")
        for auth in [*BAD_AUTH.values(), bearer(ADMIN), bearer(SECRETS["token_ci"])]:
            post = fwd.http.post("/v1/batches", json={"batch_id": "bpred_1"}, headers=auth)
            assert_unauthorized(post)
            assert_unauthorized(fwd.http.get("/v1/batches/bpred_1", headers=auth))
    finally:
        fwd.stop()


def _status(fwd: Forwarder, path: str) -> int:
    try:
        return fwd.http.get(path).status_code
    except httpx.TransportError:
        return 0


# ------------------------------------------------------------------------------------------------
# Oversized webhook bodies are cut off, not read
# ------------------------------------------------------------------------------------------------


@dataclass
class Upload:
    """What happened while pushing a large body at the server."""

    sent: int  # body bytes the kernel accepted from us before the connection ended (or we gave up)
    sent_at_response: int | None  # body bytes sent when the first response byte arrived
    response: bytes
    ended: str  # how the connection ended: "eof", "reset", "send-failed", "gave-up"
    seconds: float


def push_body(port: int, head: bytes, total: int, *, chunked: bool, limit_s: float = 10) -> Upload:
    """Send ``head`` then up to ``total`` body bytes over a raw socket, reading replies as we go."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65_536)
    piece = b"x" * 65_536
    frame = (b"%x\r\n" % len(piece) + piece + b"\r\n") if chunked else piece
    sock.sendall(head)
    sock.setblocking(False)
    sent, at_response, response, ended = 0, None, b"", "gave-up"
    pending = memoryview(b"")
    started = time.monotonic()
    try:
        while time.monotonic() - started < limit_s:
            want_write = sent < total
            readable, writable, _ = select.select([sock], [sock] if want_write else [], [], 0.2)
            if readable:
                try:
                    data = sock.recv(65_536)
                except ConnectionResetError:
                    ended = "reset"
                    break
                if not data:
                    ended = "eof"
                    break
                if at_response is None:
                    at_response = sent
                response += data
            if writable:
                if not pending:
                    pending = memoryview(frame)
                try:
                    n = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    ended = "send-failed"
                    break
                except BlockingIOError:
                    continue
                sent += n
                pending = pending[n:]
            if not want_write and not readable:
                break  # everything sent and the server is quiet: it kept the connection open
    finally:
        sock.close()
    return Upload(sent, at_response, response, ended, time.monotonic() - started)


FIFTY_MB = 50 * 1024 * 1024
WEBHOOK_HEAD = (
    b"POST /webhooks/datagrid HTTP/1.1\r\nHost: forwarder\r\nContent-Type: application/json\r\n"
    b"Datagrid-Signature: t=1,v1=00\r\n"
)


@pytest.mark.parametrize(
    ("framing", "head"),
    [
        ("content-length", WEBHOOK_HEAD + b"Content-Length: %d\r\n\r\n" % FIFTY_MB),
        ("chunked", WEBHOOK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"),
    ],
    ids=["content-length", "chunked"],
)
def test_oversized_webhook_body_is_cut_off_without_being_read(
    service: Forwarder, framing: str, head: bytes
) -> None:
    """A 50 MB webhook body (announced, or chunked without end) gets 413 within the first
    megabytes, and the server then closes the connection instead of reading the rest."""
    upload = push_body(service.port, head, FIFTY_MB, chunked=framing == "chunked")
    assert upload.response.startswith(b"HTTP/1.1 413 "), upload
    assert b"application/problem+json" in upload.response
    assert upload.sent_at_response is not None and upload.sent_at_response < 8 * 1024 * 1024
    assert upload.ended in ("eof", "reset", "send-failed"), (
        f"the server kept reading: {upload.sent} bytes accepted, connection still open"
    )
    assert upload.sent < FIFTY_MB // 2, upload.sent
    assert upload.seconds < 10
    assert service.http.get("/healthz").status_code == 200


# ------------------------------------------------------------------------------------------------
# Secrets never appear anywhere (runs last: it stops the module's service to read its whole log)
# ------------------------------------------------------------------------------------------------


def leaks(text: str | bytes) -> list[str]:
    """Names of the secrets (or the marker) that appear in ``text``."""
    value = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    found = [name for name, secret in SECRETS.items() if secret in value]
    if MARKER in value:
        found.append(MARKER)
    return found


def transcript(response: httpx.Response) -> str:
    headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
    return f"{response.status_code}\n{headers}\n\n{response.text}"


def test_secrets_never_appear_in_logs_metrics_responses_help_or_errors(
    service: Forwarder, fake_datagrid: FakeDatagrid
) -> None:
    """Webhooks (good and bad), API calls (good and bad), a forward that fails upstream with 401,
    --help and config errors: no secret, nor any fragment of one, is in any log line, metric,
    response body or header, command output or Kafka record."""
    outputs: dict[str, str] = {}
    now = int(time.time())
    batches = [f"bpred_leak_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for batch in batches:
        fake_datagrid.configure(batch, lines=['{"custom_id":"a"}'])

    def call(label: str, response: httpx.Response) -> httpx.Response:
        outputs[label] = transcript(response)
        return response

    # Webhooks, good (each rotated secret) and bad.
    for secret, batch in zip(("webhook_old", "webhook_new"), batches, strict=True):
        body = event_body(batch, f"evt_{uuid.uuid4().hex[:8]}")
        good = call(f"webhook {secret}", service.webhook(body, secret=SECRETS[secret]))
        assert good.status_code == 202
    body = event_body(batches[0], "evt_bad")
    bad_webhooks: dict[str, dict[str, Any]] = {
        "wrong secret": {"secret": "whsec-wrong"},
        "stale": {"secret": SECRETS["webhook_new"], "timestamp": now - 3600},
        "garbage header": {"header": "garbage"},
        "missing header": {"header": ""},
        "secret as v1": {"header": f"t={now},v1={SECRETS['webhook_new']}"},
        "secret as t": {"header": f"t={SECRETS['webhook_old']},v1=00"},
    }
    for label, kwargs in bad_webhooks.items():
        assert call(f"webhook {label}", service.webhook(body, **kwargs)).status_code == 401
    not_json = service.webhook(b"{oops", secret=SECRETS["webhook_new"])
    assert call("webhook not json", not_json).status_code == 400
    too_big = service.webhook(b"{" + b" " * (MAX_BODY + 1) + b"}")
    assert call("webhook too big", too_big).status_code == 413

    # API, good and bad.
    api: dict[str, tuple[dict[str, Any], int]] = {
        "api bad token": ({"json": {"batch_id": batches[0]}, "headers": bearer("nope")}, 401),
        "api bad body": ({"content": b"[", "headers": bearer(ADMIN)}, 400),
        "api bad id": ({"json": {"batch_id": "a/b"}, "headers": bearer(ADMIN)}, 400),
    }
    for label, (kwargs, status) in api.items():
        assert call(label, service.http.post("/v1/batches", **kwargs)).status_code == status

    # The forwards fail upstream with 401 (the API key is not the fake's).
    for batch in batches:
        failed = wait_until(
            lambda b=batch: (s := state_of(service, b)) and s["status"] == "failed" and s,
            30,
            f"{batch} failed upstream",
        )
        assert failed["error"]["upstream_status"] == 401, failed
        call(f"state {batch}", service.http.get(f"/v1/batches/{batch}", headers=bearer(ADMIN)))
    requests = [r for r in fake_datagrid.requests() if any(b in r["path"] for b in batches)]
    assert requests and not any(r["auth_ok"] for r in requests)  # the key was sent, and refused

    for path in ("/metrics", "/healthz", "/readyz", "/schema/openapi.json", "/nope"):
        call(f"GET {path}", service.http.get(path))
    assert "forwarder_upstream_requests_total" in outputs["GET /metrics"]

    # The command line, with every secret in its environment.
    env = dict(service.env)  # the service's own environment: every secret is in it
    for args in (["--help"], ["serve", "--help"], ["forward", "--help"], ["enqueue", "--help"]):
        done = run_forwarder(env, *args, timeout=60)
        assert done.returncode == 0
        outputs[f"forwarder {' '.join(args)}"] = done.stdout + done.stderr
    assert "FORWARDER_KAFKA_SASL_PASSWORD" in outputs["forwarder --help"]
    done = run_forwarder(env, "forward", batches[0], timeout=60)
    assert done.returncode == 1 and "401" in done.stdout, done.stdout + done.stderr
    outputs["forwarder forward (401)"] = done.stdout + done.stderr
    config_errors = {
        "port": {"FORWARDER_HTTP_PORT": "abc"},
        "sasl without mechanism": {
            "FORWARDER_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "FORWARDER_KAFKA_SASL_MECHANISM": "",
        },
        "tolerance": {"FORWARDER_WEBHOOK_TOLERANCE_SECONDS": SECRETS["webhook_old"]},
    }
    for label, bad in config_errors.items():
        done = run_forwarder({**env, **bad}, "serve", timeout=60)
        assert done.returncode == 2, (label, done.stderr)
        assert "configuration error" in done.stderr
        outputs[f"config error: {label}"] = done.stdout + done.stderr
    assert "FORWARDER_HTTP_PORT" in outputs["config error: port"]

    # Finally the service's whole log, shutdown included.
    service.stop()
    log = service.log_path.read_text(errors="replace")
    assert '"webhook_accepted"' in log and '"batch_failed"' in log
    outputs["service log"] = log

    # And what it wrote to Kafka: jobs and state records (headers included).
    bootstrap = service.env["FORWARDER_KAFKA_BOOTSTRAP_SERVERS"]
    for name in ("FORWARDER_JOBS_TOPIC", "FORWARDER_STATE_TOPIC"):
        records = asyncio.run(read_topic(bootstrap, service.env[name]))
        assert records, name
        outputs[name] = "\n".join(
            repr((r.key, r.value, sorted(r.headers.items()))) for r in records
        )

    leaked = {label: found for label, text in outputs.items() if (found := leaks(text))}
    assert not leaked, leaked
