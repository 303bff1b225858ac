"""After a seek, a worker reads a partition from the offset it sought to, not from a record fetched before it.

Why: when a rebalance gives a worker (back) a partition, faust seeks it to the
committed offset and notes that offset as read. A batch fetched before the
rebalance, from where the worker's reading stood then, can still arrive after
that seek. faust takes its first record as the next one, counts the offsets
between the committed one and it as a gap (acknowledged, so committable) and,
when the records of that gap come, drops them as already read: never
processed, and committed past.

So a record of an ingest partition that is ahead of the offset it was just
sought to is not delivered: the partition is sought back to that offset, and
the first record delivered is the one at it. Offsets of the ingest topic are
contiguous (it is neither compacted nor transactional); should the record at
that offset no longer exist (removed by retention), the partition is read
on after `REFUSALS` tries, with a warning. Changelog partitions are left alone:
they are compacted, their gaps are real.

A partition with no committed offset (or offset 0) is sought to its earliest
offset: aiokafka's seek to the committed offsets leaves such a partition where
its reading stood. Records faust fetched as a rebalance began and then dropped
("getmany called while flow not active": it seeks back to the committed
offsets to read them again) were otherwise never read, when no record came
after them (two sessions lost in 2 of 14 runs of `test_faust_flow` on a busy
machine).

faust is imported by the caller, so `import pipeline.cli` stays fast.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

log = logging.getLogger("pipeline.runtime.faust")

REFUSALS = 5  # consecutive fetches of a partition starting ahead of its sought offset before reading on


def read_from_seek(consumer: type[Any]) -> type[Any]:
    """`consumer` (a faust Consumer class), delivering a sought partition's records from the sought offset only."""

    class Consumer(consumer):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._expected: dict[Any, int] = {}  # partition -> offset the next delivered record must have
            self._refusals: dict[Any, int] = {}

        def _expect(self, tp: Any, offset: int) -> None:
            if not self._is_changelog_tp(tp):
                self._expected[tp] = offset
                self._refusals.pop(tp, None)

        async def seek_to_committed(self) -> Mapping[Any, int]:
            committed = await super().seek_to_committed()
            ingest = {tp: offset for tp, offset in committed.items() if not self._is_changelog_tp(tp)}
            # no committed offset: the reading starts at the earliest one (consumer_auto_offset_reset)
            fresh = [tp for tp, offset in ingest.items() if offset is None or offset < 0]
            earliest = await self.earliest_offsets(*fresh) if fresh else {}
            for tp, offset in ingest.items():
                start = offset if offset is not None and offset >= 0 else earliest.get(tp)
                if start is None:
                    continue
                if not offset or offset < 0:  # aiokafka seeks only to a committed offset above 0
                    await super().seek(tp, start)
                self._expect(tp, start)
            return committed

        async def seek(self, partition: Any, offset: int) -> None:
            await super().seek(partition, offset)
            self._expect(partition, offset)

        async def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
            for tp in revoked:
                self._expected.pop(tp, None)
                self._refusals.pop(tp, None)
            await super().on_partitions_revoked(revoked)

        async def getmany(self, timeout: float) -> AsyncIterator[tuple[Any, Any]]:
            refused: set[Any] = set()
            async for tp, message in super().getmany(timeout):
                expected = self._expected.get(tp)
                if expected is None or message.offset <= expected:
                    if message.offset == expected:
                        del self._expected[tp]
                        self._refusals.pop(tp, None)
                    yield tp, message
                    continue
                if tp in refused:
                    continue
                refused.add(tp)
                tries = self._refusals[tp] = self._refusals.get(tp, 0) + 1
                if tries > REFUSALS:
                    log.warning("worker %d: %s has no record at offset %d (first is %d); reading on from there",
                                os.getpid(), tp, expected, message.offset)
                    del self._expected[tp]
                    del self._refusals[tp]
                    yield tp, message
                    continue
                log.info("worker %d: %s offset %d arrived before %d, fetched before the last seek; "
                         "seeking back to %d", os.getpid(), tp, message.offset, expected, expected)
                await self.seek(tp, expected)
                self._refusals[tp] = tries  # seek() started the count afresh

    return Consumer
