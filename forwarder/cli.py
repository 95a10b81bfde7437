"""Command line: ``forwarder check | serve | forward | enqueue``.

Exit status: 0 success; 1 a check failed, or a batch was not fully forwarded (or not queued); 2 bad
usage or setting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, NoReturn

import structlog

from forwarder import __version__
from forwarder.config import Delivery, Settings
from forwarder.datagrid import check_batch_id
from forwarder.environment import describe_variables, load_settings, service_links
from forwarder.errors import Backoff, BatchNotReady, ConfigError, ForwarderError, InvalidBatchId
from forwarder.kafka import kafka_errors, make_producer
from forwarder.observability import Metrics, Redactor, configure_logging
from forwarder.pipeline import Transaction
from forwarder.state import BatchState, Status

if TYPE_CHECKING:
    from forwarder.core import Core

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _epilog() -> str:
    lines = ["configuration (environment variables, also read from ./.env):"]
    for variable, default, description in describe_variables():
        lines.append(f"  {variable}" + (f" (default: {default})" if default else ""))
        lines.extend(
            textwrap.wrap(description, 92, initial_indent="      ", subsequent_indent="      ")
        )
    lines.append("")
    lines.append(
        "exit status: 0 success, 1 a check failed or a batch was not fully forwarded, "
        "2 bad usage or setting"
    )
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """Writes the configuration table (:func:`_epilog`) into ``--help`` only when help is shown:
    it reads every setting's docstring from the source, which no other command needs to pay."""

    def format_help(self) -> str:
        self.epilog = _epilog()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render ``--help``)."""
    parser = _Parser(
        prog="forwarder",
        description="Forward Datagrid batch-prediction results into Kafka, once per batch.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=argparse.ArgumentParser
    )
    check = commands.add_parser(
        "check",
        help="check settings, Kafka (login, topics, ACLs, configs) and the Datagrid key",
        description="Check what `serve` needs, one line per check (ok, FAIL or warn): the "
        "settings and their files, the Kafka login, each topic (exists, or would be created at "
        "start), the ACLs docs/security.md lists, the topics' configs, and the Datagrid key (one "
        "GET). It creates no topic and writes to none. Exit 0 if no check failed, 1 if one did, "
        "2 for a bad setting.",
    )
    check.add_argument(
        "--output",
        choices=("text", "json"),
        default="text",
        help="text (one line per check, the default) or json",
    )
    check.add_argument(
        "--timeout",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="most seconds any one network step may take (default: 10)",
    )
    commands.add_parser(
        "serve",
        help="run the HTTP server (webhooks, API, metrics) and the workers",
        description="Run the HTTP server and the jobs-topic workers until SIGTERM.",
    )
    forward = commands.add_parser(
        "forward",
        help="stream and publish batches now (one-shot)",
        description="Stream each batch's results and publish them now, then record its state. "
        "An explicit forward always runs, like a replay. Exit 0 only if every batch was fully "
        "forwarded.",
    )
    forward.add_argument("batch_ids", nargs="+", metavar="BATCH_ID")
    forward.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for batches that are not terminal yet (default: do not wait)",
    )
    enqueue = commands.add_parser(
        "enqueue",
        help="write jobs to the jobs topic for the workers",
        description="Write one job per batch id to the jobs topic.",
    )
    enqueue.add_argument("batch_ids", nargs="+", metavar="BATCH_ID")
    enqueue.add_argument("--replay", action="store_true", help="forward again even if done")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``forwarder`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check":
            # Imported here, like serve's app: `forward` does not pay for it. check reports a
            # bad setting as one of its lines, so it loads the settings itself.
            from forwarder.check import main as check

            return check(args.output, args.timeout)
        settings = load_settings()
        settings.check_files()
        redactor = Redactor.for_settings(settings)
        if args.command == "serve":
            from forwarder.server import serve

            configure_logging(settings.log_format, settings.log_level, redactor=redactor)
            _log_service_links()
            return serve(settings)
        # One-shot commands keep stdout for their summary; logs go to stderr.
        configure_logging(
            settings.log_format, settings.log_level, stream=sys.stderr, redactor=redactor
        )
        _log_service_links()
        if args.command == "forward":
            return asyncio.run(_forward(settings, args.batch_ids, args.wait))
        return asyncio.run(_enqueue(settings, args.batch_ids, args.replay))
    except ConfigError as exc:
        print(f"forwarder: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except InvalidBatchId as exc:
        print(f"forwarder: invalid input: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ForwarderError as exc:
        print(f"forwarder: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _positive(text: str) -> float:
    """An argparse type: a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _log_service_links() -> None:
    """Say once, at debug, which Kubernetes service-link variables were taken for no setting."""
    if links := service_links(os.environ):
        structlog.get_logger("forwarder.config").debug("service_links_ignored", variables=links)


