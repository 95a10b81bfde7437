"""``forwarder check``, run as a user types it (``.venv/bin/forwarder check``), against the real
rig broker (plain, and secured with SCRAM and ACLs) and the fake Datagrid over real HTTP.

It must say ok for a working setup, FAIL (exit 1) on a wrong password, a missing topic that may
not be created, a missing ACL or an unreachable Datagrid, within seconds, exit 2 on a bad setting,
create nothing, and never print a secret.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import rig
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from forwarder.config import SecretStr, Settings
from forwarder.topics import topic_specs
from tests.conftest import REPO
from tests.support.service_helpers import forwarder_env

MakeSettings = Callable[..., Settings]
FORWARDER = REPO / ".venv" / "bin" / "forwarder"
USER = "forwarder"
PASSWORD = rig.DEFAULT_USERS[USER]
#: check's budget per network step in these runs; a FAIL must come well within a few of them.
STEP = 3.0


@dataclass(frozen=True)
class Run:
    """One ``forwarder check`` run: exit status, output, time taken, and its lines."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def lines(self) -> list[tuple[str, str, str]]:
        """The text report's lines, split on the two-space column gaps."""
        out = []
        for line in self.stdout.splitlines():
            status, rest = line.split("  ", 1)
            check, _, detail = rest.strip().partition("  ")
            out.append((status.strip(), check.strip(), detail.strip()))
        return out

    def line(self, check: str) -> tuple[str, str]:
        """(status, detail) of the one line named ``check``."""
        found = [(s, d) for s, c, d in self.lines if c == check]
        assert len(found) == 1, f"expected one {check!r} line in:\n{self.stdout}{self.stderr}"
        return found[0]


def run_check(settings: Settings, *args: str, **env: str) -> Run:
    """Run ``.venv/bin/forwarder check ARGS`` with ``settings`` as its environment."""
    started = time.monotonic()
    done = subprocess.run(
        [str(FORWARDER), "check", "--timeout", str(STEP), *args],
        env={**forwarder_env(settings), **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return Run(done.returncode, done.stdout, done.stderr, time.monotonic() - started)


def create_topics(bootstrap: str, topics: dict[str, tuple[int, dict[str, str]]]) -> None:
    """Create ``{name: (partitions, configs)}`` through a PLAINTEXT (super user) listener."""

    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic(name, n, 1, topic_configs=c) for name, (n, c) in topics.items()]
            )
        finally:
            await admin.close()

    asyncio.run(create())


