"""Kafka logins with tokens: OAUTHBEARER against a JWKS-validating broker, and AWS MSK IAM wiring.

A private broker of the Kafka rig gets an OAUTHBEARER listener (SASL_PLAINTEXT) that checks JWTs
against the JWKS of a real local token endpoint (``tests/oauth_support.py``), with Kafka's
``BrokerJwtValidator``: without it Kafka 4.x accepts a token signed by any key, so the forged
token below is the proof that signatures are checked. The forwarder gets its tokens from that
endpoint with client credentials, as it would from Keycloak or Entra ID.

MSK IAM cannot be run here (no MSK): its tests show the wiring, down to the bytes aiokafka sends,
with AWS's real signer on static credentials (it signs offline) and with a fake signer.
"""

from __future__ import annotations

import asyncio
import base64
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import rig
from aiokafka.conn import AIOKafkaConnection
from botocore.exceptions import NoCredentialsError

from forwarder.config import SecretStr, Settings
from forwarder.environment import load_settings
from forwarder.errors import ConfigError, KafkaError
from forwarder.kafka import connection_options
from forwarder.oauth import REFRESH_AT, ClientCredentials, MskIam, token_provider
from forwarder.topics import prepare_topics
from tests.oauth_support import ISSUER, TokenEndpoint, TokenPolicy, token_endpoint
from tests.support.fake_datagrid import FakeDatagrid
from tests.support.kafka_helpers import read_topic
from tests.support.service_helpers import Forwarder, forwarder_env, run_forwarder, wait_until

MakeSettings = Callable[..., Settings]
SECRET = "forwarder-client-secret"
LINES = [f'{{"custom_id":"c{i}","status":"succeeded","output":{{"n":{i}}}}}' for i in range(12)]


