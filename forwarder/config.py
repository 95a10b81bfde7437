"""Settings: one object, read from ``FORWARDER_*`` environment variables (or ``.env``), built once.

Every field has a docstring; the README's configuration table is written from them.  A bad value
stops start-up with one line naming the variable. How the environment becomes these settings
(unknown names, Kubernetes service links, secrets from files) is ``environment.py``'s.
"""

# No ``from __future__ import annotations`` here: the fields' types are objects when the class
# is made, so reading them (``setting_fields``) evaluates no strings at start-up.
import contextlib
import dataclasses
import functools
import inspect
import os
import re
import ssl
import types
import typing
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from forwarder.errors import ConfigError

ENV_PREFIX = "FORWARDER_"

#: Batch ids go into URL paths; only these characters ever reach a URL.  (``\Z``, not ``$``:
#: ``$`` also matches before a final newline, which would let "bpred_1\n" through.)
BATCH_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}\Z")


class Delivery(StrEnum):
    """Delivery guarantee of the results topic."""

    AT_LEAST_ONCE = "at-least-once"
    EXACTLY_ONCE = "exactly-once"


class SecretStr:
    """A secret setting: shown as stars in every ``repr``/``str`` (logs, tracebacks, errors),
    read only through :meth:`get_secret_value`."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        """The secret itself, for the one place that needs it."""
        return self._value

    def __repr__(self) -> str:
        return f"SecretStr({str(self)!r})"

    def __str__(self) -> str:
        return "**********" if self._value else ""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretStr) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class Bounds:
    """A numeric setting's range (``Annotated[int, Bounds(ge=1)]``)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def problem(self, value: float) -> str | None:
        """Why ``value`` is out of range, or None."""
        if self.gt is not None and not value > self.gt:
            return f"must be more than {self.gt:g}"
        if self.ge is not None and not value >= self.ge:
            return f"must be at least {self.ge:g}"
        if self.le is not None and not value <= self.le:
            return f"must be at most {self.le:g}"
        return None


@dataclass(frozen=True, slots=True)
class Length:
    """A text setting's length in characters (``Annotated[str, Length(min_length=1)]``)."""

    min_length: int = 0
    max_length: int | None = None

    def problem(self, value: str) -> str | None:
        """Why ``value`` is too short or too long, or None."""
        if len(value) < self.min_length:
            return f"must have at least {self.min_length} characters"
        if self.max_length is not None and len(value) > self.max_length:
            return f"must have at most {self.max_length} characters"
        return None


#: Settings read from more than their ``FORWARDER_<NAME>`` variable (first found wins).
ALIASES: dict[str, tuple[str, ...]] = {
    "datagrid_api_key": ("FORWARDER_DATAGRID_API_KEY", "DATAGRID_API_KEY"),
    "AWS_REGION": ("AWS_REGION", "AWS_DEFAULT_REGION"),
}

