"""Token logins to Kafka: OAUTHBEARER with OIDC client credentials, and AWS MSK IAM.

aiokafka takes either as its ``sasl_oauth_token_provider`` (an ``AbstractTokenProvider``) and
asks it for a token each time it opens a connection. Both providers here keep the token they
got and fetch a new one once 80% of its lifetime has passed (what Kafka's Java client does, with
``sasl.login.refresh.window.factor=0.8``), so every connection gets a token that is not about to
expire, and the token endpoint sees one request per lifetime, not one per connection.

- :class:`ClientCredentials`: ``grant_type=client_credentials`` at
  ``FORWARDER_KAFKA_OAUTH_TOKEN_URL`` (client id and secret in HTTP Basic auth, as RFC 6749 asks
  every server to accept), through httpx with bounded timeouts.
- :class:`MskIam`: AWS's signer (``aws-msk-iam-sasl-signer-python``) signs a token with the
  credentials of the usual AWS chain (environment, profile, IRSA web identity, instance role) for
  the region ``AWS_REGION``. MSK's IAM login is OAUTHBEARER with that token.

Errors (translated here, with ``from exc``): a token endpoint that is down or answers 5xx/429 is a
retriable :class:`KafkaError`; one that refuses the client, the scope or the URL is a
:class:`ConfigError` naming the setting. A fetch that fails while the token held is still valid
hands out that token (and logs it), so a short outage of the identity provider costs nothing.

aiokafka (0.14) takes a broker's refusal of an OAUTHBEARER token for a success: the broker answers
the token with an error message (RFC 7628, 3.2.2) and no error code, and aiokafka goes on to send
requests on a connection the broker then closes, so a bad token shows as "Unable to bootstrap"
or a send that times out. :func:`token_provider` installs a check of that answer (once, for
OAUTHBEARER connections only) that raises ``SaslAuthenticationFailed`` naming the token's issuer,
audience and expiry, which ``kafka.translate`` turns into a :class:`ConfigError`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import weakref
from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import httpx
import structlog
from aiokafka.abc import AbstractTokenProvider
from aiokafka.conn import AIOKafkaConnection, OAuthAuthenticator
from aiokafka.errors import SaslAuthenticationFailed

from forwarder.config import SecretStr, Settings
from forwarder.errors import ConfigError, KafkaError

log = structlog.get_logger("forwarder.oauth")

#: Fetch a new token once this share of the last one's lifetime has passed.
REFRESH_AT = 0.8
#: Seconds to connect to the token endpoint, and for its whole answer: a login waits on it.
TOKEN_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
#: Lifetime assumed when a token endpoint does not say (``expires_in`` is only RECOMMENDED).
DEFAULT_LIFETIME_SECONDS = 300.0

Clock = Callable[[], float]


class CachedToken(AbstractTokenProvider):  # type: ignore[misc]  # aiokafka is untyped
    """A token kept until :data:`REFRESH_AT` of its lifetime, then fetched again by
    :meth:`fetch`; one fetch at a time per event loop, however many connections open at once."""

    def __init__(self, *, clock: Clock = time.time) -> None:
        self._clock = clock
        self._token: str | None = None
        self._refresh_at = 0.0
        self._expires_at = 0.0
        # asyncio.Lock binds to the loop it first waits on; each loop gets its own.
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )

    @abstractmethod
    async def fetch(self) -> tuple[str, float]:
        """A new token and its lifetime in seconds."""

    async def token(self) -> str:
        """The token to log in with: the one held, or a new one once it is due."""
        lock = self._locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())
        async with lock:
            now = self._clock()
            if self._token is not None and now < self._refresh_at:
                return self._token
            try:
                token, lifetime = await self.fetch()
            except (KafkaError, ConfigError) as exc:
                if self._token is not None and now < self._expires_at:
                    log.warning(
                        "kafka_token_refresh_failed",
                        error=str(exc),
                        seconds_left=round(self._expires_at - now),
                    )
                    return self._token
                raise
            now = self._clock()
            self._token = token
            self._expires_at = now + lifetime
            self._refresh_at = now + max(lifetime, 0.0) * REFRESH_AT
            return token


class ClientCredentials(CachedToken):
    """OAuth 2.0 client credentials at an OIDC token endpoint (Keycloak, Entra ID, Okta, Auth0,
    Confluent Cloud's identity pools, ...)."""

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: SecretStr,
        scope: str | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock = time.time,
    ) -> None:
        super().__init__(clock=clock)
        self.token_url = token_url
        self.client_id = client_id
        self._client_secret = client_secret
        self.scope = scope
        self._transport = transport  # the seam for tests; None: real HTTP

    def __repr__(self) -> str:
        return f"ClientCredentials({self.token_url!r}, client_id={self.client_id!r})"

    async def fetch(self) -> tuple[str, float]:
        form = {"grant_type": "client_credentials"}
        if self.scope:
            form["scope"] = self.scope
        # A client per fetch: one request every few minutes, and no client bound to a closed loop.
        async with httpx.AsyncClient(
            transport=self._transport, timeout=TOKEN_TIMEOUT, follow_redirects=False
        ) as client:
            try:
                response = await client.post(
                    self.token_url,
                    data=form,
                    auth=httpx.BasicAuth(self.client_id, self._client_secret.get_secret_value()),
                    headers={"Accept": "application/json"},
                )
            except httpx.HTTPError as exc:  # connect refused, DNS, timeouts, broken answers
                raise KafkaError(
                    f"the OAuth token endpoint FORWARDER_KAFKA_OAUTH_TOKEN_URL={self.token_url} "
                    f"is unreachable ({type(exc).__name__}: {exc})"
                ) from exc
        return self._read(response)

    def _read(self, response: httpx.Response) -> tuple[str, float]:
        """The token and lifetime of a 200 answer, else the error it means."""
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {}
        status = response.status_code
        if status == 429 or status >= 500:
            raise KafkaError(
                f"the OAuth token endpoint {self.token_url} answered {status}; will retry"
            )
        if status != 200:
            raise ConfigError(self._refusal(status, body))
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise ConfigError(
                f"FORWARDER_KAFKA_OAUTH_TOKEN_URL={self.token_url} answered 200 without an "
                "access_token: is it the token endpoint (not the issuer or the JWKS URL)?"
            )
        expires_in = body.get("expires_in", DEFAULT_LIFETIME_SECONDS)
        try:
            lifetime = float(expires_in)
        except (TypeError, ValueError):
            lifetime = DEFAULT_LIFETIME_SECONDS
        return token, lifetime

    def _refusal(self, status: int, body: dict[str, Any]) -> str:
        """What a 4xx from the token endpoint says, naming the settings to check."""
        error = str(body.get("error") or "")[:80]
        # The endpoint's own words, cut short; it never sees (so cannot echo) more than the id.
        description = str(body.get("error_description") or "")[:200]
        said = f"{status} {error}".strip() + (f": {description}" if description else "")
        if error == "invalid_scope":
            check = "FORWARDER_KAFKA_OAUTH_SCOPE"
        elif error in ("invalid_client", "unauthorized_client") or status == 401:
            check = "FORWARDER_KAFKA_OAUTH_CLIENT_ID and FORWARDER_KAFKA_OAUTH_CLIENT_SECRET"
        else:
            check = "FORWARDER_KAFKA_OAUTH_TOKEN_URL and FORWARDER_KAFKA_OAUTH_CLIENT_ID"
        return (
            f"the OAuth token endpoint {self.token_url} refused the client ({said}): check {check}"
        )


