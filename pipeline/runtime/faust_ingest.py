"""The faust runtime's ingest (`pipeline run` with `engine: faust`): the configured source and controller
in the local runtime, with the topic `<name>-ingest` as the only sink.

The topic has `runtime.partitions` partitions (created if missing; another count is refused, by the ingest
and by the workers, since the workers' state changelogs are partitioned like it). Records are keyed by capture
session (by rtstream id while the session is not known yet), and a record holds one or more events as JSON
Lines: all of one publish round's events for its partition, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

from pipeline.api import Context
from pipeline.build import SinkSlot, build
from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError, StageError
from pipeline.events import Batch, Event
from pipeline.kafka import bootstrap_list, ensure_topics, partition_count, quiet_aiokafka
from pipeline.session import SessionLink
from pipeline.stats import StageStats
from stages.sinks.kafka import CreateTopics, KafkaSink, KafkaSinkOptions
from stages.sinks.kafka.records import Record, Unit, pack

log = logging.getLogger("pipeline.runtime.faust")

STREAMS_REMEMBERED = 65536  # rtstream id -> session kept by the ingest (the oldest go first)


def ingest_topic(cfg: PipelineConfig) -> str:
    return f"{cfg.name}-ingest"


def app_id(cfg: PipelineConfig) -> str:
    """The faust app id, which is also the workers' consumer group."""
    return f"videodb-pipeline-{cfg.name}"


class SessionKeys:
    """Record key for an event: its capture session, learned from lifecycle events.

    Why: every event of a session then lands in one partition, in order, so one
    worker sees the `capture_session.active` event before the rtstream events
    it describes. Before the session is known the key is the rtstream id.
    """

    __slots__ = ("by_stream", "session")

    def __init__(self, session: SessionLink) -> None:
        self.session = session
        self.by_stream: dict[str, str] = {}

    def __call__(self, event: Event) -> str:
        sid = event.get("capture_session_id")
        if isinstance(sid, str) and sid:
            data = event.get("data")
            streams = data.get("rtstreams") if isinstance(data, dict) else None
            if isinstance(streams, list):
                for s in streams:
                    if isinstance(s, dict) and isinstance(s.get("rtstream_id"), str):
                        self._remember(s["rtstream_id"], sid)
            return sid
        rts = event.get("rtstream_id")
        if isinstance(rts, str) and rts:
            return self.by_stream.get(rts) or self.session.capture_session_id or rts
        return self.session.capture_session_id or ""

    def _remember(self, rts: str, sid: str) -> None:
        """Bounded: lifecycle events (a peer) name new rtstreams without end; the oldest are forgotten."""
        by_stream = self.by_stream
        by_stream.pop(rts, None)  # re-insert: the newest mapping is the last to go
        by_stream[rts] = sid
        if len(by_stream) > STREAMS_REMEMBERED:
            del by_stream[next(iter(by_stream))]


class PartitionMismatch(StageError):
    """The ingest topic exists with another partition count than `runtime.partitions` (a config mistake)."""

    exit_code = 2


def partition_mismatch(cfg: PipelineConfig, found: int) -> str:
    return (f"{cfg.file}: runtime.partitions: {cfg.runtime.partitions}, but topic {ingest_topic(cfg)} has {found} "
            f"partitions (made by an earlier run); set partitions: {found}, or give the pipeline "
            "a new name to start over with new topics")