def existing_topics(bootstrap: str) -> set[str]:
    """The broker's topics, listed by a super user."""

    async def listing() -> set[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            return set(await admin.list_topics())
        finally:
            await admin.close()

    return asyncio.run(listing())


def the_topics(settings: Settings) -> list[str]:
    return [
        settings.results_topic,
        settings.dead_letter_topic,
        settings.jobs_topic,
        settings.state_topic,
    ]


def create_all(bootstrap: str, settings: Settings, partitions: int = 3) -> None:
    """The four topics, made as an operator following docs/consumers.md would: with the configs
    the forwarder itself creates them with (state topic compacted and deleted, line topics
    retained at least as long as the state)."""
    specs = topic_specs(settings)
    create_topics(bootstrap, {t: (partitions, specs[t]) for t in the_topics(settings)})


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP port that accepts connections (the kernel's backlog) and never answers a byte."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


# --- a plain broker -------------------------------------------------------------------------------


def test_good_setup_is_all_ok(make_settings: MakeSettings, kafka_bootstrap: str) -> None:
    """With the topics in place, the broker up and the key right, every line is ok and exit is 0:
    login, each topic, the partition pairing, configs, group, producer id, the Datagrid key."""
    settings = make_settings(kafka_create_topics=False)
    create_all(kafka_bootstrap, settings)
    run = run_check(settings)
    assert run.returncode == 0, run.stdout + run.stderr
    assert {status for status, _, _ in run.lines} == {"ok"}, run.stdout
    for topic in the_topics(settings):
        assert run.line(f"topic {topic}") == ("ok", "exists: 3 partitions")
    assert run.line("partitions")[0] == "ok"
    assert run.line(f"config {settings.state_topic} cleanup.policy") == ("ok", "compact,delete")
    assert run.line(f"acl DescribeConfigs {settings.results_topic}") == ("ok", "granted")
    assert run.line(f"acl group {settings.consumer_group}")[0] == "ok"
    assert run.line("acl idempotent producer")[0] == "ok"
    assert run.line("datagrid")[0] == "ok"
    assert run.line("kafka") == ("ok", f"{kafka_bootstrap} (PLAINTEXT): 1 broker(s)")


def test_missing_topics_are_probed_never_created(
    make_settings: MakeSettings, kafka_bootstrap: str
) -> None:
    """With creation on, a missing topic is ok ("would be created at start", the controller asked
    with validate_only), and the check leaves the broker without it."""
    settings = make_settings()
    run = run_check(settings)
    assert run.returncode == 0, run.stdout + run.stderr
    for topic in the_topics(settings):
        status, detail = run.line(f"topic {topic}")
        assert status == "ok"
        assert detail.startswith("missing: would be created at start (3 partitions"), detail
    assert not set(the_topics(settings)) & existing_topics(kafka_bootstrap)


def test_missing_topic_with_creation_off_fails(
    make_settings: MakeSettings, kafka_bootstrap: str
) -> None:
    """A missing topic with FORWARDER_KAFKA_CREATE_TOPICS=false is a FAIL naming the setting
    (exit 1); the topics that exist stay ok, and nothing is created."""
    settings = make_settings(kafka_create_topics=False)
    present = [settings.results_topic, settings.jobs_topic, settings.state_topic]
    create_topics(kafka_bootstrap, {t: (3, {}) for t in present})
    run = run_check(settings)
    assert run.returncode == 1, run.stdout + run.stderr
    status, detail = run.line(f"topic {settings.dead_letter_topic}")
    assert status == "FAIL"
    assert "missing and FORWARDER_KAFKA_CREATE_TOPICS=false" in detail
    for topic in present:
        assert run.line(f"topic {topic}")[0] == "ok"
    assert settings.dead_letter_topic not in existing_topics(kafka_bootstrap)


def test_state_topic_shape_is_held_to_what_start_up_needs(
    make_settings: MakeSettings, kafka_bootstrap: str
) -> None:
    """A state topic with fewer partitions than the jobs topic FAILs (start-up refuses it); one
    that is not compacted is a warning."""
    settings = make_settings(kafka_create_topics=False)
    create_topics(
        kafka_bootstrap,
        {
            settings.results_topic: (3, {}),
            settings.dead_letter_topic: (3, {}),
            settings.jobs_topic: (3, {}),
            settings.state_topic: (2, {"cleanup.policy": "delete"}),
        },
    )
    run = run_check(settings)
    assert run.returncode == 1, run.stdout + run.stderr
    status, detail = run.line("partitions")
    assert status == "FAIL" and "has 2 partitions" in detail and "has 3" in detail
    status, detail = run.line(f"config {settings.state_topic} cleanup.policy")
    assert status == "warn" and detail.startswith("delete: not compacted")


def test_configs_that_weaken_the_guarantees_are_warnings(
    make_settings: MakeSettings, kafka_bootstrap: str
) -> None:
    """An existing results topic kept for 1 hour (shorter than the state retention) or compacted
    is reported as a warning naming the config and why; the rest stays ok and the exit 0."""
    settings = make_settings(kafka_create_topics=False)
    specs = topic_specs(settings)
    weak = {"retention.ms": "3600000", "cleanup.policy": "compact"}
    create_topics(
        kafka_bootstrap,
        {t: (3, weak if t == settings.results_topic else specs[t]) for t in the_topics(settings)},
    )
    run = run_check(settings)
    assert run.returncode == 0, run.stdout + run.stderr
    weak_lines = [d for s, c, d in run.lines if c == f"topic config {settings.results_topic}"]
    assert len(weak_lines) == 2, run.stdout
    assert any(d.startswith("retention.ms=3600000") for d in weak_lines)
    assert any(d.startswith("cleanup.policy=compact") for d in weak_lines)
    assert all(s == "warn" for s, c, _ in run.lines if c.startswith("topic config")), run.stdout


def test_warnings_alone_exit_0(make_settings: MakeSettings, kafka_bootstrap: str) -> None:
    """A state topic compacted but never deleted is a warning (it grows for ever), and warnings
    alone leave the exit status 0."""
    settings = make_settings(kafka_create_topics=False)
    create_topics(
        kafka_bootstrap,
        {
            t: (3, {"cleanup.policy": "compact"} if t == settings.state_topic else {})
            for t in the_topics(settings)
        },
    )
    run = run_check(settings)
    assert run.returncode == 0, run.stdout + run.stderr
    status, detail = run.line(f"config {settings.state_topic} cleanup.policy")
    assert status == "warn" and "grows for ever" in detail
    assert {s for s, _, _ in run.lines} == {"ok", "warn"}


def test_other_commands_do_not_import_check() -> None:
    """The CLI imports forwarder.check only for `check` (as `serve` imports the app), so
    `forward` and `enqueue` do not pay for it."""
    probe = "import sys, forwarder.cli; print('forwarder.check' in sys.modules)"
    done = subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), "-c", probe],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "False"