#: ``generate_auth_token(region) -> (token, expiry in epoch ms)``, AWS's signer by default.
Signer = Callable[[str], tuple[str, int]]


def _aws_signer(region: str) -> tuple[str, int]:
    # Imported on first use: boto3 and botocore take a while to import, and only MSK needs them.
    from aws_msk_iam_sasl_signer import MSKAuthTokenProvider

    token, expiry_ms = MSKAuthTokenProvider.generate_auth_token(region)
    return str(token), int(expiry_ms)


class MskIam(CachedToken):
    """AWS MSK IAM: a SigV4-signed ``kafka-cluster:Connect`` URL as the OAUTHBEARER token, valid
    for 15 minutes, signed with the credentials of the AWS default chain."""

    def __init__(
        self, region: str, *, signer: Signer = _aws_signer, clock: Clock = time.time
    ) -> None:
        super().__init__(clock=clock)
        self.region = region
        self._signer = signer  # the seam for tests; AWS's signer by default

    def __repr__(self) -> str:
        return f"MskIam(region={self.region!r})"

    async def fetch(self) -> tuple[str, float]:
        try:
            # Synchronous, and may call STS or the instance metadata service: off the loop.
            token, expiry_ms = await asyncio.to_thread(self._signer, self.region)
        except Exception as exc:  # the signer raises botocore's errors, and ValueError
            from botocore.exceptions import (
                NoCredentialsError,
                PartialCredentialsError,
                ProfileNotFound,
            )

            name = type(exc).__name__
            if isinstance(exc, NoCredentialsError | PartialCredentialsError | ProfileNotFound):
                raise ConfigError(
                    f"AWS_MSK_IAM: no usable AWS credentials ({name}): give the pod a role "
                    "(IRSA or EKS Pod Identity) or set the AWS_* credential variables"
                ) from exc
            raise KafkaError(
                f"AWS_MSK_IAM: signing the login token failed ({name}: {exc})"
            ) from exc
        return token, expiry_ms / 1000 - self._clock()


