"""faust workers after a seek: a batch fetched before it must not make the worker skip records.

The worker's real faust consumer (built by `Worker`, with faust's own getmany,
seek and message loop `_drain_messages`) reads from a stand-in for its Kafka
consumer thread: a partition log of 60 records, whose first answer after the
seek to the committed offset is a batch fetched before it (offsets 33 to 40),
as the churn probe (`bench.faust_churn`) saw after rebalances. The worker must
deliver every record from the committed offset on, in order, and record no gap.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord

from pipeline.config import load_config
from pipeline.runtime.faust import Worker
from tests.test_faust_latency import config

pytestmark = pytest.mark.timeout(30)

END = 60


class PartitionLog:
    """The consumer thread's part: one partition's records, a fetch position, and one stale batch first."""

    def __init__(self, tp: Any, committed: int | None, stale: range, end: int = END, position: int = 0) -> None:
        self.tp, self.committed, self.stale, self.end = tp, committed, stale, end
        self.position = position  # where the reading stood before the rebalance
        self.seeks: list[int] = []

    def record(self, offset: int) -> ConsumerRecord[bytes, bytes]:
        return ConsumerRecord(self.tp.topic, self.tp.partition, offset, 0, 0, b"k", b"v%d" % offset, None, 1, 2, ())

    async def getmany(self, active_partitions: Any, timeout: float) -> dict[Any, list[Any]]:
        await asyncio.sleep(0)
        if self.stale:  # fetched from where the reading stood before the rebalance, answered only now
            batch, self.stale = [self.record(o) for o in self.stale], range(0)
            return {self.tp: batch}
        offsets = range(self.position, min(self.end, self.position + 7))
        self.position = offsets.stop
        return {self.tp: [self.record(o) for o in offsets]} if offsets else {}

    async def seek_to_committed(self) -> dict[Any, int | None]:
        if self.committed:  # as aiokafka: no seek for offset 0 or none
            self.position = self.committed
        return {self.tp: self.committed}

    def seek(self, tp: Any, offset: int) -> None:
        self.seeks.append(offset)
        self.position = offset

    async def earliest_offsets(self, *tps: Any) -> dict[Any, int]:
        return dict.fromkeys(tps, 0)

    def highwater(self, tp: Any) -> int:
        return self.end


async def deliveries(tmp_path: Path, committed: int | None, stale: range = range(33, 41), end: int = END,
                     position: int = 0) -> tuple[list[int], Any, PartitionLog]:
    cfg = load_config(config(tmp_path, "127.0.0.1:9"))
    app = Worker(cfg, tmp_path / "w", 10.0).app
    delivered: list[int] = []
    done = asyncio.Event()

    async def callback(message: Any) -> None:
        delivered.append(message.offset)
        if message.offset == end - 1:
            done.set()

    async def rebalanced(*args: Any) -> None:
        pass

    consumer = app.transport.create_consumer(callback=callback, on_partitions_revoked=rebalanced,
                                             on_partitions_assigned=rebalanced)
    tp = consumer._new_topicpartition(app.conf.id + "-in", 0)
    log = consumer._thread = PartitionLog(tp, committed, stale, end, position)
    await consumer.on_partitions_revoked({tp})  # the rebalance: faust forgets the partition's read offset
    consumer._set_active_tps({tp})  # and it is assigned again
    await consumer.perform_seek()  # and seeks to the committed offset, as at the end of a rebalance

    class Fetcher:
        _stopped = asyncio.Event()

    consumer.resume_flow()
    drain = asyncio.create_task(consumer._drain_messages(Fetcher()))
    try:
        await asyncio.wait_for(done.wait(), 10)
    finally:
        Fetcher._stopped.set()
        await asyncio.wait_for(drain, 5)
    return delivered, consumer._gap[tp], log


@pytest.mark.parametrize("committed", [1, 0, None])
async def test_a_batch_fetched_before_the_seek_does_not_skip_the_records_after_the_committed_offset(
        tmp_path: Path, committed: int | None) -> None:
    delivered, gap, log = await deliveries(tmp_path, committed)
    assert delivered == list(range(committed or 0, END))  # faust alone: 33..59, then 1..32 dropped as read
    assert not gap  # faust alone: 2..33 counted as done, so committable
    # sought back once (after the seek to its start that a partition never committed gets)
    assert log.seeks == ([] if committed else [0]) + [committed or 0]


@pytest.mark.parametrize("committed", [0, None])
async def test_a_partition_never_committed_is_read_again_from_its_start_after_a_rebalance(
        tmp_path: Path, committed: int | None) -> None:
    """Its records were fetched as the rebalance began and dropped by faust ("getmany called while flow not
    active"), and no more come: aiokafka seeks only to a committed offset above 0, so the reading stayed at the
    end and they were never read (`test_faust_flow`'s lost sessions). They must be read from offset 0."""
    delivered, gap, log = await deliveries(tmp_path, committed, stale=range(0), end=10, position=10)
    assert delivered == list(range(10))  # before: [] (the deliveries timed out)
    assert not gap
    assert log.seeks == [0]  # to its start, once
