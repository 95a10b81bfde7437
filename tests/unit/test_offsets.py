"""The worker's offsets bookkeeping (``forwarder.offsets``): what a partition may commit, the jobs
ledger, and the per-batch lock."""

from __future__ import annotations

import asyncio

from aiokafka import TopicPartition

from forwarder.offsets import GroupCommit, JobsLedger, KeyedLock, PartitionOffsets

TP0, TP1 = TopicPartition("jobs", 0), TopicPartition("jobs", 1)


def test_commit_offset_is_the_oldest_unfinished_job() -> None:
    """A partition commits only past jobs that are all finished, whatever order they end in."""
    offsets = PartitionOffsets()
    for offset in (5, 6, 7):
        offsets.add(offset)
    assert offsets.finish(7) is None  # 5 and 6 still run: nothing may be committed
    assert offsets.finish(5) == 6
    assert offsets.finish(5) is None  # finishing twice moves nothing
    assert offsets.finish(6) == 8  # 6 and the already finished 7
    assert offsets.pending == {}
    offsets.add(8)
    assert offsets.finish(99) is None  # an unknown offset is not a licence to commit
    assert offsets.finish(8) == 9


def test_a_transaction_commits_no_further_than_the_oldest_running_job() -> None:
    """peek(): the offset a finishing job may commit in its transaction, never past an older job
    still running (a crash must redo that one)."""
    offsets = PartitionOffsets()
    for offset in (5, 6, 7):
        offsets.add(offset)
    assert offsets.peek(6) is None  # 5 still runs
    assert offsets.peek(5) == 6
    assert offsets.finish(7) is None and offsets.peek(5) == 6
    assert offsets.finish(6) is None and offsets.peek(5) == 8  # 6 and 7 are done
    assert offsets.finish(5) == 8 and offsets.peek(5) is None


async def test_the_ledger_lists_running_jobs_by_partition_and_forgets_a_partition() -> None:
    """running() filters finished jobs and other partitions; forget() drops a partition's offsets
    and its transaction mark, and leaves the other partition's."""
    ledger = JobsLedger()
    never = asyncio.Event()
    slow = asyncio.create_task(never.wait())
    quick = asyncio.create_task(asyncio.sleep(0))
    other = asyncio.create_task(never.wait())
    ledger.tasks.update({slow: (TP0, 1, 0.0), quick: (TP0, 2, 0.0), other: (TP1, 1, 0.0)})  # type: ignore[dict-item]
    await quick
    assert ledger.running([TP0]) == [slow]
    assert set(ledger.running()) == {slow, other}
    for tp in (TP0, TP1):
        ledger.offsets[tp] = PartitionOffsets()
    ledger.committed_in_transaction(TP0, 7)
    ledger.committed_in_transaction(TP0, 5)  # an older transaction never moves the mark back
    assert ledger.in_transaction(TP0, 7) and not ledger.in_transaction(TP0, 8)
    ledger.forget(TP0)
    assert list(ledger.offsets) == [TP1] and not ledger.in_transaction(TP0, 7)
    slow.cancel()
    other.cancel()
    await asyncio.gather(slow, other, return_exceptions=True)


async def test_keyed_lock_serialises_one_key_and_drops_idle_locks() -> None:
    """Two holders of one key run one after the other, another key runs meanwhile, and no lock is
    kept once nobody holds or waits for it."""
    locks, order = KeyedLock(), []

    async def hold(key: str, name: str) -> None:
        async with locks.hold(key):
            order.append(f"{name}+")
            await asyncio.sleep(0.01)
            order.append(f"{name}-")

    await asyncio.gather(hold("a", "a1"), hold("a", "a2"), hold("b", "b1"))
    assert order.index("a1-") < order.index("a2+")  # a2 waited for a1
    assert order.index("b1+") < order.index("a1-")  # b ran beside a
    assert len(locks) == 0


async def test_jobs_finishing_together_share_one_commit_in_offset_order() -> None:
    """GroupCommit: offsets queued within the linger go in one commit (a partition's highest),
    those queued while it is in flight go in the next, never two at once."""
    sent: list[dict[TopicPartition, int]] = []
    sending, answer = asyncio.Event(), asyncio.Event()

    async def commit(offsets: dict[TopicPartition, int]) -> None:
        assert not sending.is_set(), "two commits in flight at once"
        sending.set()
        await answer.wait()
        sent.append(offsets)
        sending.clear()

    group = GroupCommit(commit, linger=0)
    for tp, offset in ((TP0, 6), (TP1, 3), (TP0, 8), (TP0, 7)):
        group.add(tp, offset)
    await sending.wait()  # the first commit is in flight: what finishes now goes in the next
    group.add(TP0, 9)
    group.add(TP1, 4)
    for _ in range(10):
        await asyncio.sleep(0)
    assert sent == []
    answer.set()
    await group.flush()  # returns once everything queued so far is answered
    assert sent == [{TP0: 8, TP1: 3}, {TP0: 9, TP1: 4}]


async def test_a_flush_sends_at_once_and_waits_for_the_answer() -> None:
    """flush() (a revocation, a stop) does not wait out the linger; with nothing pending it
    sends nothing."""
    sent: list[dict[TopicPartition, int]] = []

    async def commit(offsets: dict[TopicPartition, int]) -> None:
        await asyncio.sleep(0)
        sent.append(offsets)

    group = GroupCommit(commit, linger=3600)
    group.add(TP0, 4)
    group.add(TP1, 2)
    await asyncio.wait_for(group.flush(), 5)
    assert sent == [{TP0: 4, TP1: 2}]
    await group.flush()
    assert sent == [{TP0: 4, TP1: 2}]
    assert [t for t in asyncio.all_tasks() if t.get_name() == "jobs-commit"] == []