async def _forward(settings: Settings, batch_ids: list[str], wait: float) -> int:
    from forwarder.core import open_core

    for batch_id in batch_ids:
        check_batch_id(batch_id)  # refuse bad input before touching Kafka
    ok = True
    async with open_core(settings, Metrics(process=False)) as core, _transaction(core) as txn:
        for batch_id in batch_ids:
            ok = await _forward_one(core, batch_id, txn, wait) and ok
    return EXIT_OK if ok else EXIT_FAILED


async def _forward_one(core: Core, batch_id: str, txn: Transaction | None, wait: float) -> bool:
    """Forward one batch, polling up to ``wait`` s while it is not terminal; print its line."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    backoff = Backoff(base=1.0, cap=core.settings.not_ready_poll_seconds, jitter=0.2)
    checks = 0
    while True:
        try:
            state = await core.pipeline.forward(batch_id, source="cli", txn=txn)
        except BatchNotReady as exc:
            remaining = deadline - loop.time()
            if remaining <= 0:
                print(f"{batch_id}: not forwarded: {exc}")
                return False
            checks += 1
            await asyncio.sleep(min(backoff.delay(checks), remaining))
            continue
        print(summary(state))
        return state.status is Status.FORWARDED


@contextlib.asynccontextmanager
async def _transaction(core: Core) -> AsyncIterator[Transaction | None]:
    """In exactly-once mode, a transactional producer of this command's own (no offsets to
    commit)."""
    if core.settings.delivery is not Delivery.EXACTLY_ONCE:
        yield None
        return
    transactional_id = f"{core.settings.consumer_group}-cli-{uuid.uuid4().hex}"
    producer = make_producer(core.settings, core.limits, transactional_id=transactional_id)
    try:
        with kafka_errors("starting the transactional producer"):
            await producer.start()
        yield Transaction(producer)
    finally:
        await producer.stop()


def summary(state: BatchState) -> str:
    """One human line per batch: outcome, lines by status, dead letters, attempts."""
    lines = sum(state.lines.values())
    by_status = ", ".join(f"{k} {v}" for k, v in sorted(state.lines.items())) or "none"
    dead = sum(state.dead_letters.values())
    by_reason = ", ".join(f"{k} {v}" for k, v in sorted(state.dead_letters.items()))
    text = (
        f"{state.batch_id}: {state.status.value}: {lines} lines ({by_status}), "
        f"{dead} dead letters"
        + (f" ({by_reason})" if by_reason else "")
        + f", {state.blank_lines} blank, {state.attempts} attempt"
        + ("s" if state.attempts != 1 else "")
    )
    if state.error:
        text += f"; error: {state.error.get('detail')}"
    return text


async def _enqueue(settings: Settings, batch_ids: list[str], replay: bool) -> int:
    from forwarder.jobs import enqueue_jobs

    await enqueue_jobs(settings, batch_ids, replay=replay, source="cli")
    for batch_id in batch_ids:
        print(f"{batch_id}: queued" + (" (replay)" if replay else ""))
    return EXIT_OK


def run() -> NoReturn:
    """The ``forwarder`` console script: :func:`main`, then exit without tearing the interpreter
    down. Once a command has printed its outcome there is nothing left to do, and CPython's
    finalization (freeing every module and object one by one) would add a tenth of a second to
    each ``forwarder forward``. Everything written is flushed first: log handlers, stdout,
    stderr. (An exception out of ``main`` takes the normal exit, traceback included.)"""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
