"""The chart and the image on a real Kubernetes cluster (``make k8s-e2e``, part of ``make test``).

One cluster for the module (``deploy/k8s/cluster.sh``): etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, a kubelet on containerd and kube-proxy, all built or
installed by the project's scripts. The image is the project's Dockerfile built with podman
(``deploy/k8s/image.sh``). A Kafka broker and the fake Datagrid listen on the gateway of the pods'
bridge, so pods reach them; the test reaches the pods through the chart's Service (kube-proxy).

Nothing here skips: a missing tool, image or binary fails the test with what to run.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from forwarder.webhooks import sign
from tests import docblocks
from tests.support.fake_datagrid import FakeDatagrid, generate_lines, start_fake_datagrid
from tests.support.kafka_helpers import read_topic
from tests.support.service_helpers import wait_until
from tests.support.tally import Tally

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "forwarder"
K8S = REPO / "deploy" / "k8s"
BIN = Path(os.environ.get("FORWARDER_K8S_BIN", REPO / ".cache" / "tools" / "bin"))
CRD_YAML = REPO / "deploy" / "tools" / "schemas" / "crd-yaml"
RESULTS = REPO / ".cache" / "k8s" / "e2e-results.json"
SCENARIOS = sorted(
    p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml")
)
IMAGE_REPOSITORY, IMAGE_TAG = "localhost/datagrid-forwarder", "e2e"
POD_CIDR = os.environ.get("FORWARDER_K8S_POD_CIDR", "10.233.7.0/24")
GATEWAY = POD_CIDR.rsplit(".", 1)[0] + ".1"
#: The key the ci/ scenarios install (secrets.datagridApiKey): the cluster's fake Datagrid accepts
#: it, so that a scenario's `forwarder check` hook (check.enabled) passes its authenticated GET.
API_KEY = "dg-test-key"
WEBHOOK_SECRET = "whsec-k8s-e2e"
MODES = ("at-least-once", "exactly-once")


def run(*cmd: str | Path, input: str | None = None, timeout: float = 300) -> str:
    """Run a command; fail with its output if it fails."""
    env = {**os.environ, "KUBECONFIG": os.environ.get("FORWARDER_K8S_KUBECONFIG", "")}
    proc = subprocess.run(
        [str(c) for c in cmd],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-3000:]}",
            pytrace=False,
        )
    return proc.stdout


def kubectl(*args: str, input: str | None = None, timeout: float = 120) -> str:
    return run(BIN / "kubectl", *args, input=input, timeout=timeout)


def helm(*args: str | Path, timeout: float = 300) -> str:
    return run(BIN / "helm", *args, timeout=timeout)


@dataclass
class Cluster:
    """The running cluster: its kubeconfig and state directory (logs)."""

    kubeconfig: str
    state: Path

    def logs(self, lines: int = 30) -> str:
        """The tail of every component's log, for failure messages."""
        out = []
        for log in sorted((self.state / "logs").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"---- {log.name}\n" + "\n".join(text))
        return "\n".join(out)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A real one-node cluster for this module, stopped (processes, mounts, bridge) at the end."""
    script = K8S / "cluster.sh"
    state = Path(os.environ.get("FORWARDER_K8S_STATE", f"/tmp/fwd-k8s-test-{os.getpid()}"))
    env = {**os.environ, "FORWARDER_K8S_STATE": str(state), "FORWARDER_K8S_BIN": str(BIN)}
    started = time.monotonic()
    RESULTS.unlink(missing_ok=True)  # the summary line counts this run only
    up = subprocess.run([script, "up"], capture_output=True, text=True, env=env, timeout=300)
    try:
        if up.returncode != 0:
            pytest.fail(f"cluster.sh up failed:\n{up.stderr[-6000:]}", pytrace=False)
        kubeconfig = up.stdout.strip().splitlines()[-1]
        os.environ["FORWARDER_K8S_KUBECONFIG"] = kubeconfig
        print(f"k8s-e2e: cluster up in {time.monotonic() - started:.1f}s")
        yield Cluster(kubeconfig, state)
    finally:
        down = subprocess.run(
            [script, "down"], capture_output=True, text=True, env=env, timeout=180
        )
        os.environ.pop("FORWARDER_K8S_KUBECONFIG", None)
        assert down.returncode == 0, f"cluster.sh down failed:\n{down.stderr}"


@pytest.fixture(scope="module")
def pod_kafka(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """A broker with a listener on the bridge gateway (for pods) and one on loopback (for us).

    Returns (bootstrap for this process, bootstrap for pods).
    """
    import rig  # tests/conftest.py puts deploy/kafka on sys.path

    port, controller, pod_port = rig.free_ports(3)
    listeners = {
        "listeners": f"PLAINTEXT://127.0.0.1:{port},POD://{GATEWAY}:{pod_port},"
        f"CONTROLLER://127.0.0.1:{controller}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port},POD://{GATEWAY}:{pod_port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,POD:PLAINTEXT,CONTROLLER:PLAINTEXT",
    }
    broker = rig.Broker(port, tmp_path_factory.mktemp("k8s-kafka"), controller, listeners)
    try:
        broker.start(wait=90)
    except Exception as exc:
        pytest.fail(f"could not start the pods' Kafka broker: {exc}", pytrace=False)
    try:
        yield broker.bootstrap, f"{GATEWAY}:{pod_port}"
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def pod_datagrid(cluster: Cluster) -> Iterator[FakeDatagrid]:
    """The fake Datagrid on the bridge gateway, where pods reach it."""
    with start_fake_datagrid(API_KEY, host=GATEWAY) as fake:
        yield fake


@pytest.fixture(scope="module")
def prerequisites(cluster: Cluster) -> None:
    """What the scenarios expect of a cluster: the CRDs, a `monitoring` namespace and the
    `high-priority` PriorityClass (all-features)."""
    kubectl("apply", "--server-side", "-f", str(CRD_YAML))
    kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    kubectl(
        "apply",
        "-f",
        "-",
        input=yaml.safe_dump_all(
            [
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "monitoring"}},
                {
                    "apiVersion": "scheduling.k8s.io/v1",
                    "kind": "PriorityClass",
                    "metadata": {"name": "high-priority"},
                    "value": 100000,
                },
            ]
        ),
    )


def restricted_namespace(name: str) -> None:
    """A namespace enforcing Pod Security `restricted`, with its `default` ServiceAccount."""
    kubectl(
        "apply",
        "-f",
        "-",
        input=yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": name,
                    "labels": {
                        "pod-security.kubernetes.io/enforce": "restricted",
                        "pod-security.kubernetes.io/warn": "restricted",
                    },
                },
            }
        ),
    )
    wait_until(
        lambda: (
            subprocess.run(
                [BIN / "kubectl", "get", "serviceaccount", "default", "-n", name],
                env={**os.environ, "KUBECONFIG": os.environ["FORWARDER_K8S_KUBECONFIG"]},
                capture_output=True,
            ).returncode
            == 0
        ),
        30,
        f"ServiceAccount default in {name}",
    )


def scenario_objects(namespace: str) -> list[dict[str, Any]]:
    """The objects the ci/ scenarios name but do not create: a ServiceAccount, the existing
    Secret, the Kafka CA (Secret and ConfigMap), a corporate CA bundle, a client certificate, the
    account ConfigMap."""
    pem = _self_signed_pem()
    meta = {"namespace": namespace}
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "platform-workloads", **meta},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "datagrid-forwarder-credentials", **meta},
            "stringData": {
                "DATAGRID_API_KEY": API_KEY,
                "FORWARDER_WEBHOOK_SECRETS": WEBHOOK_SECRET,
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "kafka-ca", **meta},
            "stringData": {"ca.crt": pem["crt"]},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "kafka-ca-bundle", **meta},
            "data": {"ca.pem": pem["crt"]},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "corp-ca-bundle", **meta},  # all-features' extra volume
            "data": {"ca.crt": pem["crt"]},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {"name": "forwarder-kafka-client", **meta},
            "stringData": {"tls.crt": pem["crt"], "tls.key": pem["key"]},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "datagrid-account", **meta},
            "data": {"teamspace": "k8s-e2e"},
        },
    ]


_PEM: dict[str, str] = {}


def _self_signed_pem() -> dict[str, str]:
    if not _PEM:
        out = Path(run("mktemp", "-d").strip())
        run(
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=k8s-e2e", "-keyout", out / "key.pem", "-out", out / "crt.pem",
        )  # fmt: skip
        _PEM.update(crt=(out / "crt.pem").read_text(), key=(out / "key.pem").read_text())
        run("rm", "-rf", out)
    return _PEM


def cluster_values(kafka_for_pods: str, fake: FakeDatagrid, **config: Any) -> str:
    """Values that make a release run here: the locally built image (never pulled), Kafka and
    Datagrid on the bridge, plaintext Kafka (the test broker speaks nothing else), topics created
    with one replica (one broker)."""
    values = {
        "image": {
            "repository": IMAGE_REPOSITORY,
            "tag": IMAGE_TAG,
            "digest": "",
            "pullPolicy": "Never",
        },
        "config": {
            "FORWARDER_KAFKA_BOOTSTRAP_SERVERS": kafka_for_pods,
            "FORWARDER_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
            "FORWARDER_KAFKA_CREATE_TOPICS": True,
            "FORWARDER_KAFKA_REPLICATION_FACTOR": 1,
            "FORWARDER_DATAGRID_BASE_URL": fake.base_url,
            **config,
        },
        # A scenario's own init containers and sidecars (busybox, envoy in all-features) cannot be
        # pulled here: no registry is reachable. Their spec is still checked, as written, by the
        # strict server-side dry run; the installed release runs the forwarder's container alone.
        "initContainers": [],
        "extraContainers": [],
    }
    path = Path(run("mktemp", "--suffix=-values.yaml").strip())
    path.write_text(yaml.safe_dump(values))
    return str(path)


# --- every ci/ scenario: strict server-side dry run, install --wait, helm test, uninstall -------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_installs_runs_and_passes_helm_test(
    scenario: str,
    cluster: Cluster,
    prerequisites: None,
    pod_kafka: tuple[str, str],
    pod_datagrid: FakeDatagrid,
) -> None:
    """A ci/ scenario passes the API server's strict dry run as written, installs (`--wait`: real
    pods of the real image Ready in a PSA-restricted namespace), passes `helm test` (/readyz
    through the Service) and uninstalls."""
    namespace = f"ci-{scenario}"
    values = CHART / "ci" / f"{scenario}-values.yaml"
    restricted_namespace(namespace)
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all(scenario_objects(namespace)))
    started = time.monotonic()

    rendered = helm("template", "fwd", CHART, "-n", namespace, "-f", values)
    kubectl(
        "apply", "--dry-run=server", "--validate=strict", "--warnings-as-errors", "-f", "-",
        input=rendered,
    )  # fmt: skip

    here = cluster_values(pod_kafka[1], pod_datagrid)
    try:
        helm("install", "fwd", CHART, "-n", namespace, "-f", values, "-f", here,
             "--wait", "--timeout", "180s", timeout=240)  # fmt: skip
    except BaseException:
        print(kubectl("get", "pods,events", "-n", namespace, "-o", "wide"))
        print(cluster.logs())
        raise
    # The pod exits non-zero unless /healthz and /readyz answer 200 through the Service; it is
    # deleted once it succeeds (hook-succeeded), so its phase is what helm reports.
    out = helm("test", "fwd", "-n", namespace, "--timeout", "120s", timeout=180)
    assert re.search(r"Phase:\s+Succeeded", out), out
    helm("uninstall", "fwd", "-n", namespace, "--wait", "--timeout", "120s", timeout=180)
    kubectl("delete", "namespace", namespace, "--wait=false")
    print(f"k8s-e2e: scenario {scenario} ok in {time.monotonic() - started:.1f}s")


# --- end to end: webhooks through the Service, a rolling upgrade while they keep arriving ------


@dataclass
class Sender:
    """Sends one signed webhook per batch through the Service, in a thread, until stopped."""

    url: str
    fake: FakeDatagrid
    lines_per_batch: int
    prefix: str
    interval: float = 0.4
    sent: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    error: BaseException | None = None

    def spec(self) -> dict[str, int]:
        return {"count": self.lines_per_batch, "distinct_ids": self.lines_per_batch}

    def send_one(self, client: httpx.Client) -> None:
        batch_id = f"bpred_{self.prefix}_{len(self.sent):04d}"
        self.fake.configure(batch_id, generate=self.spec())
        body = json.dumps(
            {
                "id": f"evt_{batch_id}",
                "event_type": "batch_prediction.completed",
                "timestamp": int(time.time()),
                "data": {"object": "batch_prediction", "id": batch_id, "status": "completed"},
            },
            separators=(",", ":"),
        ).encode()
        # Datagrid retries a delivery that fails; so does this sender, and counts the failures.
        for attempt in range(5):
            t = int(time.time())
            headers = {
                "Datagrid-Signature": f"t={t},v1={sign(WEBHOOK_SECRET.encode(), t, body)}",
                "Content-Type": "application/json",
            }
            try:
                response = client.post("/webhooks/datagrid", content=body, headers=headers)
                if response.status_code in (200, 202):
                    self.sent.append(batch_id)
                    return
                self.failures.append(
                    f"{batch_id}: HTTP {response.status_code} {response.text[:200]}"
                )
            except httpx.TransportError as exc:
                self.failures.append(f"{batch_id}: {type(exc).__name__} {exc}")
            time.sleep(0.5 * (attempt + 1))
        raise AssertionError(f"webhook for {batch_id} failed 5 times: {self.failures[-5:]}")

    def _loop(self) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=10) as client:
                while not self._stop.is_set():
                    self.send_one(client)
                    self._stop.wait(self.interval)
        except BaseException as exc:  # surfaced by count(), which the test polls
            self.error = exc

    def count(self) -> int:
        """Webhooks accepted so far; raises what stopped the sender, if anything did."""
        if self.error is not None:
            raise AssertionError(f"the webhook sender stopped: {self.error}") from self.error
        return len(self.sent)

    def start(self) -> Sender:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(60)

    def expected(self) -> dict[tuple[str, bytes], bytes]:
        return {
            (batch_id, f"cid-{i:08d}".encode()): line
            for batch_id in self.sent
            for i, line in enumerate(generate_lines(batch_id, self.spec()))
        }


def results_tally(bootstrap: str, topic: str, expected: dict[tuple[str, bytes], bytes]) -> Tally:
    """What a read_committed consumer of ``topic`` sees of ``expected``."""
    records = asyncio.run(read_topic(bootstrap, topic, timeout=60))
    batches = {batch_id for batch_id, _ in expected}
    mine = [
        (r.headers.get("datagrid-batch-id", b"").decode(), r.key, r.value)
        for r in records
        if r.headers.get("datagrid-batch-id", b"").decode() in batches
    ]
    return Tally.of(mine, expected)


def live_pods(namespace: str, selector: str) -> set[str]:
    """Names of the pods of ``selector`` that are not terminating."""
    pods = json.loads(kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json"))[
        "items"
    ]
    return {p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp")}


def ready_pods(namespace: str, selector: str) -> tuple[int, int]:
    """(ready, total) pods of ``selector`` that are not terminating."""
    pods = json.loads(kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json"))[
        "items"
    ]
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    ready = [
        p
        for p in live
        if any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p["status"].get("conditions", [])
        )
    ]
    return len(ready), len(live)


# The chart README's install command, run as written (tests/docblocks.py, docs/testing.md): its
# release and namespace, so the test walks the path a reader takes.
RELEASE, NAMESPACE = "forwarder", "datagrid"
API_TOKEN = "k8s-e2e-token"


def doc_block_env() -> dict[str, str]:
    """A reader's shell: the cluster's kubeconfig, the project's kubectl and helm first on PATH,
    and the variables the chart README's command reads ($DATAGRID_API_KEY...)."""
    env = docblocks.clean_environment(
        KUBECONFIG=os.environ["FORWARDER_K8S_KUBECONFIG"],
        DATAGRID_API_KEY=API_KEY,
        DATAGRID_WEBHOOK_SECRET=WEBHOOK_SECRET,
    )
    env["PATH"] = f"{BIN}:{env['PATH']}"
    return env


