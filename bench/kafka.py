"""Benchmark 4: the Kafka sink to the test broker (tansu) with acks=all, against aiokafka's own loop.

Ours: `KafkaSink.write()` per batch of 1,024 events (returns once the broker
acknowledged the batch). Baseline: an `AIOKafkaProducer` with the same settings
sending the same bytes (value, key, headers), awaiting each batch's futures, so
both give the same at-least-once guarantee. One topic with 4 partitions each.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson

from bench.common import Result, ratio_result, workdir
from bench.gen import dataset

BATCH = 1024
PARTITIONS = 4
TARGET = 0.7


def available() -> str | None:
    try:
        from tests.broker import tansu_binary

        tansu_binary()
    except BaseException as exc:  # pytest.skip raises an outcome exception, not an Exception
        return f"no test broker: {exc}"
    return None


def _events(n: int) -> list[dict[str, Any]]:
    with open(dataset(n), "rb") as fh:
        return [orjson.loads(line) for _, line in zip(range(n), fh, strict=False)]


async def _ours(bootstrap: str, events: list[dict[str, Any]], out: Path) -> float:
    from pipeline.api import Context, StateStore
    from pipeline.deadletter import DeadLetter
    from pipeline.session import SessionLink
    from pipeline.stats import StageStats
    from stages.sinks.kafka import KafkaSink

    opts = KafkaSink.Options.model_validate({
        "bootstrap_servers": bootstrap, "topic": "bench-ours", "key": "{rtstream_id}", "acks": "all",
        "idempotence": False, "create_topics": {"partitions": PARTITIONS}})
    ctx = Context(pipeline="bench", stage="kafka", dead_letter=DeadLetter(out / "dead-letter.jsonl"),
                  session=SessionLink(), stats=StageStats("kafka", "sink"), state=StateStore())
    sink = KafkaSink(opts, ctx)
    await sink.start()
    await sink.write(events[:BATCH])  # connect and create the topic outside the timing
    t0 = time.perf_counter()
    for i in range(BATCH, len(events), BATCH):
        await sink.write(events[i:i + BATCH])
    dt = time.perf_counter() - t0
    await sink.close()
    if sink.dead_lettered:
        raise RuntimeError(f"kafka sink dead-lettered {sink.dead_lettered} events")
    return (len(events) - BATCH) / dt


def _record(ev: dict[str, Any]) -> tuple[bytes, bytes | None, list[tuple[str, bytes]]]:
    from pipeline.events import canonical, channel

    headers = [("channel", canonical(channel(ev)).encode())]
    for name in ("capture_session_id", "rtstream_name"):
        v = ev.get(name)
        if isinstance(v, str) and v:
            headers.append((name, v.encode()))
    key = ev.get("rtstream_id")
    return orjson.dumps(ev, default=str), key.encode() if isinstance(key, str) and key else None, headers


async def _aiokafka(bootstrap: str, events: list[dict[str, Any]]) -> float:
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic("bench-aiokafka", PARTITIONS, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=262144,
                                enable_idempotence=False)
    await producer.start()
    try:
        async def send(chunk: list[dict[str, Any]]) -> None:
            futures = []
            for ev in chunk:
                value, key, headers = _record(ev)
                futures.append(await producer.send("bench-aiokafka", value, key=key, headers=headers))
            await asyncio.gather(*futures)

        await send(events[:BATCH])
        t0 = time.perf_counter()
        for i in range(BATCH, len(events), BATCH):
            await send(events[i:i + BATCH])
        return (len(events) - BATCH) / (time.perf_counter() - t0)
    finally:
        await producer.stop()


def run(n: int) -> list[Result]:
    why = available()
    if why is not None:
        return [Result("kafka sink", skipped=why)]
    from tests.broker import running_broker

    out = workdir("kafka")
    events = _events(max(n, 2 * BATCH))
    with running_broker(log_path=out / "tansu.log") as broker:
        theirs = asyncio.run(_aiokafka(broker.bootstrap, events))
        ours = asyncio.run(_ours(broker.bootstrap, events, out))
    res = ratio_result("kafka sink, acks=all", ours, theirs, TARGET, "aiokafka loop")
    res.notes.append(f"{len(events):,} events in batches of {BATCH}, {PARTITIONS} partitions, tansu broker")
    return [res]
