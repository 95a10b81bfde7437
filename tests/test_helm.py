"""The Helm chart (helm/forwarder): lint, render every ci/ scenario, validate, hold it to the app.

Each ``ci/*-values.yaml`` scenario is rendered for the oldest Kubernetes the chart supports (its
``kubeVersion``) and for the newest whose schemas ``kubernetes-validate`` ships. Built-in kinds are
validated with ``kubernetes-validate`` (strict: unknown fields fail); the custom resources
(ServiceMonitor, PrometheusRule, ScaledObject, TriggerAuthentication) with ``kubeconform`` against
the CRD schemas vendored in ``deploy/tools/schemas/crds`` (nothing can be downloaded at test time).
Then the rendered objects are checked against the service itself: its routes, its settings, its
drain timeout, its image's user.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shutil
import tarfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from forwarder.app import Services, create_app
from forwarder.cli import build_parser
from forwarder.config import SecretStr, Settings, setting_fields
from forwarder.environment import describe_variables, env_name, load_settings
from forwarder.observability import Metrics
from forwarder.server import create_management_app
from forwarder.topics import min_insync_replicas, topic_specs
from tests.deploy_helpers import REPO, run, setting_variables, settings_default, tool

CHART = REPO / "helm" / "forwarder"
SCENARIOS = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
CRD_SCHEMAS = REPO / "deploy" / "tools" / "schemas" / "crds"
#: Kinds the chart may render from CRDs, validated by kubeconform against CRD_SCHEMAS.
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject", "TriggerAuthentication"}
#: deploy/ files the chart ships as copies (Helm's .Files sees only files inside the chart).
SHIPPED_FILES = {
    "deploy/grafana/forwarder-dashboard.json": "files/grafana/forwarder-dashboard.json",
    "deploy/prometheus/forwarder-rules.yaml": "files/prometheus/forwarder-rules.yaml",
}
RELEASE, NAMESPACE = "fwd", "datagrid"
#: FORWARDER_KAFKA_SASL_MECHANISM -> the KEDA Kafka scaler's `sasl` parameter.
KEDA_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
#: Settings that name files mounted into the pod.
TLS_FILE_VARIABLES = (
    "FORWARDER_KAFKA_SSL_CAFILE",
    "FORWARDER_KAFKA_SSL_CERTFILE",
    "FORWARDER_KAFKA_SSL_KEYFILE",
)
#: Credentials the ci/ scenarios use: they must only ever appear inside Secrets.
SECRET_VALUES = ("dg-test-key", "whsec-test", "whsec-new", "token-a", "sasl-secret")

MIN_KUBE = re.sub(
    r"^>=\s*([0-9.]+).*$", r"\1", yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
)
MAX_KUBE = kubernetes_validate.latest_version()
KUBE_VERSIONS = (MIN_KUBE, MAX_KUBE)


# --- rendering ------------------------------------------------------------------------------------


def _helm_env(tmp: Path) -> dict[str, str]:
    """Keep helm's config, cache and data out of the developer's home."""
    return {f"HELM_{kind}_HOME": str(tmp / kind.lower()) for kind in ("CACHE", "CONFIG", "DATA")}


def helm(*args: str, tmp: Path | None = None) -> str:
    """Run helm with a private home; return stdout (an AssertionError carries its stderr)."""
    home = tmp or REPO / ".cache" / "helm-test-home"
    return run([tool("helm"), *args], env=_helm_env(home)).stdout


def values_args(scenario: str | None, *sets: str) -> list[str]:
    """``-f ci/<scenario>`` plus ``--set`` pairs."""
    args = ["-f", str(CHART / "ci" / scenario)] if scenario else []
    for pair in sets:
        args += ["--set", pair]
    return args


@functools.cache
def render(
    scenario: str | None,
    kube: str = MAX_KUBE,
    sets: tuple[str, ...] = (),
    namespace: str = NAMESPACE,
) -> tuple[dict[str, Any], ...]:
    """The objects ``helm template`` renders (tests too) for a scenario and Kubernetes version."""
    out = helm(
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        namespace,
        "--kube-version",
        kube,
        *values_args(scenario, *sets),
    )
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def render_fails(*sets: str, scenario: str | None = "default-values.yaml") -> str:
    """helm template's error message for values it must refuse."""
    with pytest.raises(AssertionError) as failure:
        render(scenario, MAX_KUBE, tuple(sets))
    return str(failure.value)


def only(objects: tuple[dict[str, Any], ...], kind: str, name_suffix: str = "") -> dict[str, Any]:
    """The one object of ``kind`` (whose name ends with ``name_suffix``)."""
    found = [
        o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)
    ]
    assert len(found) == 1, (
        f"expected one {kind}*{name_suffix}, got {[o['metadata']['name'] for o in found]}"
    )
    return found[0]


def workload(objects: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Deployment's pod spec and its forwarder container (sidecars aside)."""
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "forwarder"]
    return pod, container


def configmap_data(objects: tuple[dict[str, Any], ...]) -> dict[str, str]:
    """The settings ConfigMap's data (not the dashboard's)."""
    _, container = workload(objects)
    name = container["envFrom"][0]["configMapRef"]["name"]
    (configmap,) = [
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name
    ]
    data: dict[str, str] = configmap["data"]
    return data


def all_scenarios_and_versions() -> Iterator[tuple[str, str]]:
    for scenario in SCENARIOS:
        for kube in KUBE_VERSIONS:
            yield scenario, kube


@functools.cache
def app_routes() -> frozenset[tuple[str, str]]:
    """(method, path) of every route the service serves, read from the app itself."""
    settings = Settings(webhook_secrets=[SecretStr("w")], datagrid_api_key=SecretStr("k"))
    app = create_app(settings)
    return frozenset((method, route.path) for route in app.routes for method in route.methods)


def management_routes() -> frozenset[tuple[str, str]]:
    """(method, path) of every route the management listener serves, read from its app."""
    settings = Settings(webhook_secrets=[SecretStr("w")], datagrid_api_key=SecretStr("k"))
    app = create_management_app(
        Services(settings, Metrics(CollectorRegistry(), process=False), [], [])
    )
    return frozenset((method, route.path) for route in app.routes for method in route.methods)


def test_management_port_off_puts_probes_back_on_http() -> None:
    """FORWARDER_MANAGEMENT_PORT=0: probes and scrapes use the HTTP port, which serves them too."""
    objects = render("all-features-values.yaml", sets=("config.FORWARDER_MANAGEMENT_PORT=0",))
    _, container = workload(objects)
    assert [p["name"] for p in container["ports"]] == ["http"]
    assert {container[k]["httpGet"]["port"] for k in ("startupProbe", "readinessProbe")} == {"http"}
    assert only(objects, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "http"
    assert management_routes() <= app_routes()


# --- lint, schemas -------------------------------------------------------------------------------


def test_scenarios_cover_the_required_cases() -> None:
    """ci/ has the defaults, all-features, existing-secret and SASL/TLS Kafka scenarios."""
    assert {
        "default-values.yaml",
        "all-features-values.yaml",
        "existing-secret-values.yaml",
        "kafka-sasl-tls-values.yaml",
    } <= set(SCENARIOS)


@pytest.mark.parametrize("scenario", [None, *SCENARIOS])
def test_helm_lint_strict(scenario: str | None) -> None:
    """`helm lint --strict` passes with the chart's defaults and with every ci/ scenario."""
    out = helm("lint", "--strict", str(CHART), "--kube-version", MIN_KUBE, *values_args(scenario))
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize(("scenario", "kube"), list(all_scenarios_and_versions()))
def test_rendered_objects_are_valid_kubernetes(scenario: str, kube: str) -> None:
    """Every rendered object validates strictly: built-in kinds per Kubernetes version, CRDs too."""
    objects = render(scenario, kube)
    custom = [o for o in objects if o["kind"] in CUSTOM_KINDS]
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, kube, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{obj['kind']}/{obj['metadata']['name']} on {kube}: {exc.message}"
                f" at {list(exc.path)}"
            )
    if custom:
        kubeconform(custom)


