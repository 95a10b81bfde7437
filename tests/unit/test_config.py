"""Pure tests of the settings loader (no broker): what is a setting and what is not, and how the
Kafka settings reach the clients and the topic checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from forwarder import kafka
from forwarder.config import Settings, setting_fields
from forwarder.environment import (
    check_unknown_variables,
    known_variables,
    load_settings,
    secret_variables,
    secrets_from_files,
    service_links,
)
from forwarder.errors import ConfigError
from forwarder.kafka import (
    TopicLimits,
    connection_options,
    make_admin,
    make_job_writer,
    make_producer,
)
from forwarder.topics import min_insync_replicas, topic_config_warnings, topic_specs

#: What the kubelet injects for a Service `forwarder` (ClusterIP 10.96.0.12, port 8080 named
#: http) and one named `forwarder-metrics` (port 9090), as seen in a pod of the same namespace.
KUBERNETES_SERVICE_LINKS = {
    "FORWARDER_SERVICE_HOST": "10.96.0.12",
    "FORWARDER_SERVICE_PORT": "8080",
    "FORWARDER_SERVICE_PORT_HTTP": "8080",
    "FORWARDER_PORT": "tcp://10.96.0.12:8080",
    "FORWARDER_PORT_8080_TCP": "tcp://10.96.0.12:8080",
    "FORWARDER_PORT_8080_TCP_PROTO": "tcp",
    "FORWARDER_PORT_8080_TCP_PORT": "8080",
    "FORWARDER_PORT_8080_TCP_ADDR": "10.96.0.12",
    "FORWARDER_METRICS_SERVICE_HOST": "fd00:10:96::c",
    "FORWARDER_METRICS_SERVICE_PORT": "9090",
    "FORWARDER_METRICS_PORT": "tcp://[fd00:10:96::c]:9090",
    "FORWARDER_METRICS_PORT_9090_UDP": "udp://[fd00:10:96::c]:9090",
    "FORWARDER_METRICS_PORT_9090_SCTP_ADDR": "fd00:10:96::c",
}


def test_kubernetes_service_links_are_not_settings() -> None:
    """Variables a Service named forwarder(-*) injects pass the unknown-variable check."""
    check_unknown_variables({**KUBERNETES_SERVICE_LINKS, "FORWARDER_DELIVERY": "exactly-once"})
    assert service_links(KUBERNETES_SERVICE_LINKS) == sorted(KUBERNETES_SERVICE_LINKS)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FORWARDER_HTTPS_PORT", "8080"),  # a misspelt FORWARDER_HTTP_PORT
        ("FORWARDER_PORT", "8080"),  # a bare number is no service link
        ("FORWARDER_SERVICE_HOST", "forwarder.example"),
        ("FORWARDER_PORT_8080_TCP", "8080"),
        ("FORWARDER_PORT_8080_TCP_PROTO", "http"),
        ("FORWARDER_CONCURENCY", "4"),
    ],
)
def test_a_misspelt_setting_is_still_refused(name: str, value: str) -> None:
    """A name shaped like a service link but without a link's value is refused, naming it."""
    with pytest.raises(ConfigError, match=name):
        check_unknown_variables({**KUBERNETES_SERVICE_LINKS, name: value})