@pytest.fixture(scope="module")
def idp() -> Iterator[TokenEndpoint]:
    """The local OIDC token endpoint (token + JWKS); any client id with SECRET gets in."""
    with token_endpoint({}) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def oauth_broker(
    idp: TokenEndpoint, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[rig.Broker]:
    """A private broker with an OAUTHBEARER listener validating JWTs against ``idp``'s JWKS."""
    broker = rig.Broker.on_free_ports(
        tmp_path_factory.mktemp("kafka-oauth"), oauth_jwks_url=idp.jwks_url, oauth_issuer=ISSUER
    )
    try:
        broker.start(wait=180)
    except Exception as exc:
        pytest.fail(f"could not start the OAuth Kafka broker: {exc}")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def client_id(idp: TokenEndpoint) -> str:
    """A client of its own for this test (the forwarder keeps one token per client per process),
    with the endpoint back to issuing good tokens."""
    name = f"forwarder-{uuid.uuid4().hex[:8]}"
    idp.policy = TokenPolicy(clients={**idp.policy.clients, name: SECRET})
    return name


def oauth_login(broker: rig.Broker, idp: TokenEndpoint, client: str, **changes: Any) -> dict:
    """Settings fields for an OAUTHBEARER login to ``broker`` as ``client``."""
    fields: dict[str, Any] = {
        "kafka_bootstrap_servers": broker.oauth_bootstrap,
        "kafka_security_protocol": "SASL_PLAINTEXT",
        "kafka_sasl_mechanism": "OAUTHBEARER",
        "kafka_oauth_token_url": idp.token_url,
        "kafka_oauth_client_id": client,
        "kafka_oauth_client_secret": SecretStr(SECRET),
        "kafka_oauth_scope": "kafka:produce",
    }
    return {**fields, **changes}


def broker_log(broker: rig.Broker) -> str:
    return broker.server_log.read_text(errors="replace")


def test_the_rig_listener_checks_signatures_and_allow_lists_the_jwks(
    oauth_broker: rig.Broker, idp: TokenEndpoint
) -> None:
    """The broker runs with BrokerJwtValidator, the expected issuer and audience, and the JWKS URL
    in the JVM's allowed-URLs property (the two traps of Kafka 4.x)."""
    props = oauth_broker.properties()
    assert props["sasl.oauthbearer.jwt.validator.class"] == rig.BROKER_JWT_VALIDATOR
    assert props["sasl.oauthbearer.jwks.endpoint.url"] == idp.jwks_url
    assert props["sasl.oauthbearer.expected.issuer"] == ISSUER
    assert props["sasl.oauthbearer.expected.audience"] == "kafka"
    assert oauth_broker.pid is not None
    cmdline = Path(f"/proc/{oauth_broker.pid}/cmdline").read_bytes().split(b"\0")
    allowed = f"-Dorg.apache.kafka.sasl.oauthbearer.allowed.urls={idp.jwks_url}".encode()
    assert allowed in cmdline


@pytest.mark.parametrize("mode", ["at-least-once", "exactly-once"])
def test_forward_logs_in_with_oauthbearer_and_delivers(
    make_settings: MakeSettings,
    fake_datagrid: FakeDatagrid,
    oauth_broker: rig.Broker,
    idp: TokenEndpoint,
    client_id: str,
    batch_id: str,
    mode: str,
) -> None:
    """`forwarder forward` gets a token by client credentials, logs in with it, creates its
    topics and forwards a batch, in both delivery modes; the token endpoint saw the scope."""
    settings = make_settings(delivery=mode, **oauth_login(oauth_broker, idp, client_id))
    fake_datagrid.configure(batch_id, lines=LINES)
    done = run_forwarder(forwarder_env(settings), "forward", batch_id, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{batch_id}: forwarded: 12 lines" in done.stdout, done.stdout
    records = asyncio.run(read_topic(oauth_broker.bootstrap, settings.results_topic))
    assert sorted(r.key for r in records) == sorted(f"c{i}".encode() for i in range(12))
    mine = [claims for claims in idp.issued if claims["sub"] == client_id]
    # One process, several clients (admin, producers, reader): one token shared by all.
    assert len(mine) == 1, mine
    assert mine[0]["scope"] == "kafka:produce"
    assert SECRET not in done.stdout + done.stderr


REFUSED = {
    # what the token endpoint issues, what our message says, what the broker's log says
    "forged": ({"forged": True}, "expires in", "invalid signature"),
    "expired": ({"lifetime": -120}, "expired", "The JWT is no longer valid"),
    "wrong audience": ({"audience": "another-service"}, "another-service", "Audience (aud) claim"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_token_the_broker_refuses_stops_start_up_naming_the_cause(
    make_settings: MakeSettings,
    oauth_broker: rig.Broker,
    idp: TokenEndpoint,
    client_id: str,
    case: str,
) -> None:
    """A token signed by another key, an expired one, or one for another audience: the broker
    refuses it, and start-up stops with a ConfigError naming the refusal and what the token
    holds (its audience, its expiry), while the broker's log names the check that failed."""
    policy, ours, brokers = REFUSED[case]
    for name, value in policy.items():
        setattr(idp.policy, name, value)
    settings = make_settings(**oauth_login(oauth_broker, idp, client_id))
    with pytest.raises(ConfigError) as raised:
        asyncio.run(asyncio.wait_for(prepare_topics(settings), 60))
    message = str(raised.value)
    assert "refused the OAUTHBEARER token" in message, message
    assert "FORWARDER_KAFKA_OAUTH_TOKEN_URL" in message, message
    assert ours in message, message
    assert brokers in broker_log(oauth_broker)


def test_a_good_token_is_not_refused(
    make_settings: MakeSettings, oauth_broker: rig.Broker, idp: TokenEndpoint, client_id: str
) -> None:
    """The control for the refusals above: the same steps with a good token prepare the topics."""
    settings = make_settings(**oauth_login(oauth_broker, idp, client_id))
    limits = asyncio.run(asyncio.wait_for(prepare_topics(settings), 60))
    assert limits.results > 0


def test_a_token_endpoint_that_is_down_is_a_named_retriable_error(
    make_settings: MakeSettings, oauth_broker: rig.Broker, idp: TokenEndpoint, client_id: str
) -> None:
    """With nothing listening at the token URL, start-up fails with a retriable KafkaError that
    names the variable, the URL and that it is unreachable."""
    down = f"http://127.0.0.1:{rig.free_port()}/token"
    settings = make_settings(
        **oauth_login(oauth_broker, idp, client_id, kafka_oauth_token_url=down)
    )
    with pytest.raises(KafkaError) as raised:
        asyncio.run(asyncio.wait_for(prepare_topics(settings), 60))
    assert raised.value.retriable
    message = str(raised.value)
    assert f"FORWARDER_KAFKA_OAUTH_TOKEN_URL={down} is unreachable" in message, message
    assert "ConnectError" in message, message


def test_serve_waits_out_a_token_endpoint_that_is_down_then_gets_ready(
    make_settings: MakeSettings,
    oauth_broker: rig.Broker,
    idp: TokenEndpoint,
    client_id: str,
    tmp_path: Path,
) -> None:
    """`forwarder serve` started while the token endpoint is down logs startup_retry naming it and
    is not ready; once the endpoint answers (the same keys, on the same URL) it gets ready."""
    port = rig.free_port()
    url = f"http://127.0.0.1:{port}/token"
    settings = make_settings(**oauth_login(oauth_broker, idp, client_id, kafka_oauth_token_url=url))
    fwd = Forwarder(settings, tmp_path).start()
    late: TokenEndpoint | None = None
    try:
        wait_until(lambda: fwd.events("startup_retry"), 60, "startup_retry")
        retry = fwd.events("startup_retry")[0]
        assert f"FORWARDER_KAFKA_OAUTH_TOKEN_URL={url} is unreachable" in retry["error"], retry
        assert not fwd.ready()
        late = TokenEndpoint({client_id: SECRET}, key=idp.key).start(port)
        fwd.wait_ready(90)
        assert [c["sub"] for c in late.issued] == [client_id]
    finally:
        fwd.stop()
        if late is not None:
            late.stop()


def test_a_wrong_client_secret_is_a_config_error_naming_the_client_settings(
    make_settings: MakeSettings,
    fake_datagrid: FakeDatagrid,
    oauth_broker: rig.Broker,
    idp: TokenEndpoint,
    client_id: str,
    batch_id: str,
) -> None:
    """`forwarder forward` with a secret the token endpoint refuses exits 2 with one line naming
    the client id and secret variables, and never prints the secret it tried."""
    wrong = "not-the-secret-LEAKCHECK"
    settings = make_settings(
        **oauth_login(oauth_broker, idp, client_id, kafka_oauth_client_secret=SecretStr(wrong))
    )
    fake_datagrid.configure(batch_id, lines=LINES)
    done = run_forwarder(forwarder_env(settings), "forward", batch_id, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "refused the client (401 invalid_client" in done.stderr, done.stderr
    assert "FORWARDER_KAFKA_OAUTH_CLIENT_SECRET" in done.stderr, done.stderr
    assert wrong not in done.stdout + done.stderr


def test_the_token_is_reused_then_refreshed_before_it_expires(idp: TokenEndpoint) -> None:
    """The provider hands out the token it holds until 80% of its lifetime, then fetches a new
    one from the endpoint (the old one still has a fifth of its life left)."""
    client = f"refresh-{uuid.uuid4().hex[:8]}"
    idp.policy = TokenPolicy(clients={client: SECRET}, lifetime=100)
    now = [1_000_000.0]
    provider = ClientCredentials(idp.token_url, client, SecretStr(SECRET), clock=lambda: now[0])

    async def tokens() -> list[str]:
        first = await provider.token()
        now[0] += 100 * REFRESH_AT - 1
        second = await provider.token()
        now[0] += 2
        third = await provider.token()
        return [first, second, third]

    first, second, third = asyncio.run(tokens())
    assert first == second
    assert third != first
    assert len([c for c in idp.issued if c["sub"] == client]) == 2


def test_a_failed_refresh_keeps_the_valid_token(idp: TokenEndpoint) -> None:
    """When the endpoint refuses a refresh while the token held is still valid, that token is
    handed out; once it has expired, the endpoint's error is raised."""
    client = f"stale-{uuid.uuid4().hex[:8]}"
    idp.policy = TokenPolicy(clients={client: SECRET}, lifetime=100)
    now = [1_000_000.0]
    provider = ClientCredentials(idp.token_url, client, SecretStr(SECRET), clock=lambda: now[0])

    async def run() -> tuple[str, str]:
        first = await provider.token()
        idp.policy.clients.pop(client)  # the next fetch is refused
        now[0] += 90
        kept = await provider.token()
        now[0] += 20
        with pytest.raises(ConfigError, match="refused the client"):
            await provider.token()
        return first, kept

    first, kept = asyncio.run(run())
    assert kept == first


# --- settings ------------------------------------------------------------------------------


def test_oauthbearer_needs_its_token_url_client_id_and_secret() -> None:
    """OAUTHBEARER without the token URL and client secret names exactly those; no user name or
    password is asked for."""
    with pytest.raises(ConfigError) as raised:
        Settings(
            kafka_security_protocol="SASL_SSL",
            kafka_sasl_mechanism="OAUTHBEARER",
            kafka_oauth_client_id="forwarder",
        )
    message = str(raised.value)
    assert "FORWARDER_KAFKA_OAUTH_TOKEN_URL and FORWARDER_KAFKA_OAUTH_CLIENT_SECRET" in message
    assert "USERNAME" not in message and "PASSWORD" not in message


def test_the_oauth_client_secret_is_a_secret() -> None:
    """The client secret is scrubbed like the other secrets and never shown by the settings."""
    settings = Settings(kafka_oauth_client_secret=SecretStr("cs-LEAKCHECK"))
    assert "cs-LEAKCHECK" in settings.secret_values()
    assert "cs-LEAKCHECK" not in repr(settings)


@pytest.mark.parametrize(
    ("protocol", "region", "expected"),
    [
        ("SASL_PLAINTEXT", "eu-west-1", "FORWARDER_KAFKA_SECURITY_PROTOCOL=SASL_SSL"),
        ("SASL_SSL", None, "AWS_REGION (or AWS_DEFAULT_REGION)"),
    ],
)
def test_msk_iam_needs_tls_and_a_region(
    monkeypatch: pytest.MonkeyPatch, protocol: str, region: str | None, expected: str
) -> None:
    """AWS_MSK_IAM is refused over plaintext, and without an AWS region."""
    for variable in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("FORWARDER_KAFKA_SECURITY_PROTOCOL", protocol)
    monkeypatch.setenv("FORWARDER_KAFKA_SASL_MECHANISM", "AWS_MSK_IAM")
    if region:
        monkeypatch.setenv("AWS_REGION", region)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_settings()


# --- AWS MSK IAM ---------------------------------------------------------------------------


def msk_settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    """Settings for MSK IAM, the region from ``env`` (the AWS variables, as a pod gets them)."""
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings(
        kafka_bootstrap_servers="b-1.example.kafka.eu-central-1.amazonaws.com:9098",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="AWS_MSK_IAM",
    )


async def sasl_bytes(provider: Any) -> bytes:
    """What aiokafka sends as the OAUTHBEARER initial response with ``provider``."""
    connection = AIOKafkaConnection(
        "127.0.0.1", 9, sasl_mechanism="OAUTHBEARER", sasl_oauth_token_provider=provider
    )
    payload, _ = await connection.authenticator_oauth().step(None)
    return bytes(payload)


@pytest.mark.parametrize("variable", ["AWS_REGION", "AWS_DEFAULT_REGION"])
def test_msk_iam_hands_aiokafka_the_signers_token_for_the_region(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """With AWS_MSK_IAM, every client logs in with OAUTHBEARER and a provider for the region of
    the AWS variable; the token the signer returns is what aiokafka sends."""
    settings = msk_settings(monkeypatch, **{variable: "eu-central-1"})
    options = connection_options(settings)
    assert options["sasl_mechanism"] == "OAUTHBEARER"
    assert "sasl_plain_password" not in options
    provider = options["sasl_oauth_token_provider"]
    assert isinstance(provider, MskIam) and provider.region == "eu-central-1"

    asked: list[str] = []

    def signer(region: str) -> tuple[str, int]:
        asked.append(region)
        return f"signed-for-{region}", 4_102_444_800_000  # expires in 2100

    fake = MskIam(provider.region, signer=signer)
    token_provider(settings)  # installs the refusal check on aiokafka's connections
    sent = asyncio.run(sasl_bytes(fake))
    assert sent == b"n,,\x01auth=Bearer signed-for-eu-central-1\x01\x01"
    assert asked == ["eu-central-1"]


def test_msk_iam_default_signer_signs_a_connect_url_with_the_aws_credentials(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """AWS's own signer, with static credentials in the environment (it signs offline): the
    token is a SigV4-presigned kafka-cluster:Connect URL for the region, by that access key."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEOAUTHTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret-key")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    settings = msk_settings(monkeypatch, AWS_DEFAULT_REGION="ap-southeast-2")
    provider = connection_options(settings)["sasl_oauth_token_provider"]
    token = asyncio.run(provider.token())
    url = urlparse(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode())
    query = parse_qs(url.query)
    assert url.hostname == "kafka.ap-southeast-2.amazonaws.com"
    assert query["Action"] == ["kafka-cluster:Connect"]
    assert query["X-Amz-Credential"][0].startswith("AKIAEXAMPLEOAUTHTEST/")
    assert "/ap-southeast-2/kafka-cluster/" in query["X-Amz-Credential"][0]


def test_msk_iam_without_credentials_is_a_config_error() -> None:
    """A signer that finds no AWS credentials becomes a ConfigError that says so."""

    def signer(region: str) -> tuple[str, int]:
        raise NoCredentialsError()

    with pytest.raises(ConfigError, match=r"no usable AWS credentials \(NoCredentialsError\)"):
        asyncio.run(MskIam("eu-west-1", signer=signer).token())
