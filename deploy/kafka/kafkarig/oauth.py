"""The opt-in OAUTHBEARER listener: SASL_PLAINTEXT logins with JWTs checked against a JWKS.

As Strimzi with Keycloak, Aiven or Confluent Cloud run it: the client gets a JWT from an OIDC
token endpoint (client credentials) and sends it as its SASL/OAUTHBEARER token; the broker checks
the signature against the keys its JWKS endpoint serves, the expiry (30 s of clock skew allowed)
the issuer and the audience. The principal is ``User:<sub>``.

Three settings that are easy to miss, all needed on Kafka 4.x:
- ``sasl.oauthbearer.jwt.validator.class=...BrokerJwtValidator``. Without it the broker falls back
  to a validator meant for clients, which checks the claims but **not the signature**: a token
  signed by any key gets in.
- The JVM system property ``org.apache.kafka.sasl.oauthbearer.allowed.urls``: the broker refuses
  to fetch a JWKS (or token) URL that is not listed there, and then does not start.
- ``sasl.oauthbearer.expected.issuer``: since 4.2 ``BrokerJwtValidator`` refuses to start without
  it (or an explicit ``sasl.oauthbearer.allow.unverified.issuer=true``).

The JWKS endpoint must answer when the broker starts: it fetches the keys before it serves.
"""

from __future__ import annotations

from dataclasses import dataclass

OAUTH_LISTENER = "OAUTH"
OAUTH_MECHANISM = "OAUTHBEARER"
_PACKAGE = "org.apache.kafka.common.security.oauthbearer"
#: Checks signatures against the JWKS; the default (``ClientJwtValidator``) does not.
BROKER_JWT_VALIDATOR = f"{_PACKAGE}.BrokerJwtValidator"
ALLOWED_URLS_PROPERTY = "org.apache.kafka.sasl.oauthbearer.allowed.urls"


@dataclass(frozen=True)
class OAuthListener:
    """A SASL_PLAINTEXT listener on ``port`` taking OAUTHBEARER logins validated by the JWKS at
    ``jwks_url``, for tokens from ``issuer`` whose ``aud`` holds ``audience``.

    ``allowed_urls`` are the other URLs the broker may fetch besides the JWKS (for example the
    token endpoint, if a client in the same JVM used it); the JWKS URL is always allowed.
    """

    port: int
    jwks_url: str
    issuer: str
    audience: str
    allowed_urls: tuple[str, ...] = ()

    def ports(self) -> dict[str, int]:
        """The listener's port, as recorded in the data dir's ``rig.json``."""
        return {"oauth_port": self.port}

    def properties(self) -> dict[str, str]:
        """server.properties entries for the listener (its name and port are added by
        ``properties.server_properties``)."""
        prefix = f"listener.name.{OAUTH_LISTENER.lower()}"
        mechanism = OAUTH_MECHANISM.lower()
        return {
            f"{prefix}.sasl.enabled.mechanisms": OAUTH_MECHANISM,
            f"{prefix}.{mechanism}.sasl.jaas.config": (
                f"{_PACKAGE}.OAuthBearerLoginModule required;"
            ),
            f"{prefix}.{mechanism}.sasl.server.callback.handler.class": (
                f"{_PACKAGE}.OAuthBearerValidatorCallbackHandler"
            ),
            "sasl.oauthbearer.jwks.endpoint.url": self.jwks_url,
            "sasl.oauthbearer.expected.issuer": self.issuer,
            "sasl.oauthbearer.expected.audience": self.audience,
            "sasl.oauthbearer.jwt.validator.class": BROKER_JWT_VALIDATOR,
        }

    def jvm_opts(self) -> list[str]:
        """JVM options: the allow-list of URLs the broker may fetch."""
        urls = ",".join(dict.fromkeys((self.jwks_url, *self.allowed_urls)))
        return [f"-D{ALLOWED_URLS_PROPERTY}={urls}"]