_providers: dict[tuple[Any, ...], CachedToken] = {}


def token_provider(settings: Settings) -> CachedToken:
    """The token provider of ``settings``' SASL mechanism, one per credentials and process (every
    Kafka client of the process shares its token)."""
    _install_refusal_check()
    if settings.kafka_sasl_mechanism == "AWS_MSK_IAM":
        assert settings.AWS_REGION is not None  # checked by Settings
        key: tuple[Any, ...] = ("AWS_MSK_IAM", settings.AWS_REGION)
        if key not in _providers:
            _providers[key] = MskIam(settings.AWS_REGION)
        return _providers[key]
    url, client_id = settings.kafka_oauth_token_url, settings.kafka_oauth_client_id
    secret = settings.kafka_oauth_client_secret
    assert url is not None and client_id is not None and secret is not None  # checked by Settings
    key = ("OAUTHBEARER", url, client_id, secret.get_secret_value(), settings.kafka_oauth_scope)
    if key not in _providers:
        _providers[key] = ClientCredentials(url, client_id, secret, settings.kafka_oauth_scope)
    return _providers[key]


# --- the broker's refusal of a token (aiokafka misses it) ----------------------------------------


def describe_token(token: str, now: float | None = None) -> str:
    """Issuer, audience and expiry of a JWT, read without checking it (for error messages: none of
    it is secret); an opaque token (MSK's signed URL) says so."""
    parts = token.split(".")
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (IndexError, ValueError, binascii.Error):
        return "the token is not a JWT"
    if not isinstance(claims, dict):
        return "the token is not a JWT"
    now = time.time() if now is None else now
    said = []
    exp = claims.get("exp")
    if isinstance(exp, int | float):
        left = round(exp - now)
        said.append(f"expired {-left} s ago" if left <= 0 else f"expires in {left} s")
    # Shortest first: the whole message is cut at a few hundred characters in a log line.
    said += [f"audience {claims.get('aud')!r}", f"issuer {claims.get('iss')!r}"]
    return ", ".join(said)


class TokenRefused(SaslAuthenticationFailed):  # type: ignore[misc]  # aiokafka is untyped
    """The broker refused an OAUTHBEARER token (an aiokafka error, so that aiokafka handles it
    like any refused login)."""


class _RefusalCheck(OAuthAuthenticator):  # type: ignore[misc]  # aiokafka is untyped
    """aiokafka's OAUTHBEARER exchange, plus the check of the broker's answer to the token: a
    non-empty answer is the RFC 7628 error message (``{"status":"invalid_token"}``), a refusal."""

    _token: str = ""
    _token_sent: bool  # set by aiokafka's __init__

    async def step(self, payload: bytes | None) -> tuple[bytes, bool] | None:
        if not self._token_sent:  # as aiokafka's, keeping the token sent for the message below
            self._token = await self._sasl_oauth_token_provider.token()
            self._token_sent = True
            request = self._build_oauth_client_request(self._token, self._token_extensions())
            return request.encode("utf-8"), True
        if payload:
            answer = payload.decode("utf-8", "replace")[:100]
            raise TokenRefused(
                f"Kafka refused the OAUTHBEARER token ({answer}): {describe_token(self._token)}; "
                "the brokers check its signature (JWKS), issuer, audience and expiry; their "
                "log says which failed"
            )
        return None


def _authenticator_oauth(self: AIOKafkaConnection) -> OAuthAuthenticator:
    return _RefusalCheck(sasl_oauth_token_provider=self._sasl_oauth_token_provider)


def _install_refusal_check() -> None:
    """Make aiokafka's connections check the broker's answer to an OAUTHBEARER token (idempotent;
    the method only serves OAUTHBEARER connections)."""
    AIOKafkaConnection.authenticator_oauth = _authenticator_oauth
