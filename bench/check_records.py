"""Check that the contenders write the same records as the service, record by record.

    python -m bench.check_records [--lines 5000]

Forwards one small batch with each contender (fresh topics), reads every topic back and compares,
per line number, the partition, key, value and headers with what ``forwarder forward`` wrote.
(kcat is compared on partition, key and value only: it cannot send per-line headers.)  Also checks
``forwarder.kafka.murmur2`` (the service's partitioner, which the aiokafka baselines and the
harness borrow) against aiokafka's on random keys.  Exit 1 on any difference.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
from pathlib import Path

from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from bench.data import Workload
from bench.harness import BenchFailure, log, measure
from bench.oneshot import contender_command
from bench.testbed import Rig
from forwarder.kafka import murmur2
from tests.support.kafka_helpers import read_topic

#: The service first: it is the reference the others are compared with.
CONTENDERS = ("service", "send-loop", "batch-api", "confluent", "kcat", "kcat-jq")


def check_murmur2(samples: int = 20_000) -> None:
    rnd = random.Random(7)
    for _ in range(samples):
        key = rnd.randbytes(rnd.randrange(0, 64))
        if murmur2(key) != aiokafka_murmur2(key) & 0xFFFFFFFF:
            raise BenchFailure(f"murmur2 differs from aiokafka's for {key!r}")


Record = tuple[int, bytes | None, bytes | None, dict[str, bytes]]


def records(rig_: Rig, topic: str) -> dict[int, Record]:
    """line number -> (partition, key, value, headers); line numbers from datagrid-line or order."""
    got = asyncio.run(read_topic(rig_.bootstrap, topic))
    out: dict[int, Record] = {}
    for r in got:
        assert r.value is not None
        line = r.headers.get("datagrid-line")
        number = int(line) if line else int(r.value.split(b'"seq":')[1].split(b",")[0])
        out[number] = (r.partition, r.key, r.value, r.headers)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.check_records")
    p.add_argument("--lines", type=int, default=5_000)
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--ref", default=None)
    args = p.parse_args(argv)
    check_murmur2()
    scratch = Path(tempfile.mkdtemp(prefix="forwarder-check-"))
    rig_ = Rig(args.partitions, scratch, args.ref)
    work = Workload(args.lines, distinct_ids=max(args.lines // 3, 1))
    failures = 0
    try:
        rig_.start()
        reference = None
        for contender in CONTENDERS:
            names = rig_.names(contender)
            service = contender == "service"
            topics = rig_.create(names, service=service)
            rig_.configure(names["batch"], work)
            command, env = contender_command(rig_, contender, names)
            done = measure(command, env, scratch)
            if done.code:
                raise BenchFailure(f"{contender} exited {done.code}: {done.stderr[-2000:]}")
            rig_.verify(names, work, service=service)
            got = records(rig_, names["results"])
            rig_.delete(topics)
            if reference is None:
                reference = got
                continue
            # The batch id differs per run by design: compare it modulo the name.
            diffs = 0
            for n, (part, key, value, headers) in reference.items():
                other = got.get(n)
                mine_value = (
                    value.replace(b"bpred_" + value.split(b'"bpred_')[1].split(b'"')[0], b"BATCH")
                    if value
                    else value
                )
                if other is None:
                    diffs += 1
                    continue
                o_part, o_key, o_value, o_headers = other
                o_value_n = (
                    o_value.replace(
                        b"bpred_" + o_value.split(b'"bpred_')[1].split(b'"')[0], b"BATCH"
                    )
                    if o_value
                    else o_value
                )
                same_headers = contender.startswith("kcat") or (
                    {k: v for k, v in headers.items() if k != "datagrid-batch-id"}
                    == {k: v for k, v in o_headers.items() if k != "datagrid-batch-id"}
                )
                if (part, key, mine_value) != (o_part, o_key, o_value_n) or not same_headers:
                    diffs += 1
                    if diffs <= 3:
                        log(
                            f"{contender}: line {n} differs: {(part, key, headers)} vs "
                            f"{(o_part, o_key, o_headers)}"
                        )
            log(f"{contender}: {len(got)} records, {diffs} differ from the service's")
            failures += diffs
    except BenchFailure as exc:
        log(f"FAILED: {exc}")
        return 1
    finally:
        rig_.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print("records identical" if not failures else f"{failures} records differ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
