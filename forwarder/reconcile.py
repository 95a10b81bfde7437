"""The reconciler: a lost webhook loses no batch.

Every ``FORWARDER_RECONCILE_INTERVAL_SECONDS`` each pod that owns jobs partitions walks
``GET /batch-predictions`` newest first, back to ``FORWARDER_RECONCILE_LOOKBACK_HOURS``, and queues
every terminal batch of its own partitions that it holds no state for (a pod holds only its own
partitions' state).  Non-terminal batches are left to their webhook (or the next pass); older ones
are left alone.  A batch that a webhook and the reconciler both queue is still forwarded once: the
worker finds the first job's state and counts the second as a duplicate.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import structlog

from forwarder.config import Settings
from forwarder.datagrid import TERMINAL_STATUSES, DatagridClient, check_batch_id
from forwarder.errors import ForwarderError, InvalidBatchId
from forwarder.jobs import Job, JobQueue
from forwarder.observability import Metrics
from forwarder.state import parse_time
from forwarder.store import StateStore

log = structlog.get_logger("forwarder.reconcile")

#: Pages read at most per pass (100 batches each): a cursor that never ends cannot loop forever.
MAX_PAGES = 1_000


class Reconciler:
    """Lists recent batches and queues the terminal ones that were never forwarded."""

    def __init__(
        self,
        settings: Settings,
        datagrid: DatagridClient,
        queue: JobQueue,
        store: StateStore,
        metrics: Metrics,
    ) -> None:
        self._interval = settings.reconcile_interval_seconds
        self._lookback = timedelta(hours=settings.reconcile_lookback_hours)
        self._datagrid = datagrid
        self._queue = queue
        self._store = store
        self._metrics = metrics

    async def run(self) -> None:
        """Every interval, reconcile this pod's partitions, if it owns any (until cancelled)."""
        while True:
            await asyncio.sleep(self._interval)
            if not self._store.owned or not self._store.loaded:
                continue  # no partitions, or their state is still being restored
            try:
                await self.reconcile()
            except ForwarderError as exc:
                self._metrics.reconcile_runs.labels(outcome="failed").inc()
                log.warning("reconcile_failed", error=str(exc))

    async def reconcile(self) -> int:
        """One pass; returns how many batches it queued."""
        cutoff = datetime.now(UTC) - self._lookback
        queued = listed = 0
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            page, cursor = await self._datagrid.list_batches(cursor)
            for batch in page:
                created = parse_time(batch.get("created_at"))
                if created is not None and created < cutoff:
                    cursor = None  # newest first: everything after this is older too
                    break
                listed += 1
                queued += await self._queue_if_lost(batch)
            if cursor is None or not page:
                break
        self._metrics.reconcile_runs.labels(outcome="ok").inc()
        log.info("reconciled", listed=listed, queued=queued)
        return queued

    async def _queue_if_lost(self, batch: dict[str, object]) -> int:
        batch_id = batch.get("id")
        if batch.get("status") not in TERMINAL_STATUSES or not isinstance(batch_id, str):
            return 0
        try:
            check_batch_id(batch_id)
        except InvalidBatchId:
            log.warning("reconcile_invalid_batch_id", batch_id=batch_id[:64])
            return 0
        if not self._store.owns(batch_id) or self._store.get(batch_id) is not None:
            return 0  # another pod's, or queued, forwarded, failed or waiting: known
        await self._queue.put(Job(batch_id=batch_id, source="reconciler"))
        self._metrics.reconcile_batches.inc()
        log.info("reconcile_queued", batch_id=batch_id)
        return 1
