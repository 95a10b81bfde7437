"""``examples/consumer.py`` runs against the real broker and does what docs/consumers.md says."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable

from forwarder.config import Delivery, Settings
from tests.conftest import REPO
from tests.support.fake_datagrid import FakeDatagrid, generate_lines
from tests.support.service_helpers import forwarder_env, run_forwarder

MakeSettings = Callable[..., Settings]
EXAMPLE = REPO / "examples" / "consumer.py"


def run_example(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """The example as a user runs it, pointed at this test's topics."""
    return subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            "--bootstrap",
            settings.kafka_bootstrap_servers,
            "--results-topic",
            settings.results_topic,
            "--dead-letter-topic",
            settings.dead_letter_topic,
            "--state-topic",
            settings.state_topic,
            "--group",
            f"example-{uuid.uuid4().hex[:8]}",
            "--timeout",
            "60",
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_example_consumer_dedupes_and_knows_when_batches_are_complete(
    make_settings: MakeSettings, fake_datagrid: FakeDatagrid, batch_id: str
) -> None:
    """Two batches forwarded exactly-once, one of them twice (a replay): the example reports each
    complete once its state is read, with every line once, the replay's copies ignored, and the
    dead letters by reason; a failed batch is reported as failed (exit 1)."""
    settings = make_settings(delivery=Delivery.EXACTLY_ONCE)
    env = forwarder_env(settings)
    statuses = ["succeeded", "succeeded", "errored", "canceled", "expired"]
    other = f"{batch_id}_b"
    lines = [
        line.decode()
        for line in generate_lines(batch_id, {"count": 10, "line_bytes": 200, "statuses": statuses})
    ]
    fake_datagrid.configure(batch_id, lines=[*lines[:5], "{oops", "[]", *lines[5:]])
    fake_datagrid.configure(other, generate={"count": 300, "statuses": ["succeeded"]})
    for args in ((batch_id, other), (batch_id,)):  # the second forward of batch_id is a replay
        done = run_forwarder(env, "forward", *args)
        assert done.returncode == 0, done.stdout + done.stderr

    ran = run_example(settings, "--until-complete", batch_id, other)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert sorted(ran.stdout.splitlines()) == sorted(
        [
            f"{batch_id}: complete: 10 results (canceled 2, errored 2, expired 2, succeeded 4), "
            "2 dead letters (invalid_json 1, not_an_object 1), 12 duplicates ignored",
            f"{other}: complete: 300 results (succeeded 300), 0 dead letters (), "
            "0 duplicates ignored",
        ]
    )

    gone = f"{batch_id}_gone"
    fake_datagrid.configure(gone, results_gone=True)
    failed = run_forwarder(env, "forward", gone)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    ran = run_example(settings, "--until-complete", gone)
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert any(
        line.startswith(f"{gone}: failed: upstream_rejected: ") for line in ran.stdout.splitlines()
    ), ran.stdout