def test_unreachable_datagrid_fails_within_seconds(
    make_settings: MakeSettings, kafka_bootstrap: str, silent_port: int
) -> None:
    """A Datagrid that accepts the connection and never answers is a FAIL line after the step
    timeout, not a hang; the Kafka checks still report."""
    settings = make_settings(datagrid_base_url=f"http://127.0.0.1:{silent_port}/v1")
    run = run_check(settings)
    assert run.returncode == 1, run.stdout + run.stderr
    status, detail = run.line("datagrid")
    assert status == "FAIL"
    assert f"no answer within {STEP:g} s" in detail
    assert run.line("kafka")[0] == "ok"
    assert run.seconds < 4 * STEP + 10, f"took {run.seconds:.1f}s"


def test_wrong_datagrid_key_fails_naming_the_setting_without_echoing_it(
    make_settings: MakeSettings,
) -> None:
    """A key Datagrid refuses (401) is a FAIL line naming DATAGRID_API_KEY; the key itself is
    printed nowhere."""
    wrong = "dg_wrong_key_7a1c9e"
    settings = make_settings(datagrid_api_key=SecretStr(wrong))
    run = run_check(settings)
    assert run.returncode == 1
    status, detail = run.line("datagrid")
    assert status == "FAIL" and "HTTP 401" in detail and "DATAGRID_API_KEY" in detail
    assert wrong not in run.stdout + run.stderr


def test_unreachable_kafka_fails_within_seconds(
    make_settings: MakeSettings, silent_port: int
) -> None:
    """A bootstrap address that never answers is one FAIL line within seconds; the Kafka checks
    that need the connection say they did not run, and Datagrid is still checked."""
    settings = make_settings(kafka_bootstrap_servers=f"127.0.0.1:{silent_port}")
    run = run_check(settings)
    assert run.returncode == 1, run.stdout + run.stderr
    status, detail = run.line("kafka")
    assert status == "FAIL" and "did not run" in detail
    assert not [c for _, c, _ in run.lines if c.startswith(("topic ", "acl "))]
    assert run.line("datagrid")[0] == "ok"
    assert run.seconds < 4 * STEP + 10, f"took {run.seconds:.1f}s"


def test_json_output_has_the_same_checks(make_settings: MakeSettings, kafka_bootstrap: str) -> None:
    """--output json is one object: ok (false when a check failed) and the checks in order, each
    {status: ok|warn|fail, check, detail}, the same as the text lines."""
    settings = make_settings(kafka_create_topics=False)
    text = run_check(settings)
    run = run_check(settings, "--output", "json")
    assert run.returncode == text.returncode == 1
    report: dict[str, Any] = json.loads(run.stdout)
    assert set(report) == {"ok", "checks"}
    assert report["ok"] is False
    for entry in report["checks"]:
        assert set(entry) == {"status", "check", "detail"}
        assert entry["status"] in {"ok", "warn", "fail"}
    assert [(e["status"], e["check"]) for e in report["checks"]] == [
        ("fail" if s == "FAIL" else s, c) for s, c, _ in text.lines
    ]
    create_all(kafka_bootstrap, settings)
    good = json.loads(run_check(settings, "--output", "json").stdout)
    assert good["ok"] is True
    assert {e["status"] for e in good["checks"]} == {"ok"}


