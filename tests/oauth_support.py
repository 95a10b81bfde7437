"""A small real OIDC token endpoint for tests: client credentials in, RS256 JWTs out, and a JWKS.

``POST /token`` takes ``grant_type=client_credentials`` with the client id and secret in HTTP
Basic auth (``client_secret_basic``, what RFC 6749 requires every server to accept) and answers
``{"access_token": <JWT>, "token_type": "Bearer", "expires_in": N}``. ``GET /jwks`` serves the
public key the broker checks signatures with. What the next tokens look like (audience, lifetime,
signed by the real key or a forged one) is set on the running server, so one broker, started
against this JWKS, can be shown a good token, an expired one, one for another audience and a
forgery. Runs in a thread of the test process; the forwarder, a subprocess, reaches it over TCP.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote_plus

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ISSUER = "https://idp.test/realms/kafka"
KEY_ID = "rig-key-1"


@dataclass
class TokenPolicy:
    """What the next tokens the endpoint issues look like (change it between requests)."""

    audience: str = "kafka"
    #: Seconds from issue to ``exp``; negative issues a token that is already expired.
    lifetime: int = 300
    #: Sign with a key the JWKS does not hold (under the real key id): a forgery.
    forged: bool = False
    #: Clients allowed in, id -> secret.
    clients: dict[str, str] = field(default_factory=dict)


class TokenEndpoint:
    """The token and JWKS endpoints, with the tokens issued and requests seen, for assertions."""

    def __init__(
        self,
        clients: dict[str, str],
        audience: str = "kafka",
        key: rsa.RSAPrivateKey | None = None,
    ) -> None:
        self.policy = TokenPolicy(audience=audience, clients=dict(clients))
        # ``key``: another endpoint's, to stand in for it (the same identity provider, restarted).
        self.key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.issued: list[dict[str, Any]] = []
        self.requests: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "the endpoint is not running"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/token"

    @property
    def jwks_url(self) -> str:
        return f"{self.base_url}/jwks"

    def jwks(self) -> dict[str, Any]:
        """The key set: the real key's public half only."""
        public = RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return {"keys": [{**public, "kid": KEY_ID, "use": "sig", "alg": "RS256"}]}

    def issue(self, client_id: str, scope: str | None) -> tuple[str, int]:
        """A JWT for ``client_id`` under the current policy, and its ``expires_in``."""
        policy = self.policy
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "sub": client_id,
            "aud": policy.audience,
            "iat": now if policy.lifetime > 0 else now + policy.lifetime - 60,
            "exp": now + policy.lifetime,
            "jti": uuid.uuid4().hex,
        }
        if scope:
            claims["scope"] = scope
        key = self.forger if policy.forged else self.key
        token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": KEY_ID})
        with self._lock:
            self.issued.append(claims)
        return token, policy.lifetime

    def start(self, port: int = 0) -> TokenEndpoint:
        """Serve on ``port`` (0: a free one) in a thread."""
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _handler(endpoint: TokenEndpoint) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: pytest shows stderr of failing tests, and these lines are noise there."""

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/jwks":
                self._answer(200, endpoint.jwks())
            else:
                self._answer(404, {"error": "not_found"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
            with endpoint._lock:
                endpoint.requests.append(form)
            if self.path != "/token":
                self._answer(404, {"error": "not_found"})
                return
            if form.get("grant_type") != "client_credentials":
                self._answer(400, {"error": "unsupported_grant_type"})
                return
            client_id, secret = _basic(self.headers.get("Authorization", ""))
            if client_id is None or endpoint.policy.clients.get(client_id) != secret:
                self._answer(401, {"error": "invalid_client", "error_description": "bad client"})
                return
            token, expires_in = endpoint.issue(client_id, form.get("scope"))
            self._answer(
                200, {"access_token": token, "token_type": "Bearer", "expires_in": expires_in}
            )

    return Handler


def _basic(header: str) -> tuple[str | None, str | None]:
    """Client id and secret from a Basic authorization header (form-url-encoded, RFC 6749 2.3.1)."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        user, _, password = base64.b64decode(value).decode().partition(":")
    except ValueError:
        return None, None
    return unquote_plus(user), unquote_plus(password)


@contextmanager
def token_endpoint(clients: dict[str, str], audience: str = "kafka") -> Iterator[TokenEndpoint]:
    """A running token endpoint, stopped on exit."""
    endpoint = TokenEndpoint(clients, audience).start()
    try:
        yield endpoint
    finally:
        endpoint.stop()
