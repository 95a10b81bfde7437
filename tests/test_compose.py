"""deploy/compose.yaml, the local Docker rig, checked without Docker against the service and repo.

No Docker engine (nor `docker compose`) runs here, so the file is read as YAML and held to what
it wires together: the forwarder's settings, the fake Datagrid's command line, the Kafka
listeners, the Prometheus scrape job and rules, the Grafana provisioning, and the files it mounts.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from forwarder.environment import load_settings
from tests.deploy_helpers import REPO, run, setting_variables, settings_default

DEPLOY = REPO / "deploy"
COMPOSE: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]


def environment(service: str) -> dict[str, str]:
    """A service's environment (map or list form) as strings, the way the container sees it."""
    env = SERVICES[service].get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {
        key: str(value).lower() if isinstance(value, bool) else str(value)
        for key, value in env.items()
    }


def option(command: list[str], flag: str) -> str:
    """The value following ``flag`` in an exec-form command."""
    return command[command.index(flag) + 1]


def bind_mounts(service: str) -> list[tuple[Path, str]]:
    """(host path resolved from deploy/, container path) of a service's bind mounts."""
    mounts = []
    for volume in SERVICES[service].get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts.append(((DEPLOY / source).resolve(), target))
    return mounts


def test_compose_file_matches_the_compose_specification() -> None:
    """The file validates against the Compose Specification schema, which refuses misspelt keys."""
    schema = json.loads((DEPLOY / "tools" / "schemas" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    problems = [
        f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(COMPOSE)
    ]
    assert problems == []
    broken = copy.deepcopy(COMPOSE)
    broken["services"]["forwarder"]["stop_grace_periods"] = "45s"
    assert not validator.is_valid(broken)


def test_services() -> None:
    """Kafka, the fake Datagrid, the forwarder, Prometheus and Grafana are all there."""
    assert set(SERVICES) == {"kafka", "fake-datagrid", "forwarder", "prometheus", "grafana"}


def test_forwarder_environment_names_are_settings() -> None:
    """Every variable given to the forwarder is one the service reads."""
    assert set(environment("forwarder")) - setting_variables() == set()


def test_forwarder_environment_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forwarder's compose environment passes the service's own validation."""
    for name in [n for n in os.environ if n.startswith("FORWARDER_") or n == "DATAGRID_API_KEY"]:
        monkeypatch.delenv(name)
    for name, value in environment("forwarder").items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.webhook_secrets and settings.api_tokens
    assert settings.require_api_key().get_secret_value()


def test_forwarder_reaches_the_fake_datagrid() -> None:
    """The forwarder's base URL is the fake's service and port; both use the same API key."""
    command = SERVICES["fake-datagrid"]["command"]
    url = urlsplit(environment("forwarder")["FORWARDER_DATAGRID_BASE_URL"])
    assert (url.hostname, url.port, url.path) == (
        "fake-datagrid",
        int(option(command, "--port")),
        "/v1",
    )
    assert option(command, "--host") == "0.0.0.0"  # noqa: S104 - reachable from other containers
    assert option(command, "--api-key") == environment("forwarder")["DATAGRID_API_KEY"]


def test_fake_datagrid_command_is_what_the_fake_accepts() -> None:
    """The fake runs `python -m tests.support.fake_datagrid` from the mounted tests/, with valid
    flags."""
    service = SERVICES["fake-datagrid"]
    assert service["entrypoint"] == ["python", "-m", "tests.support.fake_datagrid"]
    help_text = run([sys.executable, "-m", "tests.support.fake_datagrid", "--help"]).stdout
    for flag in (arg for arg in service["command"] if arg.startswith("--")):
        assert flag in help_text, flag
    assert (REPO / "tests", f"{service['working_dir']}/tests") in bind_mounts("fake-datagrid")
    assert service["build"] == SERVICES["forwarder"]["build"], (
        "the fake runs in the forwarder's image"
    )


def test_forwarder_reaches_kafka_on_an_advertised_listener() -> None:
    """The bootstrap address is a listener Kafka advertises inside the compose network."""
    kafka = environment("kafka")
    advertised = {
        re.sub(r"^\w+://", "", item) for item in kafka["KAFKA_ADVERTISED_LISTENERS"].split(",")
    }
    assert environment("forwarder")["FORWARDER_KAFKA_BOOTSTRAP_SERVERS"] in advertised
    assert "kafka:9092" in advertised
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller", "single-node KRaft"
    assert SERVICES["forwarder"]["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_kafka_version_matches_the_test_rig() -> None:
    """The apache/kafka image is the Kafka version deploy/kafka/pom.xml pins for the test rig."""
    pinned = re.search(
        r"<kafka\.version>([^<]+)</kafka\.version>", (DEPLOY / "kafka" / "pom.xml").read_text()
    )
    assert pinned, "kafka.version not found in deploy/kafka/pom.xml"
    assert SERVICES["kafka"]["image"] == f"apache/kafka:{pinned[1]}"


def test_forwarder_runs_like_the_chart_runs_it() -> None:
    """Built from the Dockerfile; its numeric user, read-only, /tmp in tmpfs, no capabilities."""
    forwarder = SERVICES["forwarder"]
    build = forwarder["build"]
    assert (DEPLOY / build["context"]).resolve() == REPO and build["dockerfile"] == "Dockerfile"
    user = re.search(r"^USER (\S+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert user and forwarder["user"] == user[1]
    assert forwarder["read_only"] is True and forwarder["tmpfs"] == ["/tmp"]
    assert forwarder["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in forwarder["security_opt"]
    assert forwarder["command"] == ["serve"]


def test_stop_grace_period_exceeds_the_drain_timeout() -> None:
    """`docker compose stop` waits longer than FORWARDER_DRAIN_TIMEOUT_SECONDS before SIGKILL."""
    env = environment("forwarder")
    default = settings_default("FORWARDER_DRAIN_TIMEOUT_SECONDS")
    drain = float(env.get("FORWARDER_DRAIN_TIMEOUT_SECONDS", str(default)))
    grace = re.fullmatch(r"(\d+)s", SERVICES["forwarder"]["stop_grace_period"])
    assert grace and int(grace[1]) > drain


def test_prometheus_scrapes_the_forwarder_and_loads_the_rules() -> None:
    """Prometheus scrapes forwarder:<port>/metrics as job "forwarder" and loads the rules."""
    service = SERVICES["prometheus"]
    (config_ref,) = service["configs"]
    config = yaml.safe_load(COMPOSE["configs"][config_ref["source"]]["content"])
    assert f"--config.file={config_ref['target']}" in service["command"]
    (job,) = config["scrape_configs"]
    port = environment("forwarder")["FORWARDER_HTTP_PORT"]
    assert job["job_name"] == "forwarder"  # the rules' up{job="forwarder"} alerts select it
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"] == [{"targets": [f"forwarder:{port}"]}]
    rules = DEPLOY / "prometheus" / "forwarder-rules.yaml"
    assert rules.is_file(), "deploy/prometheus/forwarder-rules.yaml is missing"
    (target,) = [t for source, t in bind_mounts("prometheus") if source == rules]
    assert any(Path(target).match(pattern) for pattern in config["rule_files"])
    assert 'up{job="forwarder"}' in rules.read_text()


def test_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    """Grafana provisioning points at the compose Prometheus and the mounted dashboard."""
    mounts = dict(bind_mounts("grafana"))
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounts[provisioning] == "/etc/grafana/provisioning"
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    prometheus_port = SERVICES["prometheus"]["ports"][0].split(":")[-1]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    assert datasource["url"] == f"http://prometheus:{prometheus_port}"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "forwarder.yaml").read_text())[
        "providers"
    ]
    dashboard = DEPLOY / "grafana" / "forwarder-dashboard.json"
    assert dashboard.is_file(), "deploy/grafana/forwarder-dashboard.json is missing"
    assert Path(mounts[dashboard]).parent == Path(provider["options"]["path"])


def test_mounted_files_exist() -> None:
    """Every bind-mount source exists in the repository."""
    for service in SERVICES:
        for source, _ in bind_mounts(service):
            assert source.exists(), f"{service} mounts missing {source}"


def test_images_are_pinned() -> None:
    """Every image that is pulled has an exact version tag."""
    for name, service in SERVICES.items():
        if "build" in service:
            continue
        tag = service["image"].rpartition(":")[2]
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: {service['image']}"