@pytest.mark.parametrize("output", ["text", "json"])
def test_a_bad_setting_exits_2_with_its_line(make_settings: MakeSettings, output: str) -> None:
    """A misspelt variable is the settings check's FAIL (exit 2, as the other commands), and
    nothing is contacted."""
    run = run_check(make_settings(), "--output", output, FORWARDER_HTTP_PORTT="1")
    assert run.returncode == 2, run.stdout + run.stderr
    if output == "json":
        report = json.loads(run.stdout)
        assert report["ok"] is False
        (entry,) = report["checks"]
        status, check, detail = entry["status"], entry["check"], entry["detail"]
    else:
        ((status, check, detail),) = run.lines
    assert (status.lower(), check) == ("fail", "settings")
    assert "FORWARDER_HTTP_PORTT: unknown variable" in detail


# --- a secured broker (SASL_SSL with SCRAM, ACLs on) ----------------------------------------------


def scram(broker: rig.Broker, password: str = PASSWORD, **changes: Any) -> dict[str, Any]:
    """Settings fields for logging in to ``broker`` as ``forwarder`` over SASL_SSL/SCRAM."""
    assert broker.security is not None
    return {
        "kafka_bootstrap_servers": broker.sasl_ssl_bootstrap,
        "kafka_security_protocol": "SASL_SSL",
        "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": USER,
        "kafka_sasl_password": SecretStr(password),
        "kafka_ssl_cafile": str(broker.security.tls.ca_cert),
        **changes,
    }


def documented_grants(settings: Settings) -> list[rig.Acl]:
    """What docs/security.md lists for topics made beforehand, in exactly-once mode."""
    user = f"User:{USER}"
    acls = [
        rig.Acl(user, "topic", t, op)
        for t in (settings.results_topic, settings.dead_letter_topic)
        for op in ("Write", "DescribeConfigs")
    ]
    acls += [
        rig.Acl(user, "topic", t, op)
        for t in (settings.jobs_topic, settings.state_topic)
        for op in ("Write", "Read")
    ]
    acls.append(rig.Acl(user, "group", settings.consumer_group, "Read"))
    acls.append(
        rig.Acl(user, "transactional-id", f"{settings.consumer_group}-", "Write", "prefixed")
    )
    return acls


def test_wrong_password_fails_naming_the_settings_without_echoing_it(
    make_settings: MakeSettings, secured: rig.Broker
) -> None:
    """A wrong SCRAM password is a FAIL on the kafka line naming the SASL settings, within
    seconds; the password is printed nowhere (stdout or the logs on stderr)."""
    wrong = "not-the-password-5d3e"
    settings = make_settings(**scram(secured, wrong))
    run = run_check(settings)
    assert run.returncode == 1, run.stdout + run.stderr
    status, detail = run.line("kafka")
    assert status == "FAIL"
    assert "Kafka refused the login" in detail and "FORWARDER_KAFKA_SASL_PASSWORD" in detail
    assert wrong not in run.stdout + run.stderr
    assert run.seconds < 4 * STEP + 10, f"took {run.seconds:.1f}s"


def test_documented_acls_pass_and_missing_ones_fail(
    make_settings: MakeSettings, secured: rig.Broker
) -> None:
    """Logged in with the right password and exactly the documented ACLs (exactly-once, topics
    made beforehand) every line is ok; without the DescribeConfigs and transactional-id grants
    (other topics and group, so other ACLs) exactly those lines FAIL."""
    granted = make_settings(delivery="exactly-once", kafka_create_topics=False, **scram(secured))
    lacking = make_settings(delivery="exactly-once", kafka_create_topics=False, **scram(secured))
    for settings in (granted, lacking):
        create_all(secured.bootstrap, settings)
    secured.create_acls(documented_grants(granted))
    secured.create_acls(
        [
            acl
            for acl in documented_grants(lacking)
            if acl.operation != "DescribeConfigs" and acl.resource_type != "transactional-id"
        ]
    )

    run = run_check(granted)
    assert run.returncode == 0, run.stdout + run.stderr
    assert {status for status, _, _ in run.lines} == {"ok"}, run.stdout
    assert run.line(f"acl transactional-id {granted.consumer_group}-")[0] == "ok"

    run = run_check(lacking)
    assert run.returncode == 1, run.stdout + run.stderr
    failed = {check for status, check, _ in run.lines if status == "FAIL"}
    assert failed == {
        f"acl DescribeConfigs {lacking.results_topic}",
        f"acl DescribeConfigs {lacking.dead_letter_topic}",
        f"acl transactional-id {lacking.consumer_group}-",
    }, run.stdout
