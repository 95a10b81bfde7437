"""Pure tests of the settings loader (no broker): what is a setting and what is not."""

from __future__ import annotations

import pytest

from forwarder.config import check_unknown_variables, load_settings, service_links
from forwarder.errors import ConfigError

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