_TRUE = frozenset({"1", "true", "yes", "on", "t", "y"})
_FALSE = frozenset({"0", "false", "no", "off", "f", "n"})


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the forwarder can be told, validated once at start.

    Built from values typed or as the environment spells them (``"8080"``, ``"true"``, a
    comma-separated list): each is converted and checked in ``__post_init__``, and every problem
    is named by its variable in one :class:`ConfigError`, never echoing a value (it may be a
    secret).  A plain dataclass, not a validation library: ``forwarder forward`` starts in a
    fraction of the time (``tests/unit/test_imports.py``).
    """

    # --- Datagrid (upstream) ---------------------------------------------------------------
    datagrid_api_key: SecretStr | None = None
    """Datagrid API key (`DATAGRID_API_KEY` also accepted). Required by `serve` and `forward`."""

    datagrid_base_url: str = "https://api.datagrid.com/v1"
    """Datagrid API base URL, up to and including `/v1`."""

    datagrid_teamspace: str | None = None
    """Optional `Datagrid-Teamspace` header, for account-scoped API keys."""

    datagrid_connect_timeout: Annotated[float, Bounds(gt=0)] = 5.0
    """Seconds to open a connection to Datagrid."""

    datagrid_read_timeout: Annotated[float, Bounds(gt=0)] = 60.0
    """Seconds without a byte from Datagrid before a stream counts as stalled and is retried."""

    datagrid_requests_per_minute: Annotated[float, Bounds(ge=0)] = 180.0
    """Most requests per minute to each Datagrid endpoint from this process: a window per pod, not
    shared (N pods may send N times as many). Pods share Datagrid's own limit (200 per 60 s per
    teamspace, endpoint and method) only by pausing when a response says it is used up
    (`X-RateLimit-Remaining: 0` until `X-RateLimit-Reset`, or a 429's `Retry-After`). Against an
    upstream without `X-RateLimit-*` headers, N pods send up to N times this rate; each 429 pauses
    that pod's endpoint for its `Retry-After` (1 s without one) and costs the batch one of its
    `FORWARDER_MAX_ATTEMPTS`. 0 turns this window off (the pauses stay)."""

    # --- Kafka -----------------------------------------------------------------------------
    kafka_bootstrap_servers: str = "localhost:9092"
    """Comma-separated `host:port` list of Kafka brokers."""

    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """Kafka security protocol."""

    kafka_sasl_mechanism: (
        Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "AWS_MSK_IAM"] | None
    ) = None
    """SASL mechanism when the protocol is SASL_*: `PLAIN` and `SCRAM-*` log in with a user name
    and password, `OAUTHBEARER` with a token from an OIDC token endpoint (client id and secret),
    `AWS_MSK_IAM` with the pod's AWS role or keys (needs `SASL_SSL` and `AWS_REGION`)."""

    kafka_sasl_username: str | None = None
    """SASL user name."""

    kafka_sasl_password: SecretStr | None = None
    """SASL password."""

    kafka_oauth_token_url: str | None = None
    """OAUTHBEARER: the OIDC token endpoint, where the client id and secret are exchanged for a
    token."""

    kafka_oauth_client_id: str | None = None
    """OAUTHBEARER: client id at the token endpoint."""

    kafka_oauth_client_secret: SecretStr | None = None
    """OAUTHBEARER: client secret at the token endpoint."""

    kafka_oauth_scope: str | None = None
    """OAUTHBEARER: scope to ask the token endpoint for (space-separated), if it wants one."""

    # Named as the variable (see env_name): AWS's own, read by every AWS SDK, not FORWARDER_*.
    AWS_REGION: str | None = None
    """AWS_MSK_IAM: the cluster's AWS region (`AWS_DEFAULT_REGION` also accepted)."""

    kafka_ssl_cafile: str | None = None
    """CA bundle (PEM) that signed the brokers' certificates."""

    kafka_ssl_certfile: str | None = None
    """Client certificate (PEM) for mutual TLS."""

    kafka_ssl_keyfile: str | None = None
    """Client private key (PEM) for mutual TLS."""

    kafka_create_topics: bool = True
    """Create missing topics at start; with `false` a missing topic stops start-up."""

    kafka_topic_partitions: Annotated[int, Bounds(ge=1)] = 6
    """Partitions of topics the forwarder creates."""

    kafka_replication_factor: Annotated[int, Bounds(ge=-1)] = -1
    """Replication factor of topics the forwarder creates (-1: 3, or fewer if the cluster is
    smaller)."""

    kafka_compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "zstd"
    """Compression of the record batches the forwarder writes (results, dead letters, jobs,
    state). `zstd` by measurement (`bench/RESULTS.md`, Compression): the fewest bytes of all
    codecs (4.3x fewer than none on text-like results) for about 1.5 CPU-s more per million
    lines; consumers need a client that reads zstd (Java 2.1+, librdkafka 1.0+)."""

    kafka_client_id: Annotated[str | None, Length(min_length=1, max_length=249)] = None
    """Client id in broker logs, metrics and quotas; default: the consumer group, which already
    tells two installs on one cluster apart and is the same for every pod of one install."""

    kafka_request_timeout_ms: Annotated[int, Bounds(ge=1000, le=300_000)] = 30_000
    """How long the producers and the admin client wait for a broker's answer before the request
    counts as failed and is retried (the consumers keep aiokafka's own timeouts)."""

    kafka_linger_ms: Annotated[int, Bounds(ge=0)] = 5
    """Producer linger: how long a batch waits for more records."""

    kafka_batch_bytes: Annotated[int, Bounds(ge=1024)] = 262_144
    """Producer batch size in bytes (capped at the results topic's message limit)."""

    kafka_transaction_timeout_ms: Annotated[int, Bounds(ge=1000)] = 900_000
    """Exactly-once: how long a batch's transaction may stay open; at most the brokers'
    `transaction.max.timeout.ms` (15 minutes by default), and longer than the batch timeout."""

    kafka_session_timeout_ms: Annotated[int, Bounds(ge=6000, le=1_800_000)] = 10_000
    """Consumer group session timeout: how long a silent pod keeps its jobs partitions (heartbeats
    every third of it)."""

    kafka_group_instance_id: Annotated[str | None, Length(min_length=1, max_length=249)] = None
    """Static group membership: a stable id per pod (for example the pod name), so that a restart
    within the session timeout moves no partition."""

    results_topic: str = "datagrid.batch-results"
    """Topic receiving one message per result line (key `custom_id`)."""

    jobs_topic: str = "datagrid.batch-jobs"
    """Durable queue of batches to forward (key: batch id)."""

    dead_letter_topic: str = "datagrid.batch-results.dlq"
    """Topic receiving lines that cannot be forwarded, with the reason in headers."""

    results_retention_hours: float = 720.0
    """`retention.ms` of the results topic when the forwarder creates it (-1: kept for ever):
    how long a consumer may be down without losing results. As long as the state retention, so
    a batch the forwarder remembers as forwarded can still be read."""

    dead_letter_retention_hours: float = 2160.0
    """`retention.ms` of the dead-letter topic when the forwarder creates it (-1: kept for ever):
    dead letters wait for a person, and are few; 90 days outlasts holidays and quarter ends."""

    state_topic: str = "datagrid.batch-state"
    """Compacted topic holding each batch's latest forwarding state."""

    consumer_group: str = "datagrid-forwarder"
    """Consumer group of the workers on the jobs topic."""

    delivery: Delivery = Delivery.AT_LEAST_ONCE
    """`at-least-once` (idempotent producer) or `exactly-once` (Kafka transactions)."""

    cloudevents: bool = True
    """CloudEvents binary-mode headers (`ce_*`) on every results and dead-letter record. They
    cost about 230 bytes a record before compression and measurably more CPU per line
    (`bench/RESULTS.md`); `false` leaves them out for consumers that read only the `datagrid-*`
    headers."""

    # --- Work --------------------------------------------------------------------------------
    concurrency: Annotated[int, Bounds(ge=1, le=256)] = 4
    """Batches in flight per process."""

    max_in_flight_bytes: Annotated[int, Bounds(ge=65_536)] = 16 * 1024 * 1024
    """Bytes of lines handed to Kafka but not yet acknowledged, per batch, before reading waits."""

    max_attempts: Annotated[int, Bounds(ge=1)] = 8
    """Attempts per batch on retriable failures (5xx, 429, timeouts, broken streams)."""

    retry_base_seconds: Annotated[float, Bounds(gt=0)] = 1.0
    """First retry delay; doubles each attempt, with jitter."""

    retry_max_seconds: Annotated[float, Bounds(gt=0)] = 60.0
    """Cap on one retry delay (also caps honoured `Retry-After`)."""

    not_ready_poll_seconds: Annotated[float, Bounds(gt=0)] = 30.0
    """Longest wait between polls of a batch that is not terminal yet."""

    drain_timeout_seconds: Annotated[float, Bounds(ge=0)] = 30.0
    """On SIGTERM, how long in-flight batches may finish before they are abandoned uncommitted."""

    batch_timeout_seconds: Annotated[float, Bounds(gt=0)] = 600.0
    """Deadline of one batch, all its attempts included: past it the batch fails (`batch_timeout`)
    and frees its slot."""

    reconcile_interval_seconds: Annotated[float, Bounds(ge=0)] = 300.0
    """How often `serve` lists recent batches and queues terminal ones never forwarded (a lost
    webhook loses no batch); 0 turns the reconciler off."""

    reconcile_lookback_hours: Annotated[float, Bounds(gt=0)] = 72.0
    """How far back the reconciler looks (batches created earlier are left alone)."""

    state_retention_hours: Annotated[float, Bounds(gt=0)] = 720.0
    """How long a finished batch's state is kept (in memory and, for topics the forwarder creates,
    on the broker); longer than Datagrid keeps results. Waiting batches are always kept."""

    # --- HTTP --------------------------------------------------------------------------------
    http_host: str = "0.0.0.0"  # noqa: S104 - a service in a pod listens on all interfaces.
    """Address the HTTP server binds."""

    http_port: Annotated[int, Bounds(ge=1, le=65_535)] = 8080
    """Port of the webhook, API, health and metrics routes."""

    management_port: Annotated[int, Bounds(ge=0, le=65_535)] = 8081
    """Port of a second listener for `/healthz`, `/readyz` and `/metrics` alone, without the
    connection cap of the main port (probes keep answering when webhooks crowd it); 0 turns it
    off (those routes are also served on the main port)."""

    webhook_secrets: list[SecretStr] = field(default_factory=list)
    """Comma-separated Datagrid webhook secrets; any one verifies (rotation). Required by
    `serve`."""

    webhook_tolerance_seconds: Annotated[int, Bounds(ge=1)] = 300
    """Largest accepted age (or future skew) of a webhook signature timestamp."""

    webhook_max_body_bytes: Annotated[int, Bounds(ge=1024)] = 1_048_576
    """Largest accepted webhook body; larger ones get 413 without being read in full."""

    http_request_timeout_seconds: Annotated[float, Bounds(gt=0)] = 10.0
    """Most seconds a client may take to send a request's headers and body (slow clients are cut
    off with 408)."""

    http_max_connections: Annotated[int, Bounds(ge=1)] = 512
    """Most HTTP connections and requests served at once; more are refused with 503."""

    api_tokens: list[SecretStr] = field(default_factory=list)
    """Comma-separated bearer tokens for `/v1/batches`; without any, those routes refuse all."""

    # --- Logs --------------------------------------------------------------------------------
    log_format: Literal["json", "console"] = "json"
    """`json` (one object per line) or `console` (for humans)."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Lowest level logged."""

    def __post_init__(self) -> None:
        problems = []
        for name, setting in setting_fields().items():
            try:
                value = getattr(self, name)
                for step in _BEFORE.get(name, ()):
                    value = step(value)
                value = _convert(setting.kind, value)
                for step in _AFTER.get(name, ()):
                    value = step(value)
            except ValueError as exc:
                problems.append(f"{env_name(name)}: {exc}")
                continue
            object.__setattr__(self, name, value)
        if not problems:
            checks = (self._ports_differ, self._transaction_outlives_batch, self._sasl)
            problems = [problem for check in checks if (problem := check()) is not None]
        if problems:
            raise ConfigError("; ".join(problems))

    def _ports_differ(self) -> str | None:
        if self.management_port == self.http_port:
            return "FORWARDER_MANAGEMENT_PORT must differ from FORWARDER_HTTP_PORT (0 turns it off)"
        return None

    def _transaction_outlives_batch(self) -> str | None:
        if (
            self.delivery is Delivery.EXACTLY_ONCE
            and self.batch_timeout_seconds * 1000 >= self.kafka_transaction_timeout_ms
        ):
            return (
                "FORWARDER_BATCH_TIMEOUT_SECONDS must be shorter than "
                "FORWARDER_KAFKA_TRANSACTION_TIMEOUT_MS in exactly-once mode, or the broker "
                "aborts the transaction of a slow batch"
            )
        return None

    def check_files(self) -> None:
        """Every file setting exists, is readable and parses, or a :class:`ConfigError` names the
        variable (called at start, where the files are: not when settings are merely built)."""
        files = {
            "FORWARDER_KAFKA_SSL_CAFILE": self.kafka_ssl_cafile,
            "FORWARDER_KAFKA_SSL_CERTFILE": self.kafka_ssl_certfile,
            "FORWARDER_KAFKA_SSL_KEYFILE": self.kafka_ssl_keyfile,
        }
        for variable, value in files.items():
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"{variable}: {value} does not exist or is not a file")
            if value is not None and not os.access(value, os.R_OK):
                raise ConfigError(f"{variable}: {value} is not readable")
        if bool(self.kafka_ssl_certfile) != bool(self.kafka_ssl_keyfile):
            raise ConfigError(
                "FORWARDER_KAFKA_SSL_CERTFILE and FORWARDER_KAFKA_SSL_KEYFILE go together"
            )
        if not any(files.values()):
            return
        # Not a default context: loading the system's CA store is for connecting, not this.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            if self.kafka_ssl_cafile:
                context.load_verify_locations(cafile=self.kafka_ssl_cafile)
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(
                f"FORWARDER_KAFKA_SSL_CAFILE: {self.kafka_ssl_cafile} is not a PEM CA bundle "
                f"({type(exc).__name__})"
            ) from None
        try:
            if self.kafka_ssl_certfile:
                context.load_cert_chain(self.kafka_ssl_certfile, self.kafka_ssl_keyfile)
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(
                "FORWARDER_KAFKA_SSL_CERTFILE/FORWARDER_KAFKA_SSL_KEYFILE: not a matching PEM "
                f"certificate and private key ({type(exc).__name__})"
            ) from None

    def secret_values(self) -> list[str]:
        """Every configured secret, for scrubbing error details."""
        secrets = [*self.webhook_secrets, *self.api_tokens]
        secrets += [
            s
            for s in (
                self.datagrid_api_key,
                self.kafka_sasl_password,
                self.kafka_oauth_client_secret,
            )
            if s is not None
        ]
        return [s.get_secret_value() for s in secrets if s.get_secret_value()]

    def _sasl(self) -> str | None:
        """Each SASL mechanism has the settings it logs in with (and only MSK IAM needs TLS)."""
        if not self.kafka_security_protocol.startswith("SASL"):
            return None
        mechanism = self.kafka_sasl_mechanism
        if mechanism is None:
            return "FORWARDER_KAFKA_SECURITY_PROTOCOL is SASL_*: set FORWARDER_KAFKA_SASL_MECHANISM"
        needed: dict[str, object]
        if mechanism == "OAUTHBEARER":
            needed = {
                "FORWARDER_KAFKA_OAUTH_TOKEN_URL": self.kafka_oauth_token_url,
                "FORWARDER_KAFKA_OAUTH_CLIENT_ID": self.kafka_oauth_client_id,
                "FORWARDER_KAFKA_OAUTH_CLIENT_SECRET": self.kafka_oauth_client_secret,
            }
        elif mechanism == "AWS_MSK_IAM":
            needed = {"AWS_REGION (or AWS_DEFAULT_REGION)": self.AWS_REGION}
        else:
            needed = {
                "FORWARDER_KAFKA_SASL_USERNAME": self.kafka_sasl_username,
                "FORWARDER_KAFKA_SASL_PASSWORD": self.kafka_sasl_password,
            }
        missing = [name for name, value in needed.items() if not value]
        if missing:
            return f"FORWARDER_KAFKA_SASL_MECHANISM is {mechanism}: set {' and '.join(missing)}"
        # MSK's IAM listener (port 9098) is TLS only; a signed token in the clear is a replayable
        # credential for its lifetime.
        if mechanism == "AWS_MSK_IAM" and self.kafka_security_protocol != "SASL_SSL":
            return (
                "FORWARDER_KAFKA_SASL_MECHANISM is AWS_MSK_IAM: set "
                "FORWARDER_KAFKA_SECURITY_PROTOCOL=SASL_SSL (MSK takes IAM logins over TLS only)"
            )
        return None

    def require_api_key(self) -> SecretStr:
        """The Datagrid API key, or a :class:`ConfigError` naming the variable."""
        if self.datagrid_api_key is None or not self.datagrid_api_key.get_secret_value():
            raise ConfigError("DATAGRID_API_KEY (or FORWARDER_DATAGRID_API_KEY) is not set")
        return self.datagrid_api_key


