"""The README's demo: a broker, the fake Datagrid and ``forwarder serve``; one signed webhook.

Run from the repository root with ``make demo`` (or ``.venv/bin/python deploy/demo.py``).  It
starts a local Kafka broker (``deploy/kafka/rig.py``, reused if one already answers on the port),
the fake Datagrid API with a sample batch, and ``forwarder serve``; sends a correctly signed
``batch_prediction.completed`` webhook; waits until the batch is forwarded; prints the Kafka
messages and the batch state; and stops what it started.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "deploy" / "kafka")]

import rig  # noqa: E402

from forwarder.config import SecretStr, Settings  # noqa: E402
from tests.support.fake_datagrid import start_fake_datagrid  # noqa: E402
from tests.support.kafka_helpers import read_topic  # noqa: E402
from tests.support.service_helpers import API_TOKEN, Forwarder, event_body, wait_until  # noqa: E402

BATCH = "bpred_demo_1"
API_KEY = "dg_demo_key"
LINES = [
    {
        "custom_id": "invoice-1",
        "status": "succeeded",
        "output": {"invoice_no": "A-100", "total": 12.5},
    },
    {
        "custom_id": "invoice-2",
        "status": "errored",
        "output": None,
        "error": {
            "type": "https://api.datagrid.com/errors/file_not_found",
            "title": "File Not Found",
            "status": 404,
        },
    },
    {"custom_id": "invoice-3", "status": "succeeded", "output": {"invoice_no": "B-7", "total": 99}},
]


def main() -> int:
    port = int(os.environ.get("DEMO_KAFKA_PORT", "9092"))
    broker = rig.Broker(port=port)
    started_broker = not broker.is_ready()
    if started_broker:
        print(f"starting Kafka on 127.0.0.1:{port} ...")
        broker.start()
    fake = start_fake_datagrid(API_KEY)
    lines = [
        json.dumps(
            {
                "object": "batch_prediction.result",
                "batch_id": BATCH,
                **line,
                **({"error": None} if "error" not in line else {}),
            },
            separators=(",", ":"),
        )
        for line in LINES
    ]
    lines.insert(2, "this line is not JSON")  # shows the dead-letter topic
    fake.configure(BATCH, lines=lines)
    suffix = str(int(time.time()))
    settings = Settings(
        kafka_bootstrap_servers=broker.bootstrap,
        datagrid_base_url=fake.base_url,
        datagrid_api_key=SecretStr(API_KEY),
        webhook_secrets=[SecretStr("whsec_demo")],
        api_tokens=[SecretStr(API_TOKEN)],
        results_topic=f"demo.batch-results.{suffix}",
        dead_letter_topic=f"demo.batch-results.dlq.{suffix}",
        jobs_topic=f"demo.batch-jobs.{suffix}",
        state_topic=f"demo.batch-state.{suffix}",
        consumer_group=f"demo-{suffix}",
        log_format="json",
    )
    log_dir = REPO / ".cache" / "demo"
    log_dir.mkdir(parents=True, exist_ok=True)
    fwd = Forwarder(settings, log_dir, name="demo").start()
    try:
        fwd.wait_ready(60)
        print(f"forwarder serve is ready on {fwd.url} (log: {fwd.log_path})")
        response = fwd.webhook(event_body(BATCH, "evt_demo_1"), secret="whsec_demo")  # noqa: S106 - demo secret
        print(f"POST /webhooks/datagrid (signed) -> {response.status_code} {response.text}")
        wait_until(
            lambda: (fwd.state(BATCH) or {}).get("status") in ("forwarded", "failed"),
            60,
            "the batch to be forwarded",
        )
        for title, topic in (
            ("results", settings.results_topic),
            ("dead letters", settings.dead_letter_topic),
        ):
            records = asyncio.run(read_topic(broker.bootstrap, topic))
            print(f"\n== {title} topic {topic}: {len(records)} message(s)")
            for r in records:
                headers = ", ".join(
                    f"{k}={v.decode(errors='replace')}" for k, v in r.headers.items()
                )
                print(f"partition {r.partition} offset {r.offset} key={(r.key or b'').decode()}")
                print(f"  headers: {headers}")
                print(f"  value:   {(r.value or b'').decode(errors='replace')}")
        print("\n== GET /v1/batches/" + BATCH)
        print(json.dumps(fwd.state(BATCH), indent=2))
        return 0
    finally:
        fwd.stop()
        fake.stop()
        if started_broker:
            broker.stop()


if __name__ == "__main__":
    sys.exit(main())
