"""A worker restoring its tables reads again the changelog records faust fetched and never applied.

Why: while a worker restores its tables after a rebalance, faust can drop
records of a changelog partition that the Kafka client had already handed over:
a fetch made before a rebalance that returns after it is thrown away once faust
sees the new generation (traced in a churn run: every record of three changelog
partitions, offsets 0 to 11 of one). The client's position has moved past
them, so they never come again, and the restore waits for them for ever: the
worker then processes nothing (`bench.faust_churn 3 0s slow 2 --only 1` left a
worker with every partition and none of the events after the rebalance in
about 1 of 90 runs; faust logged `No event received for active tp ... since
recovery start` every 5 s).

So while a restore runs, a partition that has had no record for `STALL`
seconds, and whose position is past the next record the restore needs, is
sought back to that record. Reading a changelog record again is harmless:
faust applies only records past the offset it last applied.

Records that came again and still were not applied (read `REREADS` times from
the same offset in one restore: not a lost fetch but records faust cannot
decode, e.g. a foreign or truncated record at the end of a changelog) are
skipped with a warning, so the restore ends without them; before, it read them
again every 3 s for ever and the worker processed nothing.

faust is imported by the caller, so `import pipeline.cli` stays fast.
"""

from __future__ import annotations

import logging
import os
from time import monotonic
from typing import Any

log = logging.getLogger("pipeline.runtime.faust")

STALL = 3.0  # seconds without a record for a partition whose records were fetched, before reading them again
CHECK_EVERY = 1.0
REREADS = 2  # times a partition's records are read again from one offset before the restore goes on without them


def rereading_recovery(recovery: type[Any]) -> type[Any]:
    """`recovery` (faust's Recovery service), reading again the changelog records it was never given."""
    from aiokafka.errors import IllegalStateError
    from mode import Service

    class Recovery(recovery):  # type: ignore[misc,valid-type]
        @Service.task
        async def _read_again_what_was_lost(self) -> None:
            async for _ in self.itertimer(CHECK_EVERY, name="Recovery.read_again"):
                if self.in_recovery:
                    await self.read_again(monotonic())

        async def read_again(self, now: float) -> None:
            """Seek back each active changelog partition whose fetched records never reached the restore."""
            started = self._recovery_started_at
            if started is None:
                return
            consumer = self.app.consumer
            if self.__dict__.get("_rereads_since") != started:  # a new restore: its own count of re-reads
                self._rereads_since = started
                self._rereads: dict[Any, tuple[int, int]] = {}  # partition -> (offset read again from, times)
            rereads = self._rereads
            for tp in list(self.active_tps):
                last = self._active_events_received_at.get(tp, started)
                if now - last < STALL:
                    continue
                applied = self.active_offsets.get(tp)
                wanted = 0 if applied is None or applied < 0 else applied + 1
                try:
                    position = await consumer.position(tp)
                    if position is None or position <= wanted:
                        continue  # nothing fetched that the restore lacks: it waits for the broker, not for us
                    start, times = rereads.get(tp, (wanted, 0))
                    times = times if start == wanted else 0
                    if times >= REREADS:
                        log.warning("worker %d: restoring %s: records %d to %d were read %d times and never "
                                    "applied (not readable as table state); restoring without them",
                                    os.getpid(), tp, wanted, position - 1, times + 1)
                        self.active_offsets[tp] = position - 1
                        rereads.pop(tp, None)
                        continue
                    log.warning("worker %d: restoring %s: records %d to %d were fetched but never applied; "
                                "reading them again", os.getpid(), tp, wanted, position - 1)
                    await consumer.seek(tp, wanted)
                    rereads[tp] = (wanted, times + 1)
                except IllegalStateError:  # a rebalance took the partition meanwhile: its next owner restores it
                    continue
                self._active_events_received_at[tp] = now  # give the records time to come

    return Recovery


def table_manager(base: type[Any], recovery: type[Any]) -> type[Any]:
    """`base` (faust's TableManager) whose restores use `recovery`."""

    class TableManager(base):  # type: ignore[misc,valid-type]
        @property
        def recovery(self) -> Any:
            made = self.__dict__.get("_recovery")
            if made is None:
                made = self._recovery = recovery(self.app, self, beacon=self.beacon, loop=self.loop)
            return made

    return TableManager
