"""Kafka source: a consumer group whose offsets move only after every sink wrote the events.

Batches are numbered in yield order from 0. The runtime calls `commit(upto)`
once all sinks have written every batch up to `upto`; only then are those
offsets committed, so a crash or a failing sink means redelivery, never loss
(end-to-end at-least-once). A value that is not a JSON object is dead-lettered
with its topic, partition and offset. A broker that is away at start or later
is retried with backoff by the consumer; the source never gives up on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Literal

import orjson
from pydantic import Field, field_validator

from pipeline.api import Batch, Context, Options, Source
from pipeline.cancel import unless_set
from pipeline.events import Stamper, edge_reason
from pipeline.kafka import Backoff, bootstrap_list, describe, quiet_aiokafka
from pipeline.types import Duration

LEAVE_TIMEOUT = 5.0  # seconds a member gets to leave its group before its (re)join is cancelled
JOIN_CANCEL = 0.5  # the same for a consumer that owns no partition yet: it has nothing to hand over


async def leave(consumer: Any) -> None:
    """Stop a consumer, bounded: aiokafka's stop() first waits out a group join in progress, which the
    broker may hold for the whole session timeout (up to 30 minutes)."""
    bound = LEAVE_TIMEOUT if consumer.assignment() else JOIN_CANCEL
    with contextlib.suppress(Exception, asyncio.TimeoutError):
        await asyncio.wait_for(consumer.stop(), bound)  # a timeout cancels the join it waited for
    client = getattr(consumer, "_client", None)  # stop() cut short: close the connections it left open
    if client is not None:
        with contextlib.suppress(Exception):
            await client.close()


class KafkaSourceOptions(Options):
    bootstrap_servers: str | list[str] = Field(
        default="localhost:9092", description="broker addresses: host:port, comma-separated or a list")
    topic: str | list[str] = Field(description="topic name(s) to consume")
    group: str = Field(default="videodb-pipeline", description="consumer group id (offsets are kept per group)")
    start_from: Literal["earliest", "latest"] = Field(
        default="earliest", description="where a group with no committed offset starts")
    batch_max: int = Field(default=1000, ge=1, description="most records per batch")
    batch_wait: Duration = Field(default=0.2, ge=0.001, le=10, description="longest wait for records before "
                                 "checking for stop (1ms to 10s: 0 spun the CPU and starved signal handling)")
    retry_backoff: Duration = Field(default=0.5, gt=0, description="first delay between connection attempts")
    max_retry_backoff: Duration = Field(default=10.0, gt=0, description="longest delay between connection attempts")
    close_timeout: Duration = Field(
        default=60.0, description="after the last batch, how long to wait for its commit before leaving the group")
    session_timeout: Duration = Field(
        default=10.0, ge=1, le=1800, description="a member silent this long leaves the group (bounds rebalance "
        "waits; 1s to 30m, and brokers accept 6s to 30m unless configured otherwise)")
    client_id: str = Field(default="videodb-pipeline", description="client id the broker sees")

    @field_validator("bootstrap_servers")
    @classmethod
    def _bootstrap(cls, v: str | list[str]) -> list[str]:
        return bootstrap_list(v)

    @field_validator("topic")
    @classmethod
    def _topics(cls, v: str | list[str]) -> list[str]:
        topics = [t.strip() for t in ([v] if isinstance(v, str) else v) if t.strip()]
        if not topics:
            raise ValueError("name at least one topic")
        return topics


class KafkaSource(Source):
    """Consumes topics in a consumer group; commits offsets only for batches every sink wrote."""

    name = "kafka"
    Options = KafkaSourceOptions

    def __init__(self, options: KafkaSourceOptions, context: Context) -> None:
        super().__init__(options, context)
        self.opts = options
        self.who = f"kafka source {context.stage}"
        self.batch_bytes = 0  # raw bytes of the batch just yielded (the runtime bounds queues by bytes)
        self._consumer: Any = None
        self._stopping = asyncio.Event()
        self._exhausted = False
        self._index = 0
        #: (batch index, {TopicPartition: next offset}) for batches not committed yet, in order
        self._uncommitted: deque[tuple[int, dict[Any, int]]] = deque()
        self._all_committed = asyncio.Event()
        self._closer: asyncio.Task[None] | None = None
        self.rejected = 0

    async def stop(self) -> None:
        self._stopping.set()

    @property
    def assigned(self) -> int:
        """How many partitions this member owns right now (0 before joining the group)."""
        consumer = self._consumer
        return len(consumer.assignment()) if consumer is not None else 0

    async def batches(self) -> AsyncIterator[Batch]:
        quiet_aiokafka()
        consumer = await self._connect()
        if consumer is None:
            return
        stamp = Stamper()
        timeout_ms = int(self.opts.batch_wait * 1000)
        try:
            while not self._stopping.is_set():
                got = await consumer.getmany(timeout_ms=timeout_ms, max_records=self.opts.batch_max)
                if not got:
                    continue
                batch: Batch = []
                offsets: dict[Any, int] = {}
                nbytes = 0
                for tp, records in got.items():
                    for rec in records:
                        event = self._decode(rec)
                        if event is not None:
                            batch.append(stamp(event))
                            nbytes += len(rec.value or b"")
                    offsets[tp] = records[-1].offset + 1
                self.batch_bytes = nbytes  # raw size, for the runtime's byte bounds
                self._uncommitted.append((self._index, offsets))
                self._index += 1
                yield batch  # empty when every record was malformed: its offsets still need a commit
        finally:
            self._exhausted = True
            self._closer = asyncio.create_task(self._close_after_commit(), name=f"{self.who} close")

    def _decode(self, rec: Any) -> dict[str, Any] | None:
        """A record's value as an event, or None after dead-lettering it with where it came from."""
        try:
            event = orjson.loads(rec.value) if rec.value is not None else None
        except orjson.JSONDecodeError as exc:
            self._reject(rec, f"not JSON: {exc}")
            return None
        if not isinstance(event, dict):
            self._reject(rec, f"JSON {type(event).__name__}, not an object")
            return None
        reason = edge_reason(rec.value, event)
        if reason is not None:
            self._reject(rec, reason)
            return None
        return event

    def _reject(self, rec: Any, reason: str) -> None:
        self.rejected += 1
        self.context.stats.dropped += 1
        raw = rec.value[:4096] if rec.value is not None else None
        self.context.dead_letter.write(reason, stage=self.context.stage, raw=raw,
                                       origin={"topic": rec.topic, "partition": rec.partition,
                                               "offset": rec.offset})

    async def commit(self, upto: int) -> None:
        """Every batch with index <= `upto` is written by every sink: commit its offsets."""
        offsets: dict[Any, int] = {}
        while self._uncommitted and self._uncommitted[0][0] <= upto:
            _, batch_offsets = self._uncommitted.popleft()
            for tp, off in batch_offsets.items():
                offsets[tp] = max(off, offsets.get(tp, 0))
        consumer = self._consumer
        if offsets and consumer is not None:
            owned = consumer.assignment()
            mine = {tp: off for tp, off in offsets.items() if tp in owned}
            if len(mine) < len(offsets):
                self.context.log.info("%s: %d partition(s) moved to another worker before commit; "
                                      "their new owner re-reads those events", self.who, len(offsets) - len(mine))
            if mine:
                try:
                    await consumer.commit(mine)
                except Exception as exc:  # rebalance or broker away: redelivery, never loss
                    self.context.log.warning("%s: commit failed (%s); those events will be delivered again",
                                             self.who, describe(exc))
        if self._exhausted and not self._uncommitted:
            self._all_committed.set()

    async def close(self) -> None:
        """Leave the group (called by the runtime at the end, or by ourselves after the last commit)."""
        self._stopping.set()
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await leave(consumer)

    async def _close_after_commit(self) -> None:
        """batches() ended: wait (bounded) for the final commit, then leave the group."""
        if self._uncommitted:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._all_committed.wait(), self.opts.close_timeout)
        await self.close()

    async def _connect(self) -> Any:
        """Join the group, retrying with backoff while the broker is unreachable; None if stopped first."""
        from aiokafka import AIOKafkaConsumer

        backoff = Backoff(self.opts.retry_backoff, self.opts.max_retry_backoff)
        down_since: float | None = None
        while not self._stopping.is_set():
            consumer = AIOKafkaConsumer(
                *self.opts.topic, bootstrap_servers=self.opts.bootstrap_servers, group_id=self.opts.group,
                client_id=self.opts.client_id, enable_auto_commit=False,
                auto_offset_reset=self.opts.start_from, metadata_max_age_ms=30000,
                session_timeout_ms=int(self.opts.session_timeout * 1000),
                heartbeat_interval_ms=max(100, int(self.opts.session_timeout * 1000 / 3)))
            try:
                started = await unless_set(self._stopping, consumer.start())
            except Exception as exc:
                await leave(consumer)
                if down_since is None:
                    down_since = time.monotonic()
                    self.context.log.warning("%s: cannot reach %s (%s); retrying with backoff", self.who,
                                             ",".join(self.opts.bootstrap_servers), describe(exc))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff.delay())
                continue
            if not started:  # stopped while joining: a join can last the whole session timeout
                await leave(consumer)
                return None
            if down_since is not None:
                self.context.log.warning("%s: connected after %.1fs", self.who, time.monotonic() - down_since)
            self._consumer = consumer
            return consumer
        return None