def env_name(name: str) -> str:
    """The environment variable that sets setting ``name`` (an upper-case name is one already)."""
    return name if name.isupper() else f"{ENV_PREFIX}{name.upper()}"


@dataclass(frozen=True, slots=True)
class SettingField:
    """One setting: its type (with its checks), default and the variables that set it."""

    name: str
    kind: Any
    default: object
    #: The variables that set it, the preferred first (any one may be used).
    variables: tuple[str, ...]

    @property
    def secret(self) -> bool:
        """Whether it holds a secret (alone or in a list): never logged, readable from a file."""
        return _holds(self.kind, SecretStr)


def _holds(kind: Any, target: type) -> bool:
    """Whether the type ``kind`` is ``target`` or has it among its arguments, at any depth."""
    return kind is target or any(_holds(arg, target) for arg in get_args(kind))


@functools.cache
def setting_fields() -> dict[str, SettingField]:
    """Every setting, in declaration order."""
    fields = {}
    for item in dataclasses.fields(Settings):
        factory = item.default_factory
        default = factory() if factory is not dataclasses.MISSING else item.default
        variables = ALIASES.get(item.name, (env_name(item.name),))
        fields[item.name] = SettingField(item.name, item.type, default, variables)
    return fields


@functools.cache
def setting_docs() -> dict[str, str]:
    """Each setting's description: the docstring under its declaration (read from the source,
    only for ``--help`` and the README's table)."""
    import ast

    body = ast.parse(inspect.getsource(Settings)).body[0]
    assert isinstance(body, ast.ClassDef)
    docs = {}
    for statement, following in zip(body.body, body.body[1:], strict=False):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[statement.target.id] = inspect.cleandoc(following.value.value)
    return docs


