"""``rig.py fetch | start | status | stop``: stdout carries only what a caller captures."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kafkarig.broker import DEFAULT_PORT, Broker, BrokerError
from kafkarig.jars import fetch
from kafkarig.layout import cache_dir, kafka_version, log
from kafkarig.security import DEFAULT_USERS, Security


def _parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rig.py", description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="download the broker jars (skipped when complete)")
    p_fetch.add_argument("--force", action="store_true", help="download again even if complete")
    for name, text in (
        ("start", "start the broker and wait until it is ready"),
        ("stop", "stop the broker (SIGTERM, then SIGKILL after 20 s)"),
        ("status", "say whether the broker runs and answers (exit 0 if ready)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--port", type=int, default=DEFAULT_PORT)
        p.add_argument("--controller-port", type=int, default=None, help="default: port + 1")
        p.add_argument("--data-dir", default=None, help="default: $KAFKA_RIG_CACHE/data-<port>")
        if name == "start":
            p.add_argument(
                "--wait",
                type=float,
                default=60.0,
                help="seconds to wait for readiness (0: do not wait)",
            )
            p.add_argument(
                "--secure",
                action="store_true",
                help="also listen with SASL_SSL (SCRAM-SHA-512) on port + 2 and SSL with client "
                "certificates on port + 3, ACLs on; certificates in <data-dir>/tls",
            )
            p.add_argument(
                "--scram-user",
                action="append",
                metavar="NAME=PASSWORD",
                help="a SCRAM-SHA-512 user made at first start (repeatable; default: "
                + ", ".join(f"{u}={p}" for u, p in DEFAULT_USERS.items())
                + ")",
            )
    return parser


def _broker(args: argparse.Namespace) -> Broker:
    if args.command != "start" or not args.secure:
        return Broker(args.port, args.data_dir, args.controller_port)
    data_dir = Path(args.data_dir or cache_dir() / f"data-{args.port}").resolve()
    users = dict(u.split("=", 1) for u in args.scram_user) if args.scram_user else None
    security = Security.create(args.port + 2, args.port + 3, data_dir / "tls", users)
    return Broker(args.port, data_dir, args.controller_port, security=security)


def main(argv: list[str] | None = None, description: str = "") -> int:
    """Run one command; exit status 0 on success (``status``: when ready), 1 otherwise."""
    args = _parser(description).parse_args(argv)
    try:
        if args.command == "fetch":
            print(fetch(force=args.force))
            return 0
        broker = _broker(args)
        if args.command == "start":
            was_running = broker.is_running()
            started = time.monotonic()
            broker.start(wait=args.wait)
            took = time.monotonic() - started
            state = "already running" if was_running else f"started in {took:.1f}s"
            log(f"Kafka {kafka_version()} {state}, pid {broker.pid}, data {broker.data_dir}")
            if broker.security is not None:
                log(
                    f"SASL_SSL (SCRAM-SHA-512) on {broker.sasl_ssl_bootstrap}, SSL (mutual TLS) "
                    f"on {broker.ssl_bootstrap}, ACLs on; CA {broker.security.tls.ca_cert}"
                )
            print(broker.bootstrap)
        elif args.command == "stop":
            pid = broker.pid
            broker.stop()
            log(f"stopped pid {pid}" if pid else "not running")
        elif args.command == "status":
            pid = broker.pid
            if pid is None:
                print(f"stopped (data {broker.data_dir})")
                return 1
            ready = broker.is_ready()
            print(
                f"{'ready' if ready else 'running, not ready'}: pid {pid}, "
                f"bootstrap {broker.bootstrap}, data {broker.data_dir}"
            )
            return 0 if ready else 1
    except (BrokerError, RuntimeError) as exc:
        log(f"error: {exc}")
        return 1
    return 0