class IngestSink(KafkaSink):
    """The ingest's Kafka sink: each round's events for one partition travel as one JSON Lines record.

    The runtime hands it every batch queued while it waited for an ack, and the
    workers pay faust's per-record cost once per record, not once per event.
    """

    merge_queued = True  # write() waits for the broker: queued batches share one round trip, not one each
    with_headers = False  # a packed record carries many events: no per-event headers
    cfg: PipelineConfig  # set by ingest_runtime: the partition count the workers' state is made for
    publish_interval = 0.0  # seconds; ingest_runtime sets runtime.publish_interval

    def _units(self, records: list[Record]) -> Iterator[Unit]:
        return pack(records, self.opts.max_batch_size)

    async def write(self, batch: Batch) -> None:
        """One publish round; one that took less than `runtime.publish_interval` then waits out the rest, and
        what arrives meanwhile goes out together in the next round.

        Why: every round stores a record batch per partition, and the test broker's fetch walks all a
        partition holds, so at 1,000 sessions 130 rounds a second cost it 0.6-0.8 of a core. An event
        that finds the ingest idle (no round in the last interval) is published at once.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        await super().write(batch)
        rest = self.publish_interval - (loop.time() - started)
        if rest > 0:
            await asyncio.sleep(rest)

    async def _connect(self) -> None:
        """Also refuse a topic with another partition count: no worker would read the events it got."""
        await super()._connect()
        assert self._producer is not None
        try:
            parts = await asyncio.wait_for(self._producer.partitions_for(self.opts.topic), self.opts.request_timeout)
        except BaseException:  # not checked: the next attempt connects (and checks) again
            await self._drop_producer()
            raise
        if len(parts) != self.cfg.runtime.partitions:
            await self._drop_producer()
            raise PartitionMismatch(partition_mismatch(self.cfg, len(parts)))

    async def _drop_producer(self) -> None:
        producer, self._producer = self._producer, None
        with contextlib.suppress(Exception):
            await producer.stop()


def ingest_runtime(cfg: PipelineConfig, *, install_signals: bool = True) -> Any:
    """The local runtime with the configured source/controller and the ingest topic as only sink."""
    from pipeline.runtime.local import LocalRuntime

    built = build(dataclasses.replace(cfg, stages=[], sinks=[]))
    label = f"runtime.ingest:{ingest_topic(cfg)}"
    stats = StageStats(label, "sink")
    ctx = Context(pipeline=cfg.name, stage=label, dead_letter=built.dead_letter, session=built.session,
                  stats=stats, out_dir=cfg.out_dir, state_dir=cfg.state_dir, settings=cfg.settings(),
                  log=logging.getLogger("pipeline.sink.kafka"))
    # linger_ms 0: the runtime hands the sink whole batches and waits for each one's acknowledgement
    # before the next, so lingering would only add its 5 ms to every batch's way to the workers; rounds are
    # paced by publish_interval instead, which does not delay an event that finds the ingest idle
    options = KafkaSinkOptions(bootstrap_servers=cfg.runtime.broker, topic=ingest_topic(cfg), key=None,
                               create_topics=CreateTopics(partitions=cfg.runtime.partitions), linger_ms=0)
    sink = IngestSink(options, ctx)
    sink.cfg = cfg
    sink.publish_interval = cfg.runtime.publish_interval
    sink.key_of = SessionKeys(built.session)
    built.sinks.append(SinkSlot(sink, None, stats))
    built.stats.append(stats)
    return LocalRuntime(built, install_signals=install_signals)



def create_ingest_topic(cfg: PipelineConfig) -> None:
    """faust does not create source topics: make sure `<name>-ingest` exists with N partitions.

    An ingest topic made earlier with another count is refused: the state changelogs are
    partitioned like it, and faust cannot write state for a partition its changelog lacks.
    """
    servers = bootstrap_list(cfg.runtime.broker)
    topic = ingest_topic(cfg)

    async def create() -> int | None:
        delay = 0.5
        while True:
            try:
                await ensure_topics(servers, [topic], cfg.runtime.partitions, 1, log, "worker")
                return await partition_count(servers, topic)
            except Exception as exc:
                log.warning("worker: cannot reach %s (%s); retrying in %.0fs", ",".join(servers),
                            type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    quiet_aiokafka()
    try:
        found = asyncio.run(create())
    except KeyboardInterrupt:
        raise StageError("worker: interrupted while waiting for the broker") from None
    if found is not None and found != cfg.runtime.partitions:
        raise ConfigError(partition_mismatch(cfg, found))