def _convert(kind: Any, value: object) -> object:  # noqa: C901 - one case per type
    """``value`` (typed, or as the environment spells it) as a ``kind``; a ValueError says why
    not, without the value."""
    origin = get_origin(kind)
    if origin is Annotated:
        base, *checks = get_args(kind)
        value = _convert(base, value)
        for check in checks:
            if value is not None and (problem := check.problem(value)) is not None:
                raise ValueError(problem)
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (member,) = [arg for arg in get_args(kind) if arg is not type(None)]
        return _convert(member, value)
    if origin is Literal:
        if value not in get_args(kind):
            raise ValueError(f"must be one of {', '.join(map(str, get_args(kind)))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError("must be a comma-separated list")
        return [_convert(get_args(kind)[0], item) for item in value]
    if isinstance(value, str):
        value = value.strip() if kind in (bool, int, float) else value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError("must be true or false")
    if kind in (int, float) and not isinstance(value, bool):
        if isinstance(value, int) or (kind is float and isinstance(value, float)):
            return kind(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return kind(value)
        raise ValueError("must be a whole number" if kind is int else "must be a number")
    if isinstance(kind, type) and issubclass(kind, StrEnum):
        if isinstance(value, str) and value in set(kind):
            return kind(value)
        raise ValueError(f"must be one of {', '.join(kind)}")
    if kind is SecretStr:
        if isinstance(value, str):
            return SecretStr(value)
        if isinstance(value, SecretStr):
            return value
    if kind is str and isinstance(value, str):
        return value
    raise ValueError(f"must be {getattr(kind, '__name__', kind)}")


def _split_csv(value: object) -> object:
    """Read a comma-separated variable as a list (blank items dropped)."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _secret(value: object) -> object:
    """Surrounding white space is dropped (a Secret made with `echo ... | base64` ends in a
    newline); what remains must be printable ASCII, since it goes into HTTP headers and Kafka's
    SASL exchange."""
    if isinstance(value, list):
        return [_secret(item) for item in value]
    raw = value.get_secret_value() if isinstance(value, SecretStr) else value
    if not isinstance(raw, str):
        return value
    stripped = raw.strip()
    if not stripped and raw:
        raise ValueError("is only white space")
    if not all(" " <= char <= "~" for char in stripped):
        raise ValueError("holds a control or non-ASCII character")
    return stripped


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


def _retention(value: float) -> float:
    if value != -1 and not value > 0:
        raise ValueError("must be more than 0 hours, or -1 to keep records for ever")
    return value


def _teamspace(value: str | None) -> str | None:
    """It goes into an HTTP header: surrounding white space (a file's newline) is dropped, and
    what remains must be printable ASCII."""
    if value is None:
        return None
    stripped = value.strip()
    if not stripped or not all(" " < char <= "~" for char in stripped):
        raise ValueError("must be printable ASCII without spaces (it is an HTTP header)")
    return stripped


def _base_url(value: str) -> str:
    if not re.match(r"^https?://[^/\s]+", value):
        raise ValueError("must be an http(s) URL")
    return value.rstrip("/")


def _token_url(value: str | None) -> str | None:
    if value is not None and not re.match(r"^https?://[^/\s]+\S*\Z", value):
        raise ValueError("must be an http(s) URL")
    return value


def _bootstrap(value: str) -> str:
    for server in value.split(","):
        if not re.match(r"^\s*[^\s:]+:\d+\s*$", server):
            raise ValueError(f"expected host:port[,host:port...], got {server!r}")
    return value


_Step = typing.Callable[[Any], Any]
#: Steps on a setting's value before it is converted to its type, and after.
_BEFORE: dict[str, tuple[_Step, ...]] = {
    "webhook_secrets": (_split_csv, _secret),
    "api_tokens": (_split_csv, _secret),
    "datagrid_api_key": (_secret,),
    "kafka_sasl_password": (_secret,),
    "kafka_oauth_client_secret": (_secret,),
    "log_level": (_upper,),
}
_AFTER: dict[str, tuple[_Step, ...]] = {
    "results_retention_hours": (_retention,),
    "dead_letter_retention_hours": (_retention,),
    "datagrid_teamspace": (_teamspace,),
    "datagrid_base_url": (_base_url,),
    "kafka_oauth_token_url": (_token_url,),
    "kafka_bootstrap_servers": (_bootstrap,),
}
