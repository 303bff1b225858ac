"""A worker commits what it processed before its partitions move in a rebalance, so nobody processes it again.

Why: faust-streaming, when partitions are revoked, first forgets which of their
records were acknowledged, and only then waits for the streams and commits. What
a worker processed since its last periodic commit (every 2.8 s) was committed by
nobody, and processed again after the rebalance by each partition's next owner
(this worker too, for the partitions it kept): its events written twice, and
counted twice in `window` metrics and rule windows, whose restored state already
held them.

And an acknowledgement only counts in the generation its message was fetched
in. faust acknowledges a message of an earlier generation when its stream skips
it after a rebalance (and a sink may finish one late), and counted it for the
partition as assigned now: if the partition came back, its offset joined the
new generation's, so the commit could pass records read again but not yet
processed (one event lost in a churn probe). Such a message is now only
marked done; its partition is read again from the committed offset anyway.

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

        def ack(self, message: Any) -> bool:
            generation = message.generation_id
            if generation is not None and generation != self.app.consumer_generation_id:
                from mode.utils.futures import notify

                message.acked = True
                self._unacked_messages.discard(message)
                notify(self._waiting_for_ack)  # as faust's ack: whoever waits for the acks in hand
                return False
            return bool(super().ack(message))

    return Consumer
