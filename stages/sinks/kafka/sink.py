"""Kafka sink: events as JSON records, topic and key from templates, at-least-once.

`write(batch)` returns once the broker acknowledged every record of the batch.
A background delivery task owns the producer: it reconnects and retries with
backoff while the broker is away, holding at most `buffer_events` events and
`buffer_bytes` bytes (a full buffer makes `write` wait: backpressure, or the
runtime's disk spool with `buffer: {type: disk}`). Once
`close()` starts, whatever is not delivered within `shutdown_timeout` goes to
the dead-letter file, counted. Nothing is dropped. The clock starts at `close()`,
not when the capture session ends: until then the runtime's `drain_timeout` decides,
and a disk buffer's backlog stays spooled instead of being dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import orjson

from pipeline.api import Batch, Context, Options, Sink
from pipeline.errors import StageError
from pipeline.events import Event
from pipeline.kafka import (
    Backoff,
    bootstrap_list,
    describe,
    ensure_topics,
    is_permanent,
    quiet_aiokafka,
    safe_topic,
    start_producer,
)
from pipeline.templates import Template
from stages.sinks.kafka.options import KafkaSinkOptions
from stages.sinks.kafka.records import Pending, Record, Unit, headers_for

_STILL_DOWN_EVERY = 30.0
_MEMO_KEYS = 65536  # remembered key -> partition choices per partition list
_MEMO_KEY_BYTES = 128  # longer keys are hashed every time (session ids are far shorter)
_MEMO_SCOPES = 4  # partition lists remembered: at most 4 x 65,536 keys of 128 bytes (~50 MB)


class KafkaSink(Sink):
    """Publishes each event as an orjson record; returns from `write` once acknowledged."""

    name = "kafka"
    Options: ClassVar[type[Options]] = KafkaSinkOptions
    cancel_safe = True  # a cancelled write leaves its records queued; close() delivers or dead-letters them
    with_headers: ClassVar[bool] = True  # `channel`, `capture_session_id`, `rtstream_name` headers per record

    def __init__(self, options: KafkaSinkOptions, context: Context) -> None:
        super().__init__(options, context)
        self.opts = options
        self.who = f"kafka sink {context.stage}"
        self.servers = bootstrap_list(options.bootstrap_servers)
        self._topic = Template(options.topic)
        key = Template(options.key) if options.key else None
        #: event -> key text ("" = no key); the faust ingest replaces it with a session-aware one
        self.key_of: Callable[[Event], str] | None = key.render if key is not None else None
        self._topic_names: dict[str, str] = {}
        self._topics: set[str] = set()  # distinct topics sent to, at most max_topics
        self._static_topic = safe_topic(self._topic.render({})) if self._topic.static else None
        self._queue: deque[Record] = deque()
        self._buffered = 0
        self._buffered_bytes = 0
        self._room = asyncio.Event()
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._stopping = False
        self._deadline: float | None = None
        self._gave_up = False
        self._fatal: StageError | None = None
        self._producer: Any = None
        self._idempotence: bool | str = options.idempotence
        self.idempotent = False
        self._created: set[str] = set()
        self._stale_metadata = False
        self._partitioner: Any = None
        self._memos: dict[tuple[int, ...], dict[bytes, int]] = {}
        self._backoff = Backoff(options.retry_backoff, options.max_retry_backoff)
        self._down_since: float | None = None
        self._last_warn = 0.0
        self._last_error = ""
        self._task: asyncio.Task[None] | None = None
        self.delivered = 0
        self.dead_lettered = 0

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect now if the broker is there; if not, say so and keep trying in the background."""
        from aiokafka.partitioner import DefaultPartitioner

        quiet_aiokafka()
        self._partitioner = DefaultPartitioner()
        try:
            await self._connect()
        except StageError:
            raise
        except Exception as exc:
            self._note_failure(exc, "at start")
        self._task = asyncio.create_task(self._deliver(), name=f"{self.who} delivery")

    async def write(self, batch: Batch) -> None:
        """Queue the batch and wait until the broker acknowledged all of it (or it was dead-lettered)."""
        if self._fatal is not None:
            raise self._fatal
        if not batch:
            return
        loop = asyncio.get_running_loop()
        pending = Pending(0, loop.create_future())
        records = self._encode(batch, pending)
        if not records:
            return
        pending.left = len(records)
        size = sum(len(r.value) for r in records)
        try:
            while self._buffered and (self._buffered + len(records) > self.opts.buffer_events
                                      or self._buffered_bytes + size > self.opts.buffer_bytes):
                self._room.clear()
                await self._room.wait()
        except asyncio.CancelledError:  # shutdown gave up waiting: never queued, so dead-letter, not lose
            self._buffered += len(records)
            self._buffered_bytes += size
            self._dead_letter(records, f"{self.who}: not queued before shutdown (buffer full)")
            raise
        self._buffered += len(records)
        self._buffered_bytes += size
        if self._gave_up:  # _dead_letter releases them again
            self._dead_letter(records, f"{self.who}: broker unreachable at shutdown ({self._last_error})")
            return
        self._queue.extend(records)
        self._wake.set()
        await pending.done

    async def close(self) -> None:
        """Deliver what is buffered, or dead-letter it after `shutdown_timeout`; then disconnect."""
        self._begin_closing()
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._queue:  # the delivery task never ran or died: nothing may be lost
            self._dead_letter(list(self._queue), f"{self.who}: not delivered before shutdown")
            self._queue.clear()
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception, asyncio.TimeoutError):
                await asyncio.wait_for(producer.stop(), timeout=max(self.opts.shutdown_timeout, 1.0))

    def report(self) -> dict[str, int]:
        return {"delivered": self.delivered, "dead-lettered": self.dead_lettered}

    # --- encoding ------------------------------------------------------------------------

    def _encode(self, batch: Batch, owner: Pending) -> list[Record]:
        """Events -> records (topic, key, value, headers); unencodable events are dead-lettered."""
        dumps = orjson.dumps
        topic_t, key_of = self._topic, self.key_of
        static_topic = self._static_topic
        limit = self.opts.max_request_size
        with_headers = self.with_headers
        out: list[Record] = []
        for ev in batch:
            try:
                value = dumps(ev, default=str)
            except (TypeError, orjson.JSONEncodeError) as exc:
                self._dead_letter_events([ev], f"{self.who}: event is not JSON-serializable: {exc}")
                continue
            if len(value) > limit:
                self._dead_letter_events(
                    [ev], f"{self.who}: event is {len(value)} bytes, larger than max_request_size {limit}")
                continue
            topic = static_topic or self._topic_name(topic_t.render(ev))
            if topic is None:
                self._dead_letter_events([ev], f"{self.who}: topic {safe_topic(topic_t.render(ev))!r} not used: "
                                               f"this sink already sends to max_topics={self.opts.max_topics} topics")
                continue
            if not topic:
                self._dead_letter_events([ev], f"{self.who}: topic template {topic_t.source!r} rendered empty")
                continue
            key = key_of(ev).encode() if key_of is not None else b""
            out.append(Record(topic, key or None, value, headers_for(ev) if with_headers else [], ev, owner))
        return out

    def _topic_name(self, rendered: str) -> str | None:
        """The topic for a rendered template; None past `max_topics` distinct ones (events name topics)."""
        name = self._topic_names.get(rendered)
        if name is None:
            name = safe_topic(rendered)
            if name and name not in self._topics:
                if len(self._topics) >= self.opts.max_topics:
                    return None
                self._topics.add(name)
            if len(self._topic_names) < 10000:
                self._topic_names[rendered] = name
        return name

    # --- delivery ------------------------------------------------------------------------

    async def _deliver(self) -> None:
        """Owns the producer: sends what is queued, retries failures, enforces the shutdown deadline."""
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._gave_up:
                self._dead_letter(list(self._queue), f"{self.who}: broker unreachable at shutdown "
                                                     f"({self._last_error})")
                self._queue.clear()
                continue
            round_ = list(self._queue)
            self._queue.clear()
            try:
                failed, error = await self._with_deadline(self._send_round(round_))
            except StageError as exc:
                self._fail_all(round_, exc)
                return
            except Exception as exc:
                failed, error = round_, exc
            if failed:
                self._created.clear()  # after an outage, check the topics again before sending
                self._stale_metadata = True
                self._queue.extendleft(reversed(failed))
                self._note_failure(error)
                await self._pause()
            else:
                self._note_success()

    async def _with_deadline(self, coro: Any) -> Any:
        if self._deadline is None:
            return await coro
        remaining = self._deadline - asyncio.get_running_loop().time()
        return await asyncio.wait_for(coro, timeout=max(remaining, 0.05))

    async def _send_round(self, records: list[Record]) -> tuple[list[Record], BaseException | None]:
        """Send records grouped into one batch per (topic, partition); returns the ones to retry."""
        if self._producer is None:
            await self._connect()
        producer = self._producer
        timeout = self.opts.request_timeout
        if self._stale_metadata:
            # After a failure the broker may have restarted without the topic: produce to a topic it does
            # not know and tansu acknowledges the records and drops them. A metadata request (which
            # auto-creates topics) before the first send after an outage closes that hole.
            if not await asyncio.wait_for(producer.client.force_metadata_update(), timeout):
                raise ConnectionError("metadata refresh failed")
            self._stale_metadata = False
        by_topic: dict[str, list[Record]] = {}
        for r in records:
            by_topic.setdefault(r.topic, []).append(r)
        await self._create_topics(by_topic)
        groups: dict[tuple[str, int], list[Record]] = {}
        for topic, recs in by_topic.items():
            parts = sorted(await asyncio.wait_for(producer.partitions_for(topic), timeout))
            sticky = random.choice(parts)
            memo = self._partition_memo(parts)
            for r in recs:
                key = r.key
                if key is None:
                    p = sticky
                else:
                    p = memo.get(key, -1)
                    if p < 0:
                        p = self._partitioner(key, parts, parts)
                        if len(key) <= _MEMO_KEY_BYTES:  # bounded in bytes too: keys come from events
                            memo[key] = p
                groups.setdefault((topic, p), []).append(r)
        sent: list[tuple[asyncio.Future[Any], list[Record]]] = []
        for (topic, part), recs in groups.items():
            builder = producer.create_batch()
            chunk: list[Record] = []
            for key, value, headers, members in self._units(recs):
                if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    sent.append((await producer.send_batch(builder, topic, partition=part), chunk))
                    builder, chunk = producer.create_batch(), []
                    builder.append(key=key, value=value, timestamp=None, headers=headers)
                chunk.extend(members)
            sent.append((await producer.send_batch(builder, topic, partition=part), chunk))
        results = await asyncio.gather(*(f for f, _ in sent), return_exceptions=True)
        failed: list[Record] = []
        error: BaseException | None = None
        for (_, chunk), res in zip(sent, results, strict=True):
            if not isinstance(res, BaseException):
                self._acked(chunk)
            elif is_permanent(res):
                self.context.log.error("%s: broker rejected %d event(s): %s", self.who, len(chunk),
                                       describe(res))
                self._dead_letter(chunk, f"{self.who}: broker rejected: {describe(res)}")
            else:
                failed.extend(chunk)
                error = res
        return failed, error

    def _partition_memo(self, parts: list[int]) -> dict[bytes, int]:
        """key -> partition for this partition list: the default partitioner is murmur2 in pure Python."""
        scope = tuple(parts)
        memo = self._memos.get(scope)
        if memo is None or len(memo) >= _MEMO_KEYS:  # bounded: keys come from events
            if len(self._memos) >= _MEMO_SCOPES:
                self._memos.clear()
            memo = self._memos[scope] = {}
        return memo

    def _units(self, records: list[Record]) -> Iterator[Unit]:
        """What one partition's records become on the wire: here one Kafka record per event."""
        for r in records:
            yield r.key, r.value, r.headers, (r,)

    async def _connect(self) -> None:
        """Start the producer (idempotence probing, once) and create a static topic if asked."""
        kwargs = dict(
            bootstrap_servers=self.servers, client_id=self.opts.client_id,
            acks=self.opts.acks, linger_ms=self.opts.linger_ms, max_batch_size=self.opts.max_batch_size,
            max_request_size=self.opts.max_request_size,
            compression_type=None if self.opts.compression == "none" else self.opts.compression,
            request_timeout_ms=int(self.opts.request_timeout * 1000),
            retry_backoff_ms=int(min(self.opts.retry_backoff, 1.0) * 1000),
        )
        mode = self._idempotence if self.opts.acks == "all" else False
        try:
            producer, idempotent = await start_producer(mode, self.context.log, self.who, **kwargs)  # type: ignore[arg-type]
        except (ValueError, AssertionError) as exc:
            raise StageError(f"{self.who}: {exc}") from None
        except RuntimeError as exc:
            if type(exc).__module__.startswith("aiokafka.errors"):
                raise
            raise StageError(f"{self.who}: {exc}") from None
        self._producer = producer
        self.idempotent = idempotent
        if not idempotent:
            self._idempotence = False  # decided once: no second probe, no second log line
        if self._topic.static:
            await self._create_topics({safe_topic(self._topic.render({})): []})

    async def _create_topics(self, topics: dict[str, Any]) -> None:
        ct = self.opts.create_topics
        if ct is None:
            return
        new = [t for t in topics if t not in self._created]
        if new:
            await ensure_topics(self.servers, new, ct.partitions, ct.replication_factor,
                                self.context.log, self.who, timeout=self.opts.request_timeout)
            self._created.update(new)

    async def _pause(self) -> None:
        """Backoff sleep, cut short by the shutdown deadline (after which we give up)."""
        loop = asyncio.get_running_loop()
        delay = self._backoff.delay()
        if self._deadline is not None:
            remaining = self._deadline - loop.time()
            if remaining <= 0:
                self._gave_up = True
                self.context.log.error("%s: shutdown_timeout reached with the broker unreachable; "
                                       "dead-lettering %d event(s)", self.who, len(self._queue))
                return
            delay = min(delay, remaining)
        if self._closing.is_set():
            await asyncio.sleep(delay)
        else:  # wake early when shutdown starts, so the deadline applies at once
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closing.wait(), timeout=delay)

    # --- bookkeeping ---------------------------------------------------------------------

    def _acked(self, records: list[Record]) -> None:
        self.delivered += len(records)
        self._release(records)

    def _dead_letter(self, records: list[Record], reason: str) -> None:
        dl, stage = self.context.dead_letter, self.context.stage
        for r in records:  # (one a full dead-letter file leaves out is counted there, not here)
            self.dead_lettered += dl.write(reason, stage=stage, event=r.event, origin={"topic": r.topic})
        self.context.stats.errors += len(records)
        self._release(records)

    def _dead_letter_events(self, events: list[Event], reason: str) -> None:
        for ev in events:
            self.dead_lettered += self.context.dead_letter.write(reason, stage=self.context.stage, event=ev)
        self.context.stats.errors += len(events)

    def _release(self, records: list[Record]) -> None:
        """Count records as finished; resolve `write()` calls whose records are all finished."""
        size = 0
        for r in records:
            owner = r.owner
            owner.left -= 1
            size += len(r.value)
            if owner.left == 0 and not owner.done.done():
                owner.done.set_result(None)
        self._buffered -= len(records)
        self._buffered_bytes -= size
        self._room.set()

    def _fail_all(self, records: list[Record], exc: StageError) -> None:
        """A configuration error surfaced while connecting: every waiting `write()` raises it."""
        self._fatal = exc
        for r in [*records, *self._queue]:
            if not r.owner.done.done():
                r.owner.done.set_exception(exc)
        self._queue.clear()
        self._buffered = 0
        self._buffered_bytes = 0
        self._room.set()

    def _note_failure(self, exc: BaseException | None, when: str = "") -> None:
        now = time.monotonic()
        self._last_error = describe(exc) if exc is not None else "unknown error"
        held = len(self._queue)
        servers = ",".join(self.servers)
        if self._down_since is None:
            self._down_since = now
            self._last_warn = now
            self.context.log.warning("%s: cannot deliver to %s%s (%s); holding %d event(s), retrying with "
                                     "backoff", self.who, servers, f" {when}" if when else "",
                                     self._last_error, held)
        elif now - self._last_warn >= _STILL_DOWN_EVERY:
            self._last_warn = now
            self.context.log.warning("%s: %s still unreachable after %.0fs (%s); holding %d event(s)",
                                     self.who, servers, now - self._down_since, self._last_error, held)

    def _note_success(self) -> None:
        self._backoff.reset()
        if self._down_since is not None:
            self.context.log.warning("%s: broker reachable again after %.1fs; delivery resumed",
                                     self.who, time.monotonic() - self._down_since)
            self._down_since = None

    def _begin_closing(self) -> None:
        if not self._closing.is_set():
            self._deadline = asyncio.get_running_loop().time() + self.opts.shutdown_timeout
            self._closing.set()
            self._wake.set()