def install_as_documented(mode: str, kafka_for_pods: str, fake: FakeDatagrid) -> None:
    """The chart README's `helm install ...` and `helm test ...`, as written plus the rows of the
    substitution table (the local image, the test's Kafka and Datagrid)."""
    b = docblocks.block("chart-install")
    documented = f"helm install {RELEASE} ./helm/forwarder --namespace {NAMESPACE} "
    assert documented in b.text, f"{b.where} no longer says `{documented}`: update RELEASE too"
    values = {
        "pod_kafka": kafka_for_pods,
        "pod_datagrid": fake.base_url,
        "image_repository": IMAGE_REPOSITORY,
        "image_tag": IMAGE_TAG,
        "scenario": "" if mode == "at-least-once" else f"--set config.FORWARDER_DELIVERY={mode}",
    }
    docblocks.run(b, values, doc_block_env(), timeout=600)


@pytest.mark.parametrize("mode", MODES)
def test_webhooks_through_the_service_survive_a_rolling_upgrade(
    mode: str,
    cluster: Cluster,
    prerequisites: None,
    pod_kafka: tuple[str, str],
    pod_datagrid: FakeDatagrid,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Installed with the chart README's command as written (release `forwarder`, namespace
    `datagrid`, its `helm test` passing), signed webhooks sent through the Service (kube-proxy)
    are forwarded to Kafka, and keep being forwarded while `helm upgrade` changes a setting and
    rolls the pods: no batch lost, duplicates only in at-least-once mode (none under
    read_committed in exactly-once); then the runbooks' kubectl and curl commands work on it."""
    namespace = NAMESPACE
    suffix = uuid.uuid4().hex[:8]
    selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/name=forwarder"
    try:
        install_as_documented(mode, pod_kafka[1], pod_datagrid)
        wait_until(lambda: ready_pods(namespace, selector) == (2, 2), 180, "2/2 pods Ready")
    except BaseException:
        print(kubectl("get", "pods,events", "-n", namespace, "-o", "wide"))
        print(cluster.logs())
        raise
    pods = json.loads(kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json"))
    restarts = [c["restartCount"] for p in pods["items"] for c in p["status"]["containerStatuses"]]
    service = json.loads(kubectl("get", "service", RELEASE, "-n", namespace, "-o", "json"))
    url = f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"
    try:
        httpx.get(f"{url}/readyz", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        pytest.fail(
            f"the Service {url} (kube-proxy) does not answer from the host: {exc!r}\n"
            f"{cluster.logs()}",
            pytrace=False,
        )

    sender = Sender(url, pod_datagrid, lines_per_batch=40, prefix=f"{mode[:3]}{suffix}").start()
    wait_until(lambda: sender.count() >= 5, 60, "5 webhooks before the upgrade")
    before = len(sender.sent)
    old_pods = live_pods(namespace, selector)
    # The upgrade changes a setting (the ConfigMap's checksum rolls every pod) and adds the API
    # token the runbook's curl uses; the README's own values are kept.
    helm("upgrade", RELEASE, CHART, "-n", namespace, "--reuse-values",
         "--set", "config.FORWARDER_LOG_LEVEL=DEBUG", "--set", f"secrets.apiTokens={API_TOKEN}",
         "--wait", "--timeout", "240s", timeout=300)  # fmt: skip
    during = len(sender.sent) - before
    wait_until(lambda: sender.count() >= before + during + 5, 60, "5 webhooks after the upgrade")
    sender.stop()
    ready, total = ready_pods(namespace, selector)
    new_pods = live_pods(namespace, selector)

    expected = sender.expected()
    bootstrap = pod_kafka[0]
    topic = "datagrid.batch-results"  # the service's default: the README sets no topic
    wait_until(
        lambda: results_tally(bootstrap, topic, expected).lost == 0,
        180,
        f"all {len(sender.sent)} batches forwarded",
        interval=2,
    )
    tally = results_tally(bootstrap, topic, expected)
    config = json.loads(kubectl("get", "configmap", RELEASE, "-n", namespace, "-o", "json"))

    # docs/runbooks.md's commands, on this install (its rows of the substitution table).
    runbook = {
        "batch_id": sender.sent[-1],
        "service_ip": service["spec"]["clusterIP"],
        "api_token": API_TOKEN,
    }
    docblocks.run(docblocks.block("runbook-logs"), runbook, doc_block_env(), timeout=120)
    state = docblocks.run(
        docblocks.block("runbook-state"), runbook, doc_block_env(), timeout=120
    ).stdout

    helm("uninstall", RELEASE, "-n", namespace, "--wait", "--timeout", "120s", timeout=180)
    # Deleted to the end: the next run's `--create-namespace` needs it gone, not terminating.
    kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=180s", timeout=240)

    assert restarts and not any(restarts), f"containers restarted after install: {restarts}"
    assert config["data"]["FORWARDER_LOG_LEVEL"] == "DEBUG"
    assert old_pods and not (old_pods & new_pods), "the upgrade rolled every pod"
    assert during >= 1, "webhooks kept arriving during the rollout"
    assert (ready, total) == (2, 2), f"{ready}/{total} pods ready after the upgrade"
    assert tally.lost == 0 and tally.unexpected == 0, tally
    assert '"status": "forwarded"' in state, f"the runbook's curl printed: {state}"
    # Datagrid retries a delivery answered 503; such retries are counted and shown, never hidden.
    # Anything else (a refused connection, a 5xx other than 503, a 4xx) fails the test.
    refused = [f for f in sender.failures if "HTTP 503" not in f]
    assert not refused, f"webhook deliveries failed through the Service: {refused}"
    if mode == "exactly-once":
        assert tally.duplicates == 0, tally

    summary = {
        "batches": len(sender.sent),
        "during_upgrade": during,
        "lines": tally.expected,
        "lost": tally.lost,
        "duplicates": tally.duplicates,
        "retried_503": len(sender.failures),
        "ready": ready,
        "total": total,
    }
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[mode] = summary
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    with capsys.disabled():
        print(f"\nk8s-e2e: {mode}: {json.dumps(summary)}")
        if set(results) == set(MODES):
            print(summary_line(results))


def summary_line(results: dict[str, dict[str, int]]) -> str:
    """The line `make k8s-e2e` ends with (checked by CI)."""
    batches = sum(r["batches"] for r in results.values())
    lines = sum(r["lines"] for r in results.values())
    lost = sum(r["lost"] for r in results.values())
    duplicates = sum(r["duplicates"] for r in results.values())
    ready = min(r["ready"] for r in results.values())
    total = max(r["total"] for r in results.values())
    return (
        f"k8s-e2e: ok, {batches} batches, {lines} lines through the Service, {lost} lost, "
        f"{duplicates} duplicates, upgrade {ready}/{total} pods ready"
    )


def test_crd_schemas_are_generated_from_the_vendored_crds(tmp_path: Path) -> None:
    """deploy/tools/schemas/crds is exactly what crd_to_jsonschema.py makes of the vendored CRD
    YAML that the cluster test installs (one source for kubeconform and the API server)."""
    script = REPO / "deploy" / "tools" / "schemas" / "crd_to_jsonschema.py"
    run(sys.executable, script, *sorted(CRD_YAML.glob("*.yaml")), "--out", tmp_path)
    made = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*.json")}
    vendored = CRD_YAML.parent / "crds"
    assert made and made == {
        p.relative_to(vendored): p.read_bytes() for p in vendored.rglob("*.json")
    }
