"""A worker commits what it processed before its partitions move in a rebalance, so nobody processes it again.

Why: faust-streaming, when partitions are revoked, first forgets which of their
records were acknowledged, and only then waits for the streams and commits. What
a worker processed since its last periodic commit (every 2.8 s) was committed by
nobody, and processed again after the rebalance by each partition's next owner
(this worker too, for the partitions it kept): its events written twice, and
counted twice in `window` metrics and rule windows, whose restored state already
held them.

faust is imported by the caller, so `import pipeline.cli` stays fast.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("pipeline.runtime.faust")


def commit_before_revoke(consumer: type[Any]) -> type[Any]:
    """`consumer` (a faust Consumer class), committing the acknowledged offsets before a revocation drops them."""

    class Consumer(consumer):  # type: ignore[misc,valid-type]
        async def on_partitions_revoked(self, revoked: Any) -> None:
            if revoked:  # faust then waits until the batch in hand is written, flushed and acknowledged
                log.info("worker %d: a rebalance takes back %d topic partitions", os.getpid(), len(revoked))
            await self.commit()
            await super().on_partitions_revoked(revoked)

    return Consumer