def test_load_settings_ignores_service_links(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod with the Service `forwarder`'s links loads its settings (the crash-loop of #20)."""
    for name, value in KUBERNETES_SERVICE_LINKS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FORWARDER_HTTP_PORT", "9000")
    assert load_settings().http_port == 9000


def test_a_service_link_on_a_setting_names_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Service `forwarder-http` injects FORWARDER_HTTP_PORT=tcp://...: the error says so."""
    monkeypatch.setenv("FORWARDER_HTTP_PORT", "tcp://10.96.0.40:8080")
    expected = r"FORWARDER_HTTP_PORT.*'forwarder-http'.*enableServiceLinks"
    with pytest.raises(ConfigError, match=expected):
        load_settings()


@pytest.mark.parametrize("value", ["team é", "team\x07", "a b", "\n"])
def test_a_teamspace_that_cannot_be_a_header_is_refused(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Non-ASCII, control characters or inner spaces: exit 2 naming the variable, no traceback."""
    monkeypatch.setenv("FORWARDER_DATAGRID_TEAMSPACE", value)
    with pytest.raises(ConfigError, match="FORWARDER_DATAGRID_TEAMSPACE"):
        load_settings()


def test_a_teamspace_from_a_file_loses_its_newline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A value with a trailing newline (a mounted file, `echo`) is taken without it."""
    monkeypatch.setenv("FORWARDER_DATAGRID_TEAMSPACE", "ts_123\n")
    assert load_settings().datagrid_teamspace == "ts_123"


def test_the_management_port_must_differ() -> None:
    """The management listener cannot share the main port (0 turns it off)."""
    with pytest.raises(ConfigError, match="FORWARDER_MANAGEMENT_PORT"):
        load_settings(http_port=9000, management_port=9000)
    assert load_settings(management_port=0).management_port == 0


# --- secrets from files (issue 22) -------------------------------------------------------------

SECRET_VARIABLES = (
    "DATAGRID_API_KEY",
    "FORWARDER_DATAGRID_API_KEY",
    "FORWARDER_WEBHOOK_SECRETS",
    "FORWARDER_API_TOKENS",
    "FORWARDER_KAFKA_SASL_PASSWORD",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No secret variable from the caller's environment, and no ./.env."""
    for name in SECRET_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name + "_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_every_secret_field_can_come_from_a_file() -> None:
    """Each SecretStr field, the four of 0.2 included, has its variables (and so `_FILE`s)."""
    secrets = secret_variables()
    assert {"datagrid_api_key", "webhook_secrets", "api_tokens", "kafka_sasl_password"} <= set(
        secrets
    )
    for name, field in setting_fields().items():
        assert (name in secrets) == ("SecretStr" in repr(field.kind)), name
    names = known_variables()
    for variable in [*SECRET_VARIABLES[1:]]:
        assert variable + "_FILE" in names
    check_unknown_variables({v + "_FILE": "/run/secrets/x" for v in SECRET_VARIABLES})


@pytest.mark.parametrize(
    ("variable", "field"),
    [
        ("DATAGRID_API_KEY", "datagrid_api_key"),
        ("FORWARDER_DATAGRID_API_KEY", "datagrid_api_key"),
        ("FORWARDER_KAFKA_SASL_PASSWORD", "kafka_sasl_password"),
    ],
)
def test_a_secret_is_read_from_its_file_without_the_trailing_newline(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, variable: str, field: str
) -> None:
    """`<NAME>_FILE` names a file whose content (one trailing newline stripped) is the secret."""
    path = tmp_path / "secret"
    path.write_text("s3cr3t-from-file\n")
    clean_env.setenv(variable + "_FILE", str(path))
    value = getattr(load_settings(), field)
    assert value.get_secret_value() == "s3cr3t-from-file"


def test_only_one_trailing_newline_is_stripped(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The file's last newline is dropped, and only that one (Windows' CRLF counts as one)."""
    path = tmp_path / "secret"
    path.write_bytes(b"key\r\n\n")
    assert secrets_from_files({"FORWARDER_API_TOKENS_FILE": str(path)}) == {"api_tokens": "key\r\n"}
    path.write_bytes(b"key\r\n")
    assert secrets_from_files({"FORWARDER_API_TOKENS_FILE": str(path)}) == {"api_tokens": "key"}


def test_list_secrets_from_a_file_are_comma_separated(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """FORWARDER_WEBHOOK_SECRETS_FILE holds the same comma-separated list as the variable."""
    path = tmp_path / "webhook-secrets"
    path.write_text("whsec_old,whsec_new\n")
    clean_env.setenv("FORWARDER_WEBHOOK_SECRETS_FILE", str(path))
    secrets = [s.get_secret_value() for s in load_settings().webhook_secrets]
    assert secrets == ["whsec_old", "whsec_new"]


@pytest.mark.parametrize(
    "direct", ["DATAGRID_API_KEY", "FORWARDER_DATAGRID_API_KEY", "DATAGRID_API_KEY_FILE"]
)
def test_a_secret_set_two_ways_is_refused_naming_both(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, direct: str
) -> None:
    """A key in a variable (or a second `_FILE`) beside FORWARDER_DATAGRID_API_KEY_FILE is an
    error naming both variables and neither value."""
    path = tmp_path / "key"
    path.write_text("value-in-file")
    clean_env.setenv("FORWARDER_DATAGRID_API_KEY_FILE", str(path))
    clean_env.setenv(direct, str(path) if direct.endswith("_FILE") else "value-in-variable")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert direct in message and "FORWARDER_DATAGRID_API_KEY_FILE" in message
    assert "value-in-file" not in message and "value-in-variable" not in message


def test_an_empty_variable_beside_its_file_is_not_a_conflict(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`KEY=` (compose's `${KEY:-}`) says nothing: the file is used."""
    path = tmp_path / "password"
    path.write_text("pw")
    clean_env.setenv("FORWARDER_KAFKA_SASL_PASSWORD", "")
    clean_env.setenv("FORWARDER_KAFKA_SASL_PASSWORD_FILE", str(path))
    password = load_settings().kafka_sasl_password
    assert password is not None and password.get_secret_value() == "pw"


@pytest.mark.parametrize("problem", ["missing", "directory", "not-utf8"])
def test_an_unreadable_secret_file_is_refused_naming_the_variable(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, problem: str
) -> None:
    """A missing file, a directory or undecodable bytes: an error naming the variable and the
    path, never the content."""
    path = tmp_path / "token"
    if problem == "directory":
        path.mkdir()
    elif problem == "not-utf8":
        path.write_bytes(b"tok\xff\xfeen-bytes")
    clean_env.setenv("FORWARDER_API_TOKENS_FILE", str(path))
    with pytest.raises(ConfigError, match=r"^FORWARDER_API_TOKENS_FILE: cannot read ") as caught:
        load_settings()
    assert str(path) in str(caught.value) and "en-bytes" not in str(caught.value)


def test_a_bad_secret_from_a_file_is_refused_without_echoing_it(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The same checks as a variable's value apply (a control character), naming the setting."""
    path = tmp_path / "key"
    path.write_text("dg_secret\x01tail\n")
    clean_env.setenv("DATAGRID_API_KEY_FILE", str(path))
    with pytest.raises(ConfigError, match="control") as caught:
        load_settings()
    assert "dg_secret" not in str(caught.value)


# --- Kafka producer settings and topics (issue 22) -----------------------------------------------


def test_kafka_client_settings_reach_the_client_options(
    clean_env: pytest.MonkeyPatch,
) -> None:
    """The client id defaults to the consumer group, and an explicit one wins; the codec and the
    request timeout reach the producers' and the admin client's options ('none' is aiokafka's
    None). (The broker-side proof of the codec is in tests/test_kafka_platform.py.)"""
    settings = Settings(consumer_group="team-a-forwarder")
    assert connection_options(settings)["client_id"] == "team-a-forwarder"
    named = Settings(consumer_group="g", kafka_client_id="payments-forwarder")
    assert connection_options(named)["client_id"] == "payments-forwarder"
    built: list[dict[str, object]] = []
    clean_env.setattr(kafka, "AIOKafkaProducer", lambda **options: built.append(options))
    clean_env.setattr(kafka, "AIOKafkaAdminClient", lambda **options: built.append(options))
    limits = TopicLimits(results=1_048_588, dead_letters=1_048_588)
    make_producer(Settings(kafka_compression_type="none"), limits)
    make_producer(Settings(kafka_request_timeout_ms=12_345), limits)
    make_job_writer(Settings(kafka_compression_type="lz4"))
    make_admin(Settings(kafka_request_timeout_ms=4_321))
    assert [b.get("compression_type") for b in built[:3]] == [None, "zstd", "lz4"]
    assert [b["request_timeout_ms"] for b in built] == [30_000, 12_345, 30_000, 4_321]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("FORWARDER_KAFKA_COMPRESSION_TYPE", "brotli"),
        ("FORWARDER_KAFKA_REQUEST_TIMEOUT_MS", "999"),
        ("FORWARDER_KAFKA_REQUEST_TIMEOUT_MS", "300001"),
        ("FORWARDER_RESULTS_RETENTION_HOURS", "0"),
        ("FORWARDER_DEAD_LETTER_RETENTION_HOURS", "-2"),
        ("FORWARDER_KAFKA_CLIENT_ID", ""),
    ],
)
def test_bad_kafka_platform_values_are_refused_naming_the_variable(
    clean_env: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """Out-of-range or unknown values stop start-up with the variable's name."""
    clean_env.setenv(variable, value)
    with pytest.raises(ConfigError, match=f"^{variable}: "):
        load_settings()


def test_created_topics_get_retention_and_min_insync_replicas() -> None:
    """Results and dead letters get their retention (-1 stays -1: for ever); min ISR is
    min(2, replication)."""
    specs = topic_specs(Settings(results_retention_hours=48, dead_letter_retention_hours=-1))
    assert specs["datagrid.batch-results"]["retention.ms"] == str(48 * 3_600_000)
    assert specs["datagrid.batch-results.dlq"]["retention.ms"] == "-1"
    assert [min_insync_replicas(r) for r in (1, 2, 3, 5)] == [1, 2, 2, 2]


SAFE = {"min.insync.replicas": "2", "cleanup.policy": "delete", "retention.ms": "2592000000"}


def _warnings(configs: dict[str, dict[str, str]], replication: int = 3) -> set[tuple[str, str]]:
    settings = Settings()
    found = topic_config_warnings(settings, configs, dict.fromkeys(configs, replication))
    return {(w.topic, w.config) for w in found}


def test_safe_topics_give_no_warning() -> None:
    """Min ISR 2, delete policy and retention at least the state retention: nothing to say;
    neither for -1 (kept for ever) nor for topics not described."""
    configs = {t: dict(SAFE) for t in ("datagrid.batch-results", "datagrid.batch-results.dlq")}
    configs["datagrid.batch-results.dlq"]["retention.ms"] = "-1"
    assert _warnings(configs) == set()
    assert _warnings({}) == set()


def test_each_weak_config_is_reported_on_its_topic() -> None:
    """Min ISR 1 (replicated), compaction on results, a short dead-letter retention: one
    warning each, on the right topic."""
    configs = {
        "datagrid.batch-results": {**SAFE, "cleanup.policy": "compact"},
        "datagrid.batch-results.dlq": {**SAFE, "retention.ms": str(7 * 24 * 3_600_000)},
        "datagrid.batch-jobs": {**SAFE, "min.insync.replicas": "1"},
        "datagrid.batch-state": {**SAFE, "cleanup.policy": "compact,delete"},
    }
    assert _warnings(configs) == {
        ("datagrid.batch-results", "cleanup.policy"),
        ("datagrid.batch-results.dlq", "retention.ms"),
        ("datagrid.batch-jobs", "min.insync.replicas"),
    }


def test_min_insync_replicas_1_is_fine_without_replicas() -> None:
    """On a one-replica topic min ISR 1 weakens nothing (there is no second copy to wait for)."""
    configs = {"datagrid.batch-results": {**SAFE, "min.insync.replicas": "1"}}
    assert _warnings(configs, replication=1) == set()
    assert _warnings(configs, replication=2) == {("datagrid.batch-results", "min.insync.replicas")}


def test_every_compression_setting_has_its_codec_installed() -> None:
    """Each FORWARDER_KAFKA_COMPRESSION_TYPE value has aiokafka's codec library in this venv
    (the lock's cramjam): otherwise the producer would refuse to start with it."""
    from typing import get_args

    from aiokafka import codec

    values = get_args(setting_fields()["kafka_compression_type"].kind)
    assert set(values) == {"none", "gzip", "snappy", "lz4", "zstd"}
    for value in values:
        if value != "none":
            assert getattr(codec, f"has_{value}")(), value