def kubeconform(objects: list[dict[str, Any]]) -> str:
    """Validate custom resources with kubeconform against the vendored CRD schemas (strict)."""
    return run(
        [
            tool("kubeconform"),
            "-strict",
            "-summary",
            "-schema-location",
            f"{CRD_SCHEMAS}/{{{{.Group}}}}/{{{{.ResourceKind}}}}_{{{{.ResourceAPIVersion}}}}.json",
        ],
        input=yaml.safe_dump_all(objects),
    ).stdout


def test_validators_reject_a_misspelt_field() -> None:
    """Both validators are strict: a misspelt field fails (the API server would drop it)."""
    objects = render("all-features-values.yaml")
    deployment = json.loads(json.dumps(only(objects, "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, MAX_KUBE, strict=True)
    monitor = only(objects, "ServiceMonitor")
    assert "Valid: 1" in kubeconform([monitor])
    broken = json.loads(json.dumps(monitor))
    broken["spec"]["endpoints"][0]["scrapeInterval"] = "30s"
    with pytest.raises(AssertionError, match="scrapeInterval"):
        kubeconform([broken])


def test_every_crd_kind_has_a_vendored_schema() -> None:
    """Each custom kind the chart renders has a schema file, so none is silently unvalidated."""
    rendered = {
        (o["apiVersion"], o["kind"])
        for s in SCENARIOS
        for o in render(s)
        if o["kind"] in CUSTOM_KINDS
    }
    assert {kind for _, kind in rendered} == CUSTOM_KINDS
    for api_version, kind in rendered:
        group, version = api_version.split("/")
        assert (CRD_SCHEMAS / group / f"{kind.lower()}_{version}.json").is_file()


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("config.LOG_LEVEL=DEBUG",), "LOG_LEVEL"),
        (("config.FORWARDER_CONCURENCY=8",), "'FORWARDER_CONCURENCY' not allowed"),
        (("config.FORWARDER_WEBHOOK_SECRETS=oops",), "secrets do not belong in the ConfigMap"),
        (("config.FORWARDER_API_TOKENS=oops",), "secrets do not belong in the ConfigMap"),
        (("config.FORWARDER_KAFKA_SASL_PASSWORD=oops",), "secrets do not belong in the ConfigMap"),
        (("config.DATAGRID_API_KEY=oops",), "secrets do not belong in the ConfigMap"),
        (("config.FORWARDER_DATAGRID_API_KEY=oops",), "secrets do not belong in the ConfigMap"),
        (("config.FORWARDER_KAFKA_GROUP_INSTANCE_ID=a",), "kafka.staticMembership"),
        (("secrets.existingSecretKeys.DATAGRID_API_KEY=k",), "existingSecret, which is not set"),
        (
            ("secrets.existingSecret=s", "secrets.existingSecretKeys.DATAGRID_API_KY=k"),
            "'DATAGRID_API_KY' not allowed",
        ),
        (("serviceMonitor.jobLabel=team", "prometheusRule.enabled=true"), 'no label "team"'),
        (
            ("prometheusRule.enabled=true", "prometheusRule.alerts.ForwarderDwn.enabled=false"),
            "ForwarderDwn: no such alert",
        ),
        (
            ("prometheusRule.enabled=true", "prometheusRule.alerts.ForwarderDown.threshold=2"),
            "no tunable threshold",
        ),
        (
            ("prometheusRule.alerts.ForwarderDown.for=soon",),
            "/prometheusRule/alerts/ForwarderDown/for",
        ),
        (("secrets.datagridApiKey=",), "secrets.datagridApiKey"),
        (("keda.enabled=true", "keda.minReplicaCount=0"), "minReplicaCount"),
        (("keda.enabled=true", "autoscaling.enabled=true"), "enable one"),
        (("config.FORWARDER_KAFKA_SECURITY_PROTOCOL=SASL_SSL",), "FORWARDER_KAFKA_SASL"),
        (("terminationGracePeriodSeconds=30",), "must exceed"),
        (("kafkaTls.ca.secretName=a", "kafkaTls.ca.configMapName=b"), "not both"),
        (("ingress.enabled=true",), "ingress.hosts"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(sets: tuple[str, ...], message: str) -> None:
    """values.schema.json and the chart's checks refuse bad values, naming the value."""
    assert message in render_fails(*sets)


def test_config_schema_knows_exactly_the_services_settings() -> None:
    """config accepts every non-secret variable of describe_variables() and nothing else; a
    setting added to the service without the chart fails here."""
    config = json.loads((CHART / "values.schema.json").read_text())["properties"]["config"]
    assert config["additionalProperties"] is False
    assert "patternProperties" not in config
    described = {
        name.strip() for variable, _, _ in describe_variables() for name in variable.split("/")
    }
    secrets = {env_name(name) for name, field in setting_fields().items() if field.secret} | {
        "DATAGRID_API_KEY"
    }
    # Credentials are in the schema only so that the chart can refuse them with its own message.
    credentials = {
        key
        for key, rule in config["properties"].items()
        if "credential" in rule.get("description", "")
    }
    assert credentials == secrets & described
    assert set(config["properties"]) - credentials == described - secrets


def render_values(tmp_path: Path, values: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """Render the default scenario plus a values file holding ``values``."""
    extra = tmp_path / "extra-values.yaml"
    extra.write_text(yaml.safe_dump(values))
    out = helm(
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        MAX_KUBE,
        "-f",
        str(CHART / "ci" / "default-values.yaml"),
        "-f",
        str(extra),
    )
    objects = tuple(doc for doc in yaml.safe_load_all(out) if doc)
    for obj in objects:
        if obj["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(obj, MAX_KUBE, strict=True)
    return objects


def test_platform_knobs_reach_the_pod(tmp_path: Path) -> None:
    """extraEnvFrom, extraVolumes, extraVolumeMounts, initContainers and extraContainers land in
    the pod spec as given, after the chart's own, and the result is valid Kubernetes."""
    sidecar = {"name": "vault-agent", "image": "hashicorp/vault:1.17.2", "args": ["agent"]}
    init = {"name": "fetch-ca", "image": "busybox:1.36.1", "command": ["true"]}
    objects = render_values(
        tmp_path,
        {
            "extraEnvFrom": [{"secretRef": {"name": "more-settings"}}],
            "extraVolumes": [{"name": "datagrid-ca", "configMap": {"name": "corp-ca"}}],
            "extraVolumeMounts": [
                {"name": "datagrid-ca", "mountPath": "/etc/datagrid-ca", "readOnly": True}
            ],
            "initContainers": [init],
            "extraContainers": [sidecar],
        },
    )
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    forwarder, extra = pod["containers"]
    assert forwarder["name"] == "forwarder" and extra == sidecar
    assert pod["initContainers"] == [init]
    assert forwarder["envFrom"][0]["configMapRef"]
    assert forwarder["envFrom"][1] == {"secretRef": {"name": "more-settings"}}
    assert forwarder["volumeMounts"][-1]["mountPath"] == "/etc/datagrid-ca"
    assert forwarder["volumeMounts"][0] == {"name": "tmp", "mountPath": "/tmp"}
    assert pod["volumes"][-1] == {"name": "datagrid-ca", "configMap": {"name": "corp-ca"}}


def test_existing_secret_keys_can_be_remapped(tmp_path: Path) -> None:
    """existingSecretKeys points each variable at the key External Secrets wrote; others keep
    their own name, and the KEDA TriggerAuthentication reads the same keys."""
    objects = render_values(
        tmp_path,
        {
            "secrets": {
                "existingSecret": "from-vault",
                "existingSecretKeys": {
                    "DATAGRID_API_KEY": "datagrid-api-key",
                    "FORWARDER_KAFKA_SASL_PASSWORD": "kafka-password",
                },
            },
            "config": {
                "FORWARDER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "FORWARDER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                "FORWARDER_KAFKA_SASL_USERNAME": "forwarder",
            },
            "keda": {"enabled": True},
        },
    )
    _, container = workload(objects)
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert {ref["name"] for ref in refs.values()} == {"from-vault"}
    assert refs["DATAGRID_API_KEY"]["key"] == "datagrid-api-key"
    assert refs["FORWARDER_KAFKA_SASL_PASSWORD"]["key"] == "kafka-password"
    assert refs["FORWARDER_WEBHOOK_SECRETS"]["key"] == "FORWARDER_WEBHOOK_SECRETS"
    auth = only(objects, "TriggerAuthentication")["spec"]["secretTargetRef"]
    assert {"parameter": "password", "name": "from-vault", "key": "kafka-password"} in auth


def test_static_membership_gives_each_pod_its_name_as_instance_id() -> None:
    """kafka.staticMembership sets FORWARDER_KAFKA_GROUP_INSTANCE_ID from the pod's name."""
    _, container = workload(
        render("default-values.yaml", MAX_KUBE, ("kafka.staticMembership=true",))
    )
    (env,) = [e for e in container["env"] if e["name"] == "FORWARDER_KAFKA_GROUP_INSTANCE_ID"]
    assert env["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["name"] in setting_variables()
    _, plain = workload(render("default-values.yaml"))
    assert "FORWARDER_KAFKA_GROUP_INSTANCE_ID" not in {e["name"] for e in plain["env"]}


# --- the rendered objects against the service ---------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_probes_and_routes_are_real_routes(scenario: str) -> None:
    """Probes and the ServiceMonitor use routes the management listener serves, on its port
    (no connection cap: a crowded webhook port never fails a probe), which the container, the
    Service and the NetworkPolicy expose; the Ingress and helm test use the app's routes."""
    objects = render(scenario)
    routes = app_routes()
    _, container = workload(objects)
    config = configmap_data(objects)
    port, management = int(config["FORWARDER_HTTP_PORT"]), int(config["FORWARDER_MANAGEMENT_PORT"])
    assert management, "the chart probes a listener of its own"
    assert container["ports"] == [
        {"name": "http", "containerPort": port, "protocol": "TCP"},
        {"name": "management", "containerPort": management, "protocol": "TCP"},
    ]
    probes = {
        k: container[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    for probe in probes.values():
        assert ("GET", probe["path"]) in management_routes()
        assert probe["port"] == "management"
    service = only(objects, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["ports"][1] == {
        "name": "management",
        "port": management,
        "targetPort": "management",
        "protocol": "TCP",
    }
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
        assert {"port": "management", "protocol": "TCP"} in policy["spec"]["ingress"][0]["ports"]
    test_pod = only(objects, "Pod")
    check = {e["name"]: e["value"] for e in test_pod["spec"]["containers"][0]["env"]}
    assert check["CHECK_PORT"] == str(service["spec"]["ports"][0]["port"])
    assert check["CHECK_PATHS"].split() == ["/healthz", "/readyz"]
    assert all(("GET", path) in routes for path in check["CHECK_PATHS"].split())
    for monitor in (o for o in objects if o["kind"] == "ServiceMonitor"):
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] == "management" and ("GET", endpoint["path"]) in management_routes()
    for ingress in (o for o in objects if o["kind"] == "Ingress"):
        paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
        assert {(p["path"], p["pathType"]) for p in paths} == {("/webhooks/datagrid", "Exact")}
        assert ("POST", "/webhooks/datagrid") in routes


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_environment_names_are_settings_the_service_reads(scenario: str) -> None:
    """Every ConfigMap key, Secret key and container env var is a variable Settings reads."""
    objects = render(scenario)
    known = setting_variables()
    _, container = workload(objects)
    names = set(configmap_data(objects)) | {e["name"] for e in container["env"]}
    for secret in (o for o in objects if o["kind"] == "Secret"):
        names |= set(secret["data"])
    for env in container["env"]:
        if ref := env.get("valueFrom", {}).get("secretKeyRef"):
            assert ref["key"] == env["name"], "Secret keys are the variable names"
    assert names - known == set()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rendered_settings_load(scenario: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pod's environment (ConfigMap, Secret, env) passes the service's own validation."""
    objects = render(scenario)
    _, container = workload(objects)
    env = dict(configmap_data(objects))
    secrets = {
        key: base64.b64decode(value).decode()
        for o in objects
        if o["kind"] == "Secret"
        for key, value in o["data"].items()
    }
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        elif ref := item["valueFrom"].get("secretKeyRef"):
            # An existingSecret is not rendered: stand in for its keys.
            env[item["name"]] = secrets.get(ref["key"], "from-existing-secret")
    for name in [n for n in os.environ if n.startswith("FORWARDER_") or n == "DATAGRID_API_KEY"]:
        monkeypatch.delenv(name)
    # The TLS files exist only in the pod (the service checks that they exist and parse); where
    # they are mounted is test_kafka_tls_files_are_mounted_where_the_settings_point's business.
    for variable in TLS_FILE_VARIABLES:
        env.pop(variable, None)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.http_port == int(env["FORWARDER_HTTP_PORT"])
    assert settings.require_api_key().get_secret_value()
    assert settings.webhook_secrets


def test_config_defaults_are_the_services_defaults() -> None:
    """values.yaml's config repeats the service's defaults (the Kafka address aside)."""
    config = yaml.safe_load((CHART / "values.yaml").read_text())["config"]
    for variable, value in config.items():
        if variable == "FORWARDER_KAFKA_BOOTSTRAP_SERVERS":
            continue  # "localhost" is meaningless in a pod; the chart points at a Service instead.
        default = settings_default(variable)
        assert str(value) == str(default) or float(value) == default, variable


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_security_context_is_hardened(scenario: str) -> None:
    """Image UID, non-root, read-only root, no escalation/capabilities, RuntimeDefault, no token."""
    objects = render(scenario)
    uid = int(re.search(r"^USER (\d+):(\d+)$", (REPO / "Dockerfile").read_text(), re.M)[1])  # type: ignore[index]
    pod, container = workload(objects)
    for spec, ctr in (
        (pod, container),
        (only(objects, "Pod")["spec"], only(objects, "Pod")["spec"]["containers"][0]),
    ):
        context = {**spec.get("securityContext", {}), **ctr["securityContext"]}
        assert context["runAsNonRoot"] is True
        assert ctr["securityContext"]["readOnlyRootFilesystem"] is True
        assert ctr["securityContext"]["allowPrivilegeEscalation"] is False
        assert ctr["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        assert "privileged" not in ctr["securityContext"]
        assert not spec.get("hostNetwork") and not spec.get("hostPID")
        assert "resources" in ctr and ctr["resources"].get("requests")
    assert pod["securityContext"]["runAsUser"] == uid
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    for sa in (o for o in objects if o["kind"] == "ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_grace_period_exceeds_drain_timeout(scenario: str) -> None:
    """terminationGracePeriodSeconds exceeds the preStop pause + FORWARDER_DRAIN_TIMEOUT_SECONDS."""
    objects = render(scenario)
    pod, container = workload(objects)
    drain = float(configmap_data(objects)["FORWARDER_DRAIN_TIMEOUT_SECONDS"])
    pause = int(
        container.get("lifecycle", {})
        .get("preStop", {})
        .get("exec", {})
        .get("command", ["", "0"])[1]
    )
    assert pod["terminationGracePeriodSeconds"] > drain + pause


def test_grace_period_follows_the_drain_timeout() -> None:
    """A longer drain lengthens the computed grace period; a too-short explicit one is refused."""
    short = workload(render("default-values.yaml"))[0]["terminationGracePeriodSeconds"]
    long = workload(
        render("default-values.yaml", MAX_KUBE, ("config.FORWARDER_DRAIN_TIMEOUT_SECONDS=300",))
    )[0]
    assert long["terminationGracePeriodSeconds"] == short + 270
    assert "must exceed" in render_fails(
        "config.FORWARDER_DRAIN_TIMEOUT_SECONDS=300", "terminationGracePeriodSeconds=305"
    )


def test_selector_labels_never_change() -> None:
    """Selectors stay {name, instance} whatever else changes (tag, labels, scaling, features)."""
    expected = {"app.kubernetes.io/name": "forwarder", "app.kubernetes.io/instance": RELEASE}
    variants = [
        ("default-values.yaml", ()),
        (
            "default-values.yaml",
            ("image.tag=9.9.9", "commonLabels.team=x", "podLabels.a=b", "replicaCount=7"),
        ),
        *((s, ()) for s in SCENARIOS),
    ]
    for scenario, sets in variants:
        objects = render(scenario, MAX_KUBE, sets)
        deployment = only(objects, "Deployment")
        assert deployment["spec"]["selector"] == {"matchLabels": expected}
        assert expected.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        assert only(objects, "Service")["spec"]["selector"] == expected
        for obj in objects:
            if obj["kind"] in ("PodDisruptionBudget", "ServiceMonitor", "NetworkPolicy"):
                key = "podSelector" if obj["kind"] == "NetworkPolicy" else "selector"
                assert obj["spec"][key] == {"matchLabels": expected}
        # The helm test pod must not be one of the Service's endpoints.
        assert not expected.items() <= only(objects, "Pod")["metadata"]["labels"].items()


def test_checksum_annotations_roll_pods_on_config_and_secret_changes() -> None:
    """checksum/config and checksum/secret follow settings and credentials (not existingSecret)."""

    def annotations(scenario: str, *sets: str) -> dict[str, str]:
        template = only(render(scenario, MAX_KUBE, sets), "Deployment")["spec"]["template"]
        found: dict[str, str] = template["metadata"]["annotations"]
        return found

    base = annotations("default-values.yaml")
    changed_config = annotations("default-values.yaml", "config.FORWARDER_LOG_LEVEL=DEBUG")
    changed_secret = annotations("default-values.yaml", "secrets.webhookSecrets=rotated")
    assert changed_config["checksum/config"] != base["checksum/config"]
    assert changed_config["checksum/secret"] == base["checksum/secret"]
    assert changed_secret["checksum/secret"] != base["checksum/secret"]
    assert "checksum/secret" not in annotations("existing-secret-values.yaml")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_credentials_appear_only_in_secrets(scenario: str) -> None:
    """No credential from the values reaches a ConfigMap, an env literal or any other object."""
    for obj in render(scenario):
        if obj["kind"] == "Secret":
            continue
        text = yaml.safe_dump(obj)
        for value in SECRET_VALUES:
            assert value not in text, f"{value} leaked into {obj['kind']}/{obj['metadata']['name']}"


def test_existing_secret_replaces_the_chart_secret() -> None:
    """With existingSecret no Secret is rendered and every secretKeyRef names the given Secret."""
    objects = render("existing-secret-values.yaml")
    assert not [o for o in objects if o["kind"] == "Secret"]
    _, container = workload(objects)
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    assert refs == {"datagrid-forwarder-credentials"}


def test_kafka_tls_files_are_mounted_where_the_settings_point() -> None:
    """The CA and client certificate are mounted read-only where FORWARDER_KAFKA_SSL_* point."""
    for scenario in ("all-features-values.yaml", "kafka-sasl-tls-values.yaml"):
        pod, container = workload(render(scenario))
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        for variable in (
            "FORWARDER_KAFKA_SSL_CAFILE",
            "FORWARDER_KAFKA_SSL_CERTFILE",
            "FORWARDER_KAFKA_SSL_KEYFILE",
        ):
            if variable not in env:
                continue
            path = Path(env[variable])
            (mount,) = [m for m in mounts.values() if Path(m["mountPath"]) == path.parent]
            assert mount["readOnly"] is True
            source = volumes[mount["name"]].get("secret") or volumes[mount["name"]]["configMap"]
            assert path.name in [item["path"] for item in source["items"]]


def test_keda_scales_on_the_workers_consumer_lag() -> None:
    """The KEDA trigger watches the jobs topic and group the pods use, authenticated like them."""
    for scenario in ("all-features-values.yaml", "kafka-sasl-tls-values.yaml"):
        objects = render(scenario)
        config = configmap_data(objects)
        scaled = only(objects, "ScaledObject")
        assert (
            scaled["spec"]["scaleTargetRef"]["name"]
            == only(objects, "Deployment")["metadata"]["name"]
        )
        assert scaled["spec"]["minReplicaCount"] >= 1, (
            "the pods receive webhooks: never scale to zero"
        )
        (trigger,) = scaled["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "kafka"
        assert meta["bootstrapServers"] == config["FORWARDER_KAFKA_BOOTSTRAP_SERVERS"]
        assert meta["consumerGroup"] == config["FORWARDER_CONSUMER_GROUP"]
        assert meta["topic"] == config["FORWARDER_JOBS_TOPIC"]
        assert int(meta["lagThreshold"]) >= 1
        assert meta["sasl"] == KEDA_SASL[config["FORWARDER_KAFKA_SASL_MECHANISM"]]
        assert meta["tls"] == "enable"
        auth = only(objects, "TriggerAuthentication")
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
        params = {r["parameter"]: r for refs in auth["spec"].values() for r in refs}
        assert params["password"]["key"] == "FORWARDER_KAFKA_SASL_PASSWORD"
        assert params["username"]["key"] == "FORWARDER_KAFKA_SASL_USERNAME"
        assert "ca" in params
        assert "replicas" not in only(objects, "Deployment")["spec"], "the autoscaler owns replicas"


def test_keda_defaults_match_the_service() -> None:
    """With the default topic and group the trigger names what the service uses by default."""
    objects = render("default-values.yaml", MAX_KUBE, ("keda.enabled=true",))
    meta = only(objects, "ScaledObject")["spec"]["triggers"][0]["metadata"]
    assert meta["topic"] == settings_default("FORWARDER_JOBS_TOPIC")
    # The chart's default group is the release's own (see test_two_releases_never_share_a_group).
    assert meta["consumerGroup"] == configmap_data(objects)["FORWARDER_CONSUMER_GROUP"]
    assert not [o for o in objects if o["kind"] == "TriggerAuthentication"], (
        "PLAINTEXT needs no credentials"
    )


# --- one source of truth for the dashboard and the rules -----------------------------------------


@pytest.mark.parametrize(("source", "copy"), sorted(SHIPPED_FILES.items()))
def test_chart_files_are_byte_identical_to_deploy(source: str, copy: str) -> None:
    """The chart's copies of the dashboard and the alert rules equal deploy/ byte for byte."""
    original = REPO / source
    assert original.is_file(), f"{source} is missing"
    assert (CHART / copy).read_bytes() == original.read_bytes(), (
        f"helm/forwarder/{copy} differs from {source}: run  cp {source} helm/forwarder/{copy}"
    )


def _deploy_rules() -> dict[str, Any]:
    return yaml.safe_load((REPO / "deploy/prometheus/forwarder-rules.yaml").read_text())  # type: ignore[no-any-return]


def _scoped(rules: dict[str, Any], matcher: str, base: str = "") -> dict[str, Any]:
    """deploy/'s rules as the chart must render them: job matcher scoped, runbooks absolute."""
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["expr"] = rule["expr"].replace('job="forwarder"', matcher)
            if base and (url := rule.get("annotations", {}).get("runbook_url")):
                rule["annotations"]["runbook_url"] = f"{base}/{url}"
    return rules


def test_prometheus_rule_carries_the_deploy_rules_scoped_to_the_release() -> None:
    """The PrometheusRule holds deploy/'s rules, each selecting only this release's namespace
    and job (the Service's name, the ServiceMonitor's job), with runbook URLs made absolute."""
    objects = render("all-features-values.yaml")
    rendered = only(objects, "PrometheusRule")["spec"]
    base = yaml.safe_load((CHART / "ci/all-features-values.yaml").read_text())["prometheusRule"][
        "runbookBaseUrl"
    ]
    job = only(objects, "Service")["metadata"]["name"]
    matcher = f'namespace="{NAMESPACE}", job="{job}"'
    assert rendered == _scoped(_deploy_rules(), matcher, base)
    for group in rendered["groups"]:
        for rule in group["rules"]:
            assert 'job="forwarder"' not in rule["expr"]
    plain = only(
        render("default-values.yaml", MAX_KUBE, ("prometheusRule.enabled=true",)), "PrometheusRule"
    )
    assert plain["spec"] == _scoped(
        _deploy_rules(), f'namespace="{NAMESPACE}", job="{RELEASE}-forwarder"', _tagged_runbooks()
    )


def _tagged_runbooks() -> str:
    """The repository at the tag release.yaml pushes for this chart's version."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    return f"https://github.com/datagrid/datagrid-forwarder/blob/v{chart['version']}"


def test_runbook_urls_default_to_the_charts_tagged_repository() -> None:
    """Without runbookBaseUrl every runbook_url is absolute: the repository that publishes the
    chart's image (ghcr.io/<owner>/<name> is github.com/<owner>/<name>), at the v<version> tag
    the release workflow is triggered by, so an alert links the runbooks of its own version."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    owner_name = values["image"]["repository"].removeprefix("ghcr.io/")
    base = _tagged_runbooks()
    assert base.startswith(f"https://github.com/{owner_name}/blob/v")
    workflow = yaml.safe_load((REPO / ".github/workflows/release.yaml").read_text())
    tag = base.rpartition("/")[2]
    assert any(re.fullmatch(p, tag) for p in workflow[True]["push"]["tags"])
    rule = only(
        render("default-values.yaml", MAX_KUBE, ("prometheusRule.enabled=true",)), "PrometheusRule"
    )
    urls = [
        r["annotations"]["runbook_url"]
        for g in rule["spec"]["groups"]
        for r in g["rules"]
        if "alert" in r
    ]
    assert urls and all(u.startswith(f"{base}/docs/runbooks.md#forwarder") for u in urls), urls


def test_aggregation_labels_join_every_grouping(tmp_path: Path) -> None:
    """prometheusRule.aggregationLabels (e.g. cluster, for a central ruler) are kept by every
    `by (...)` of every rule, nothing else changes, and Prometheus still accepts the rules."""
    sets = ("prometheusRule.enabled=true", "prometheusRule.aggregationLabels={cluster,region}")
    spec = only(render("default-values.yaml", MAX_KUBE, sets), "PrometheusRule")["spec"]
    plain = only(
        render("default-values.yaml", MAX_KUBE, ("prometheusRule.enabled=true",)), "PrometheusRule"
    )["spec"]
    exprs = [r["expr"] for g in spec["groups"] for r in g["rules"]]
    groupings = [g for e in exprs for g in re.findall(r"\bby \(([^)]*)\)", e)]
    assert len(groupings) >= 10, "no grouping found: the scan is broken"
    for grouping in groupings:
        assert grouping.startswith("namespace, job, cluster, region"), grouping
    for rule, before in zip(
        (r for g in spec["groups"] for r in g["rules"]),
        (r for g in plain["groups"] for r in g["rules"]),
        strict=True,
    ):
        assert rule["expr"].replace(", cluster, region", "") == before["expr"]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(spec))
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found on PATH: apt-get install prometheus"
    assert "SUCCESS" in run([promtool, "check", "rules", path]).stdout
    assert "aggregationLabels" in render_fails(
        "prometheusRule.enabled=true", "prometheusRule.aggregationLabels={job}"
    )


def test_servicemonitor_keeps_the_services_job_and_the_rules_follow_it() -> None:
    """No job relabeling: job is the Service's name (or its jobLabel label), and the rules select
    that job; prometheusRule.job overrides it for pods scraped another way."""
    objects = render("all-features-values.yaml")
    monitor = only(objects, "ServiceMonitor")
    for endpoint in monitor["spec"]["endpoints"]:
        for relabel in endpoint.get("relabelings", []):
            assert relabel.get("targetLabel") != "job", relabel
    assert "jobLabel" not in monitor["spec"]

    def rule_exprs(*sets: str) -> str:
        objects = render("all-features-values.yaml", MAX_KUBE, sets)
        spec = only(objects, "PrometheusRule")["spec"]
        return "\n".join(r["expr"] for g in spec["groups"] for r in g["rules"])

    by_label = render(
        "all-features-values.yaml", MAX_KUBE, ("serviceMonitor.jobLabel=app.kubernetes.io/name",)
    )
    assert only(by_label, "ServiceMonitor")["spec"]["jobLabel"] == "app.kubernetes.io/name"
    assert only(by_label, "Service")["metadata"]["labels"]["app.kubernetes.io/name"] == "forwarder"
    assert 'up{namespace="datagrid", job="forwarder"}' in rule_exprs(
        "serviceMonitor.jobLabel=app.kubernetes.io/name"
    )
    assert 'up{namespace="datagrid", job="kubernetes-pods"}' in rule_exprs(
        "prometheusRule.job=kubernetes-pods"
    )


def test_alerts_can_be_tuned_per_alert() -> None:
    """alerts.<Alert> disables it, replaces its threshold, sets `for` and adds labels; alertLabels
    go on every alert; recording rules are untouched."""
    sets = (
        "prometheusRule.alerts.ForwarderErroredLinesRatioHigh.enabled=false",
        "prometheusRule.alerts.ForwarderJobsLagGrowing.threshold=50",
        "prometheusRule.alerts.ForwarderBatchFailureRatioHigh.threshold=0.35",
        "prometheusRule.alerts.ForwarderDown.for=2m",
        "prometheusRule.alerts.ForwarderDeadLetters.labels.severity=critical",
        "prometheusRule.alertLabels.team=payments",
    )
    rule = only(render("all-features-values.yaml", MAX_KUBE, sets), "PrometheusRule")
    assert "Valid: 1" in kubeconform([rule])
    spec = rule["spec"]
    rules = [r for g in spec["groups"] for r in g["rules"]]
    alerts: dict[str, list[dict[str, Any]]] = {}
    for rule in rules:
        if "alert" in rule:
            alerts.setdefault(rule["alert"], []).append(rule)
    assert "ForwarderErroredLinesRatioHigh" not in alerts
    assert (
        len(alerts)
        == len({r["alert"] for g in _deploy_rules()["groups"] for r in g["rules"] if "alert" in r})
        - 1
    )
    assert "> 50 # threshold" in alerts["ForwarderJobsLagGrowing"][0]["expr"]
    assert "> 0.35 # threshold" in alerts["ForwarderBatchFailureRatioHigh"][0]["expr"]
    assert [r["for"] for r in alerts["ForwarderDown"]] == ["2m", "2m"]
    assert {r["labels"]["severity"] for r in alerts["ForwarderDown"]} == {"warning", "critical"}
    assert alerts["ForwarderDeadLetters"][0]["labels"]["severity"] == "critical"
    for name, found in alerts.items():
        for rule in found:
            assert rule["labels"]["team"] == "payments", name
    records = [r for r in rules if "record" in r]
    assert records and all("labels" not in r for r in records)


def test_tuned_rules_pass_promtool(tmp_path: Path) -> None:
    """The rules the chart renders, tuned and scoped, are still valid for Prometheus."""
    sets = (
        "prometheusRule.alerts.ForwarderJobsLagGrowing.threshold=50",
        "prometheusRule.alerts.ForwarderForwardDelayHigh.threshold=1800",
        "prometheusRule.alerts.ForwarderNotReady.for=0s",
    )
    spec = only(render("all-features-values.yaml", MAX_KUBE, sets), "PrometheusRule")["spec"]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(spec))
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found on PATH: apt-get install prometheus"
    out = run([promtool, "check", "rules", path]).stdout
    assert "SUCCESS" in out


def test_dashboard_configmap_carries_the_deploy_dashboard() -> None:
    """The dashboard ConfigMap holds deploy/grafana's JSON unchanged, with a configurable label."""
    dashboard = (REPO / "deploy/grafana/forwarder-dashboard.json").read_text()
    default = only(
        render("default-values.yaml", MAX_KUBE, ("grafanaDashboard.enabled=true",)),
        "ConfigMap",
        "-dashboard",
    )
    assert default["data"] == {"forwarder-dashboard.json": dashboard}
    assert default["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert default["metadata"]["namespace"] == NAMESPACE
    custom = only(
        render(
            "all-features-values.yaml",
            MAX_KUBE,
            (
                "grafanaDashboard.labels.grafana_dashboard=null",
                "grafanaDashboard.labels.dashboards=forwarder",
            ),
        ),
        "ConfigMap",
        "-dashboard",
    )
    assert "grafana_dashboard" not in custom["metadata"]["labels"]
    assert custom["metadata"]["labels"]["dashboards"] == "forwarder"
    assert custom["metadata"]["namespace"] == "monitoring"


# --- packaging and documentation ----------------------------------------------------------------


def test_helm_package_ships_the_files(tmp_path: Path) -> None:
    """`helm package` ships the dashboard, the rules, the schema and the README, and not ci/."""
    helm("package", str(CHART), "--destination", str(tmp_path), tmp=tmp_path)
    (archive,) = tmp_path.glob("forwarder-*.tgz")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {f"forwarder/{copy}" for copy in SHIPPED_FILES.values()} <= names
    assert {
        "forwarder/values.schema.json",
        "forwarder/README.md",
        "forwarder/templates/NOTES.txt",
    } <= names
    assert not [n for n in names if n.startswith("forwarder/ci/")]


def test_chart_app_version_is_the_project_version() -> None:
    """Chart.yaml's appVersion (the default image tag) is pyproject.toml's version."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]


def test_package_version_is_the_project_version() -> None:
    """``forwarder.__version__`` (a constant, for start-up time) is pyproject.toml's version."""
    import forwarder

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert forwarder.__version__ == project["version"]


def test_helm_test_pod_runs_the_release_image() -> None:
    """The helm test pod needs no second image: it runs the release's own (pinned) image."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert "helmTest" not in values
    (pod,) = [
        d for d in render("default-values.yaml", sets=("image.tag=1.2.3",)) if d["kind"] == "Pod"
    ]
    assert pod["spec"]["containers"][0]["image"] == f"{values['image']['repository']}:1.2.3"


#: values.yaml maps documented as one row (they are passed through whole with toYaml).
PASSED_WHOLE = {
    "config",
    "resources",
    "podSecurityContext",
    "securityContext",
    "labels",
    "updateStrategy",
    "startup",
    "liveness",
    "readiness",
}


def _leaf_keys(values: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in PASSED_WHOLE:
            yield from _leaf_keys(value, f"{path}.")
        else:
            yield path


def test_readme_documents_every_value() -> None:
    """The chart README's values table has a row for every key of values.yaml."""
    table = (CHART / "README.md").read_text().partition("\n## Values\n")[2]
    documented = set(re.findall(r"^\| `([^`]+)` \|", table, re.M))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(_leaf_keys(values)) - documented == set()
    assert documented - set(_leaf_keys(values)) == set(), (
        "README documents values that do not exist"
    )


def test_values_schema_covers_every_value() -> None:
    """values.schema.json declares every top-level value and refuses unknown ones (typos fail)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert schema["additionalProperties"] is False
    assert set(values) <= set(schema["properties"])
    assert "replicas" in render_fails("replicas=3")


# --- the release workflow -----------------------------------------------------------------------

WORKFLOWS = REPO / ".github" / "workflows"
RELEASE_WORKFLOW = WORKFLOWS / "release.yaml"


def actionlint(*files: str, input: str | None = None) -> str:
    """Run actionlint (beside helm, from deploy/tools/install.sh) with the dev group's shellcheck,
    so that run: scripts are checked too; return its verbose output."""
    binary = Path(tool("helm")).parent / "actionlint"
    assert binary.exists(), f"{binary} missing: run deploy/tools/install.sh"
    args = [binary, "-no-color", "-oneline", "-verbose", "-shellcheck", tool("shellcheck")]
    return run([*args, *files], input=input).stderr


def _workflow() -> dict[Any, Any]:
    return yaml.safe_load(RELEASE_WORKFLOW.read_text())  # type: ignore[no-any-return]


def test_workflows_pass_actionlint_with_shellcheck() -> None:
    """actionlint finds no error in .github/workflows/, with its shellcheck rule enabled."""
    files = sorted(str(p.relative_to(REPO)) for p in WORKFLOWS.glob("*.y*ml"))
    assert str(RELEASE_WORKFLOW.relative_to(REPO)) in files
    log = actionlint(*files)
    assert 'Rule "shellcheck" was disabled' not in log
    assert "Found total 0 errors" in log


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("needs.versions.outputs.version }}", "needs.version.outputs.version }}", "not defined"),
        (
            'test -f "dist/forwarder-${VERSION}.tgz"',
            "test -f dist/forwarder-$VERSION.tgz",
            "SC2086",
        ),
        ("packages: write", "packages: writ", "permission"),
    ],
)
def test_actionlint_catches_a_broken_release_workflow(old: str, new: str, message: str) -> None:
    """A wrong job reference, an unquoted variable or a bad permission fails the check."""
    text = RELEASE_WORKFLOW.read_text()
    assert old in text
    with pytest.raises(AssertionError, match=message):
        actionlint("-stdin-filename", "release.yaml", "-", input=text.replace(old, new, 1))


def test_release_publishes_the_image_and_chart_the_chart_and_readme_name() -> None:
    """On a version tag the workflow pushes values.yaml's image for amd64 and arm64 and the chart
    to the OCI registry the README names; the versions it checks agree today."""
    workflow = _workflow()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert workflow[True]["push"]["tags"] == [
        "v[0-9]+.[0-9]+.[0-9]+"
    ]  # YAML 1.1 reads "on" as True
    assert workflow["env"]["IMAGE"] == values["image"]["repository"]
    assert f"`{values['image']['repository']}`" in readme
    assert f"{workflow['env']['CHART_REGISTRY']}/{chart['name']}" in readme
    build = [
        step["with"]
        for step in workflow["jobs"]["image"]["steps"]
        if step.get("uses", "").startswith("docker/build-push-action@")
    ]
    assert len(build) == 1
    assert set(build[0]["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    assert build[0]["push"] is True
    dockerfile_args = set(re.findall(r"^ARG (\w+)=", (REPO / "Dockerfile").read_text(), re.M))
    passed = {line.split("=", 1)[0] for line in build[0]["build-args"].splitlines()}
    assert passed <= dockerfile_args
    assert workflow["jobs"]["chart"]["needs"] == ["versions", "image"], "chart only after image"
    assert chart["version"] == chart["appVersion"], "the workflow releases them as one version"


def test_release_actions_are_pinned_to_commits() -> None:
    """Every action is pinned to a full commit SHA, with the tag it was in a comment."""
    uses = re.findall(r"uses: (\S+)(.*)$", RELEASE_WORKFLOW.read_text(), re.M)
    assert len(uses) >= 6
    for action, comment in uses:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", action), action
        assert re.fullmatch(r"\s+# v\d+\.\d+\.\d+", comment), action


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pods_get_no_service_links(scenario: str) -> None:
    """Every pod that runs the forwarder turns off Kubernetes service links: the release
    `forwarder` makes a Service whose links (FORWARDER_PORT, ...) would otherwise reach the
    settings loader. (The helm test pod runs no forwarder, and finds the Service by its link.)"""
    pods = [workload(render(scenario))[0]]
    pods += [
        o["spec"]["template"]["spec"] for o in render(scenario) if o["kind"] in ("Job", "CronJob")
    ]
    for pod in pods:
        assert pod["enableServiceLinks"] is False


def test_two_releases_never_share_a_group() -> None:
    """Without a configured group, each release gets its own (so its own transactional ids):
    two installs on one cluster never split each other's jobs; a configured group is kept."""
    first = configmap_data(render("default-values.yaml"))["FORWARDER_CONSUMER_GROUP"]
    other_namespace = render("default-values.yaml", namespace="team-b")
    second = configmap_data(other_namespace)["FORWARDER_CONSUMER_GROUP"]
    assert first == f"{NAMESPACE}.{RELEASE}-forwarder" and second == f"team-b.{RELEASE}-forwarder"
    shared = render("default-values.yaml", sets=("config.FORWARDER_CONSUMER_GROUP=shared",))
    assert configmap_data(shared)["FORWARDER_CONSUMER_GROUP"] == "shared"


# --- the `forwarder check` hook -----------------------------------------------------------------

CHECK_SCENARIOS = ("all-features-values.yaml", "existing-secret-values.yaml")
CHECK_HOOK = "pre-install,pre-upgrade"


def check_hook(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """The check Job's pod spec, checked to be a pre-install/pre-upgrade hook."""
    job = only(objects, "Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == CHECK_HOOK
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    assert job["spec"]["backoffLimit"] == 0
    pod: dict[str, Any] = job["spec"]["template"]["spec"]
    return pod


def hook_copy(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    """The hook object ``kind/name`` the check pod names, made before the Job and deleted after."""
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    annotations = found["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == CHECK_HOOK, f"{kind}/{name} is no hook"
    assert int(annotations["helm.sh/hook-weight"]) < int(
        only(objects, "Job")["metadata"]["annotations"]["helm.sh/hook-weight"]
    ), f"{kind}/{name} must exist before the Job runs"
    assert "hook-succeeded" in annotations["helm.sh/hook-delete-policy"]
    return found


def test_check_hook_is_off_by_default() -> None:
    """Without check.enabled no Job and no hook object is rendered."""
    objects = render("default-values.yaml")
    assert not [o for o in objects if o["kind"] == "Job"]
    assert not [
        o
        for o in objects
        if "helm.sh/hook" in o["metadata"].get("annotations", {}) and o["kind"] != "Pod"
    ]


@pytest.mark.parametrize("scenario", CHECK_SCENARIOS)
def test_check_hook_runs_check_as_the_pods_run(scenario: str) -> None:
    """The hook runs `forwarder check` in the Deployment's image with its env, Secret keys,
    files, securityContext and placement, no sidecar; the ConfigMap, Secret and ServiceAccount
    it names exist as hooks (they do not yet on a first install) with the pods' own contents."""
    objects = render(scenario)
    pod, container = workload(objects)
    spec = check_hook(objects)
    (check,) = spec["containers"]
    assert build_parser().parse_args(check["args"]).command == "check"
    assert check["image"] == container["image"]
    for key in ("securityContext", "resources", "volumeMounts"):
        assert check[key] == container[key], key
    for key in (
        "securityContext",
        "volumes",
        "automountServiceAccountToken",
        "imagePullSecrets",
        "nodeSelector",
        "affinity",
        "tolerations",
        "priorityClassName",
    ):
        assert spec.get(key) == pod.get(key), key
    assert spec["enableServiceLinks"] is False
    assert spec["restartPolicy"] == "Never"
    assert "initContainers" not in spec
    # The same variables, from the same keys; what the chart makes is read from hook copies.
    assert [e["name"] for e in check["env"]] == [e["name"] for e in container["env"]]
    for ours, theirs in zip(check["env"], container["env"], strict=True):
        ref, original = (e.get("valueFrom", {}).get("secretKeyRef") for e in (ours, theirs))
        if not ref:
            assert ours == theirs
            continue
        assert ref["key"] == original["key"]
        if ref["name"] != original["name"]:  # a chart-made Secret: its hook copy, same data
            made = [
                o
                for o in objects
                if o["kind"] == "Secret"
                and not o["metadata"].get("annotations", {}).get("helm.sh/hook")
            ]
            (secret,) = made
            assert original["name"] == secret["metadata"]["name"]
            assert hook_copy(objects, "Secret", ref["name"])["data"] == secret["data"]
    configmap = check["envFrom"][0]["configMapRef"]["name"]
    assert hook_copy(objects, "ConfigMap", configmap)["data"] == configmap_data(objects)
    assert check["envFrom"][1:] == container["envFrom"][1:]
    if spec["serviceAccountName"] != pod["serviceAccountName"]:
        account = hook_copy(objects, "ServiceAccount", spec["serviceAccountName"])
        (original,) = [
            o
            for o in objects
            if o["kind"] == "ServiceAccount" and o["metadata"]["name"] == pod["serviceAccountName"]
        ]
        assert (
            account["metadata"].get("annotations", {}).items()
            >= original["metadata"].get("annotations", {}).items()
        )
    # Not one of the Service's endpoints, nor counted by the PDB.
    selector = only(objects, "Service")["spec"]["selector"]
    assert (
        not selector.items()
        <= only(objects, "Job")["spec"]["template"]["metadata"]["labels"].items()
    )


def test_check_hook_uses_the_existing_secret_and_account() -> None:
    """With secrets.existingSecret and an existing ServiceAccount the hook makes no Secret or
    ServiceAccount of its own: it reads the given Secret and runs as the given account."""
    objects = render("existing-secret-values.yaml")
    spec = check_hook(objects)
    assert not [o for o in objects if o["kind"] in ("Secret", "ServiceAccount")]
    refs = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in spec["containers"][0]["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert refs == {"datagrid-forwarder-credentials"}
    assert spec["serviceAccountName"] == "platform-workloads"


# --- credentials from Secrets of their own, Strimzi (issue 22) ------------------------------------

#: A Strimzi install: the KafkaUser's Secret (key `password`) holds the SASL password, and the
#: Datagrid key lives in a Secret of its own; only the webhook secret is inline.
STRIMZI_VALUES: dict[str, Any] = {
    "strimzi": {"enabled": True, "cluster": "prod-kafka"},
    "config": {
        "FORWARDER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "FORWARDER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "FORWARDER_KAFKA_SASL_USERNAME": f"{RELEASE}-forwarder",
    },
    "secrets": {
        "datagridApiKey": "",
        "refs": {
            "FORWARDER_KAFKA_SASL_PASSWORD": {"name": f"{RELEASE}-forwarder", "key": "password"},
            "DATAGRID_API_KEY": {"name": "datagrid", "key": "api-key"},
        },
    },
    "keda": {"enabled": True},
}


def render_strimzi(tmp_path: Path, values: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """Render the default scenario plus ``values``; built-in kinds validated strictly, custom
    kinds (Strimzi's too) with kubeconform against the vendored CRD schemas."""
    extra = tmp_path / "strimzi-values.yaml"
    extra.write_text(yaml.safe_dump(values))
    out = helm(
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        MAX_KUBE,
        *values_args("default-values.yaml"),
        "-f",
        str(extra),
    )
    objects = tuple(doc for doc in yaml.safe_load_all(out) if doc)
    custom = [o for o in objects if "." in o["apiVersion"].split("/")[0]]
    for obj in objects:
        if obj not in custom:
            kubernetes_validate.validate(obj, MAX_KUBE, strict=True)
    assert f"Valid: {len(custom)}" in kubeconform(custom)
    return objects


def _secret_refs(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def test_each_credential_can_come_from_its_own_secret(tmp_path: Path) -> None:
    """secrets.refs points a variable at any Secret and key (a Strimzi KafkaUser's `password`);
    the chart's Secret keeps only the inline ones, and KEDA reads the same ref."""
    objects = render_strimzi(tmp_path, STRIMZI_VALUES)
    _, container = workload(objects)
    refs = _secret_refs(container)
    assert refs["FORWARDER_KAFKA_SASL_PASSWORD"] == {
        "name": f"{RELEASE}-forwarder",
        "key": "password",
    }
    assert refs["DATAGRID_API_KEY"] == {"name": "datagrid", "key": "api-key"}
    assert refs["FORWARDER_WEBHOOK_SECRETS"] == {
        "name": f"{RELEASE}-forwarder",
        "key": "FORWARDER_WEBHOOK_SECRETS",
    }
    secret = only(objects, "Secret")
    assert set(secret["data"]) == {"FORWARDER_WEBHOOK_SECRETS"}
    auth = only(objects, "TriggerAuthentication")["spec"]["secretTargetRef"]
    assert {"parameter": "password", "name": f"{RELEASE}-forwarder", "key": "password"} in auth


def test_refs_without_any_inline_credential_render_no_secret(tmp_path: Path) -> None:
    """With every credential in a Secret of its own, the chart makes no Secret of its own."""
    values = {
        "secrets": {
            "datagridApiKey": "",
            "webhookSecrets": "",
            "refs": {
                "DATAGRID_API_KEY": {"name": "datagrid", "key": "api-key"},
                "FORWARDER_WEBHOOK_SECRETS": {"name": "datagrid", "key": "webhook"},
            },
        }
    }
    objects = render_strimzi(tmp_path, values)
    assert not [o for o in objects if o["kind"] == "Secret"]
    _, container = workload(objects)
    assert {r["name"] for r in _secret_refs(container).values()} >= {"datagrid"}


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ("secrets.refs.DATAGRID_API_KEY.name=dg", "secrets.refs.DATAGRID_API_KEY.key=k"),
            "secrets.datagridApiKey and secrets.refs.DATAGRID_API_KEY both give",
        ),
        (("secrets.refs.DATAGRID_API_KY.name=dg", "secrets.refs.DATAGRID_API_KY.key=k"), "refs"),
        (("secrets.refs.FORWARDER_API_TOKENS.name=t",), "key"),
        (("strimzi.enabled=true",), "strimzi.cluster"),
        (
            (
                "strimzi.enabled=true",
                "strimzi.cluster=c",
                "config.FORWARDER_KAFKA_CREATE_TOPICS=true",
            ),
            "remove config.FORWARDER_KAFKA_CREATE_TOPICS",
        ),
    ],
)
def test_bad_refs_and_strimzi_values_are_refused(sets: tuple[str, ...], message: str) -> None:
    """A credential given twice, an unknown or incomplete ref, Strimzi without its cluster or
    with topic creation on: refused with a message naming the value."""
    assert message in render_fails(*sets)


def test_strimzi_topics_carry_what_the_forwarder_would_create(tmp_path: Path) -> None:
    """The KafkaTopics are the forwarder's topic_specs for the same settings, with
    min.insync.replicas = min(2, replicas); the pods then never create topics."""
    values = {
        **STRIMZI_VALUES,
        "config": {**STRIMZI_VALUES["config"], "FORWARDER_RESULTS_RETENTION_HOURS": 48},
    }
    objects = render_strimzi(tmp_path, values)
    settings = Settings(results_retention_hours=48)
    specs = topic_specs(settings)
    topics = {o["spec"]["topicName"]: o for o in objects if o["kind"] == "KafkaTopic"}
    assert set(topics) == set(specs)
    for name, topic in topics.items():
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == "prod-kafka"
        assert topic["spec"]["replicas"] == 3
        assert topic["spec"]["partitions"] == settings.kafka_topic_partitions
        config = {k: str(v) for k, v in topic["spec"]["config"].items()}
        assert config == {**specs[name], "min.insync.replicas": str(min_insync_replicas(3))}, name
    _, container = workload(objects)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FORWARDER_KAFKA_CREATE_TOPICS"] == "false"


#: Strimzi's ACL resource types for the documentation's.
STRIMZI_RESOURCE = {"topic": "topic", "group": "group", "transactional-id": "transactionalId"}


@pytest.mark.parametrize("mode", ["at-least-once", "exactly-once"])
def test_strimzi_user_has_exactly_the_documented_acls(tmp_path: Path, mode: str) -> None:
    """The KafkaUser's ACLs are docs/security.md's rows for the mode (Create aside: Strimzi
    makes the topics), on the configured names, nothing more."""
    from tests.test_secured_kafka import documented_acls

    values = {**STRIMZI_VALUES, "config": {**STRIMZI_VALUES["config"], "FORWARDER_DELIVERY": mode}}
    objects = render_strimzi(tmp_path, values)
    user = only(objects, "KafkaUser")
    assert user["metadata"]["name"] == f"{RELEASE}-forwarder"
    assert user["spec"]["authentication"] == {"type": "scram-sha-512"}
    settings = Settings()
    wanted = set()
    for row in documented_acls():
        if row.when == "creating topics" or (row.when == "exactly-once" and mode != row.when):
            continue
        if row.when not in ("always", "exactly-once"):
            raise AssertionError(f"an ACL row the chart does not know: {row}")
        name = (
            f"{settings.consumer_group}-"
            if row.name == "<group>-"
            else str(settings_default(row.name))
        )
        pattern = {"literal": "literal", "prefixed": "prefix"}[row.pattern]
        for operation in row.operations:
            wanted.add((STRIMZI_RESOURCE[row.resource], name, pattern, operation))
    got = {
        (acl["resource"]["type"], acl["resource"]["name"], acl["resource"]["patternType"], op)
        for acl in user["spec"]["authorization"]["acls"]
        for op in acl["operations"]
    }
    assert got == wanted


def test_kubeconform_refuses_a_misspelt_strimzi_field(tmp_path: Path) -> None:
    """The vendored Strimzi schemas are strict: a misspelt KafkaUser field fails."""
    objects = render_strimzi(tmp_path, STRIMZI_VALUES)
    broken = json.loads(json.dumps(only(objects, "KafkaUser")))
    broken["spec"]["authorisation"] = broken["spec"].pop("authorization")
    with pytest.raises(AssertionError, match="authorisation"):
        kubeconform([broken])


def test_oauthbearer_login_renders_without_a_sasl_password() -> None:
    """OAUTHBEARER needs the token endpoint, client id and client secret (inline or its own
    Secret), never a SASL user name or password; the secret reaches the pod from a Secret."""
    login = (
        "config.FORWARDER_KAFKA_SECURITY_PROTOCOL=SASL_SSL",
        "config.FORWARDER_KAFKA_SASL_MECHANISM=OAUTHBEARER",
        "config.FORWARDER_KAFKA_OAUTH_TOKEN_URL=https://idp.example/token",
        "config.FORWARDER_KAFKA_OAUTH_CLIENT_ID=forwarder",
    )
    assert "kafkaOauthClientSecret" in render_fails(*login)
    objects = render("default-values.yaml", MAX_KUBE, (*login, "secrets.kafkaOauthClientSecret=s3"))
    _, container = workload(objects)
    env = {e["name"]: e for e in container["env"]}
    assert "FORWARDER_KAFKA_SASL_PASSWORD" not in env
    ref = env["FORWARDER_KAFKA_OAUTH_CLIENT_SECRET"]["valueFrom"]["secretKeyRef"]
    secret = only(objects, "Secret")
    assert ref == {"name": secret["metadata"]["name"], "key": "FORWARDER_KAFKA_OAUTH_CLIENT_SECRET"}
    assert "FORWARDER_KAFKA_OAUTH_CLIENT_SECRET" not in configmap_data(objects)
    assert "FORWARDER_KAFKA_OAUTH_CLIENT_ID" in render_fails(
        *login[:3], "secrets.kafkaOauthClientSecret=s3"
    )


def test_msk_iam_login_needs_a_region_and_no_keda_trigger() -> None:
    """AWS_MSK_IAM needs AWS_REGION (credentials come from the pod's role); the chart's KEDA
    trigger cannot log in with a token mechanism and says so."""
    login = (
        "config.FORWARDER_KAFKA_SECURITY_PROTOCOL=SASL_SSL",
        "config.FORWARDER_KAFKA_SASL_MECHANISM=AWS_MSK_IAM",
    )
    assert "AWS_REGION" in render_fails(*login)
    objects = render("default-values.yaml", MAX_KUBE, (*login, "config.AWS_REGION=eu-west-1"))
    _, container = workload(objects)
    assert not [e for e in container["env"] if e["name"].startswith("FORWARDER_KAFKA_SASL_PASS")]
    assert configmap_data(objects)["AWS_REGION"] == "eu-west-1"
    assert "KEDA" in render_fails(*login, "config.AWS_REGION=eu-west-1", "keda.enabled=true")
