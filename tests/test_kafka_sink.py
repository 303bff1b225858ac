"""Kafka sink against a real broker (tansu): counts, keys, headers, outages, shutdown, idempotence."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from pipeline.api import Context
from pipeline.errors import StageError
from pipeline.templates import Template
from stages.sinks.kafka import KafkaSink, KafkaSinkOptions
from tests.broker import Broker, kafka_broker, own_broker, read_records  # noqa: F401

pytestmark = pytest.mark.timeout(90)


def ev(seq: int, channel: str = "transcript", cap: str = "cap-1") -> dict[str, Any]:
    return {"channel": channel, "rtstream_id": "rts-1", "rtstream_name": "mic:default",
            "capture_session_id": cap, "data": {"text": f"event {seq}", "start": 1710000000000 + seq},
            "seq": seq}


def lifecycle(seq: int, status: str) -> dict[str, Any]:
    return {"event": f"capture_session.{status}", "capture_session_id": "cap-1", "status": status,
            "seq": seq}


def make_sink(make_context: Callable[..., Context], bootstrap: str, **opts: Any) -> KafkaSink:
    options = KafkaSinkOptions(bootstrap_servers=bootstrap, **opts)
    return KafkaSink(options, make_context("kafka-out"))


def seqs(records: list[Any]) -> list[int]:
    return [orjson.loads(r.value)["seq"] for r in records]


# --- templates and options ---------------------------------------------------------------------

def test_template_fields_alternatives_and_lifecycle_channel() -> None:
    t = Template("videodb.{channel}.{data.event_label}")
    assert t.render({"channel": "alert", "data": {"event_label": "x"}}) == "videodb.alert.x"
    assert Template("videodb.{channel}").render(lifecycle(1, "active")) == "videodb.capture_session"
    assert Template("videodb.{channel}").render({"channel": "scene_index"}) == "videodb.visual_index"
    key = Template("{capture_session_id|rtstream_id}")
    assert key.render({"rtstream_id": "rts-9"}) == "rts-9"
    assert key.render({"rtstream_id": "rts-9", "capture_session_id": "cap-2"}) == "cap-2"
    assert Template("{text}").render({"data": {"text": "hi"}}) == "hi"
    assert Template("plain{{x}}").static and Template("plain{{x}}").render({}) == "plain{x}"


def test_options_reject_unknown_keys_bad_templates_and_bad_combinations() -> None:
    with pytest.raises(ValidationError, match="topik"):
        KafkaSinkOptions(topik="x")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="bad template"):
        KafkaSinkOptions(topic="videodb.{channel")
    with pytest.raises(ValidationError, match="acks: all"):
        KafkaSinkOptions(idempotence=True, acks=1)
    opts = KafkaSinkOptions(bootstrap_servers="kafka://a:9092, b", shutdown_timeout="2s")
    assert opts.bootstrap_servers == ["a:9092", "b:9092"] and opts.shutdown_timeout == 2.0


# --- delivery --------------------------------------------------------------------------------

async def test_exact_counts_per_topic_with_keys_headers_and_json_values(
        kafka_broker: Broker, make_context: Callable[..., Context]) -> None:  # noqa: F811
    sink = make_sink(make_context, kafka_broker.bootstrap, topic="t1.{channel}",
                     create_topics={"partitions": 3})
    await sink.start()
    want = Counter({"t1.transcript": 0, "t1.visual_index": 0, "t1.capture_session": 0})
    seq = 0
    for b in range(20):
        batch = []
        for i in range(50):
            seq += 1
            if i % 10 == 0:
                batch.append(lifecycle(seq, "active"))
                want["t1.capture_session"] += 1
            elif i % 3 == 0:
                batch.append(ev(seq, "scene_index" if b % 2 else "visual_index", cap=f"cap-{i % 4}"))
                want["t1.visual_index"] += 1
            else:
                batch.append(ev(seq, cap=f"cap-{i % 4}"))
                want["t1.transcript"] += 1
        await sink.write(batch)
    await sink.close()
    assert sink.delivered == seq == 1000

    records = await read_records(kafka_broker.bootstrap, list(want), expect=seq)
    assert Counter(r.topic for r in records) == want
    assert sorted(seqs(records)) == list(range(1, seq + 1))
    used = {r.partition for r in records if r.topic == "t1.transcript"}
    assert len(used) >= 2 and used <= {0, 1, 2}  # created with 3 partitions, keys spread over them
    one = next(r for r in records if r.topic == "t1.transcript")
    body = orjson.loads(one.value)
    assert one.key == body["capture_session_id"].encode()
    assert dict(one.headers) == {"channel": b"transcript", "capture_session_id": body["capture_session_id"].encode(),
                                 "rtstream_name": b"mic:default"}
    # same key -> same partition: per-session order holds
    parts_by_key: dict[bytes, set[int]] = {}
    for r in records:
        parts_by_key.setdefault(r.key, set()).add(r.partition)
    assert all(len(p) == 1 for p in parts_by_key.values())
    assert sink.context.dead_letter.count == 0


async def test_idempotence_auto_falls_back_once_and_true_is_a_clear_error(
        kafka_broker: Broker, make_context: Callable[..., Context],  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pipeline")
    sink = make_sink(make_context, kafka_broker.bootstrap, topic="t2")
    await sink.start()
    await sink.write([ev(1)])
    await sink.write([ev(2)])
    await sink.close()
    assert not sink.idempotent
    notes = [r for r in caplog.records if "idempotent" in r.getMessage()]
    assert len(notes) == 1 and "idempotence is off" in notes[0].getMessage()
    assert seqs(await read_records(kafka_broker.bootstrap, ["t2"], expect=2)) == [1, 2]

    strict = make_sink(make_context, kafka_broker.bootstrap, topic="t2", idempotence=True)
    with pytest.raises(StageError, match="refused an idempotent producer") as info:
        await strict.start()
    assert "\n" not in str(info.value)
    await strict.close()


async def test_oversized_event_is_dead_lettered_and_the_rest_delivered(
        kafka_broker: Broker, make_context: Callable[..., Context]) -> None:  # noqa: F811
    sink = make_sink(make_context, kafka_broker.bootstrap, topic="t3", max_request_size=2048)
    await sink.start()
    big = ev(2)
    big["data"]["text"] = "x" * 5000
    await sink.write([ev(1), big, ev(3)])
    await sink.close()
    assert seqs(await read_records(kafka_broker.bootstrap, ["t3"], expect=2)) == [1, 3]
    lines = sink.context.dead_letter.path.read_bytes().splitlines()
    assert len(lines) == 1 and sink.dead_lettered == 1
    rec = orjson.loads(lines[0])
    assert "max_request_size" in rec["reason"] and rec["event"]["seq"] == 2


# --- outages ---------------------------------------------------------------------------------

async def test_broker_started_5s_after_the_pipeline_still_gets_every_event(
        own_broker: Broker, make_context: Callable[..., Context]) -> None:  # noqa: F811
    sink = make_sink(make_context, own_broker.bootstrap, topic="late", request_timeout="2s",
                     max_retry_backoff="1s", buffer_events=100)
    await sink.start()  # broker not there yet: start() must not fail

    async def pipeline() -> None:
        for b in range(10):
            await sink.write([ev(b * 20 + i) for i in range(20)])

    task = asyncio.create_task(pipeline())
    await asyncio.sleep(5)
    assert not task.done(), "write() returned although nothing could have been acknowledged"
    assert sink.delivered == 0
    own_broker.start()
    await asyncio.wait_for(task, 30)
    await sink.close()
    assert sink.delivered == 200 and sink.dead_lettered == 0
    assert sorted(seqs(await read_records(own_broker.bootstrap, ["late"], expect=200))) == list(range(200))


async def test_broker_killed_and_restarted_mid_run_loses_nothing_after_recovery(
        own_broker: Broker, make_context: Callable[..., Context]) -> None:  # noqa: F811
    own_broker.start()
    # tansu keeps topics in memory only: create_topics re-creates the topic after the restart,
    # as a real broker would still have it; the outage outlasts request_timeout for that reason.
    sink = make_sink(make_context, own_broker.bootstrap, topic="flaky", request_timeout="1s",
                     max_retry_backoff="500ms", create_topics={"partitions": 2})
    await sink.start()
    written: list[int] = []
    killed_at: list[int] = []

    async def pipeline() -> None:
        for b in range(60):
            batch = [ev(b * 10 + i) for i in range(10)]
            await sink.write(batch)
            written.extend(e["seq"] for e in batch)
            await asyncio.sleep(0.02)

    task = asyncio.create_task(pipeline())
    while len(written) < 150:
        await asyncio.sleep(0.01)
    own_broker.stop()  # SIGKILL; in-memory storage: what it had is gone with it
    killed_at.append(len(written))
    await asyncio.sleep(3)
    assert len(written) <= killed_at[0] + 10, "writes kept returning with no broker to acknowledge them"
    own_broker.start()
    await asyncio.wait_for(task, 40)  # the pipeline did not crash
    await sink.close()
    assert len(written) == 600 and sink.dead_lettered == 0
    got = set(seqs(await read_records(own_broker.bootstrap, ["flaky"], expect=600 - killed_at[0])))
    missing = [s for s in range(killed_at[0], 600) if s not in got]
    assert not missing, f"{len(missing)} events written at or after the outage never arrived"


async def test_shutdown_with_broker_down_dead_letters_everything_buffered(
        own_broker: Broker, make_context: Callable[..., Context]) -> None:  # noqa: F811
    sink = make_sink(make_context, own_broker.bootstrap, topic="never", shutdown_timeout="1s",
                     request_timeout="1s")
    await sink.start()
    task = asyncio.create_task(sink.write([ev(i) for i in range(25)]))
    await asyncio.sleep(0.5)
    assert not task.done()
    closing = asyncio.create_task(sink.close())  # shutdown_timeout starts here, not at a session exit
    await asyncio.wait_for(task, 10)
    await asyncio.wait_for(closing, 10)
    lines = [orjson.loads(x) for x in sink.context.dead_letter.path.read_bytes().splitlines()]
    assert sorted(rec["event"]["seq"] for rec in lines) == list(range(25))
    assert sink.dead_lettered == 25 and sink.delivered == 0
    assert all("unreachable" in rec["reason"] or "not delivered" in rec["reason"] for rec in lines)


async def test_close_without_exit_request_also_bounds_shutdown(
        own_broker: Broker, make_context: Callable[..., Context]) -> None:  # noqa: F811
    sink = make_sink(make_context, own_broker.bootstrap, topic="never", shutdown_timeout="1s",
                     request_timeout="1s")
    await sink.start()
    writer = asyncio.create_task(sink.write([ev(i) for i in range(5)]))
    await asyncio.sleep(0.3)
    writer.cancel()  # a runtime giving up on a blocked write: the batch stays buffered
    await asyncio.wait_for(sink.close(), 10)
    assert sink.dead_lettered == 5


# --- a broker that restarts without its topics -------------------------------------------------

async def test_tansu_alone_acknowledges_records_for_a_topic_it_lost_and_keeps_none(own_broker: Broker) -> None:  # noqa: F811
    """The test broker, no pipeline code: after a restart (in-memory storage) a produce request for a
    topic it no longer has is acknowledged and the record is gone. A real Kafka broker answers
    UNKNOWN_TOPIC_OR_PARTITION. This is why delivery seemed to resume only long after an outage."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    async def send(value: bytes) -> Any:
        batch = producer.create_batch()
        batch.append(key=None, value=value, timestamp=None)
        return await (await producer.send_batch(batch, "lost", partition=0))

    own_broker.start()
    producer = AIOKafkaProducer(bootstrap_servers=own_broker.bootstrap, acks="all", request_timeout_ms=1000)
    await producer.start()
    try:
        await send(b"before")
        own_broker.stop()
        with pytest.raises(KafkaError):
            await send(b"while down")
        await asyncio.to_thread(own_broker.start)
        for _ in range(50):
            try:
                meta = await send(b"after")
                break
            except KafkaError:
                await asyncio.sleep(0.1)
        assert meta.offset == 0  # acknowledged...
        assert await read_records(own_broker.bootstrap, ["lost"], expect=1, timeout=3) == []  # ...and kept nowhere
    finally:
        await producer.stop()


async def test_sink_refreshes_metadata_after_an_outage_so_delivery_really_resumes(
        own_broker: Broker, make_context: Callable[..., Context]) -> None:  # noqa: F811
    """Broker SIGKILLed, back 3 s later: the first send after the outage follows a metadata request (which
    re-creates the topic), so what was written during and after the outage is in the topic at once
    (before: acknowledged into the void until something refreshed the metadata)."""
    own_broker.start()
    sink = make_sink(make_context, own_broker.bootstrap, topic="resume", request_timeout="1s",
                     max_retry_backoff="500ms")
    await sink.start()
    await sink.write([ev(0)])
    own_broker.stop()
    held = asyncio.create_task(sink.write([ev(i) for i in range(1, 11)]))
    await asyncio.sleep(3)
    assert not held.done()
    await asyncio.to_thread(own_broker.start)
    back = asyncio.get_running_loop().time()
    await asyncio.wait_for(held, 10)
    resumed = asyncio.get_running_loop().time() - back
    for i in range(11, 21):
        await sink.write([ev(i)])
    await sink.close()
    assert sink.dead_lettered == 0
    got = sorted(seqs(await read_records(own_broker.bootstrap, ["resume"], expect=20, timeout=10)))
    assert got == list(range(1, 21)), f"{20 - len(got)} acknowledged events are not in the topic"
    print(f"delivery resumed {resumed:.2f}s after the broker returned")
    assert resumed < 2.0, f"delivery resumed {resumed:.1f}s after the broker returned"


async def test_buffer_is_bounded_in_bytes_while_the_broker_is_away(
        own_broker: Broker, make_context: Callable[..., Context]) -> None:  # noqa: F811
    """buffer_events alone let 10,000 large events pile up; buffer_bytes stops write() first."""
    sink = make_sink(make_context, own_broker.bootstrap, topic="big", buffer_bytes=50_000, request_timeout="1s",
                     shutdown_timeout="1s")
    await sink.start()  # no broker
    big = "x" * 20_000
    writers = [asyncio.create_task(sink.write([{**ev(i), "pad": big}])) for i in range(10)]
    await asyncio.sleep(0.5)
    assert sink._buffered_bytes <= 50_000 and sink._buffered == 2  # the third 20 KB event waits
    closing = asyncio.create_task(sink.close())
    await asyncio.wait_for(asyncio.gather(*writers), 10)
    await asyncio.wait_for(closing, 10)
    assert sink.dead_lettered == 10 and sink._buffered == 0 and sink._buffered_bytes == 0


async def test_a_write_cancelled_while_waiting_for_room_dead_letters_its_events(
        own_broker: Broker, make_context: Callable[..., Context]) -> None:  # noqa: F811
    """The runtime cancels a pending write after drain_timeout and relies on the sink (cancel_safe): events
    that never entered the full buffer must be dead-lettered, not forgotten."""
    sink = make_sink(make_context, own_broker.bootstrap, topic="never", buffer_events=5, request_timeout="1s",
                     shutdown_timeout="1s")
    await sink.start()  # no broker
    queued = asyncio.create_task(sink.write([ev(i) for i in range(5)]))
    waiting = asyncio.create_task(sink.write([ev(i) for i in range(5, 8)]))
    await asyncio.sleep(0.3)
    waiting.cancel()
    queued.cancel()
    await asyncio.wait_for(sink.close(), 10)
    dead = sorted(orjson.loads(x)["event"]["seq"] for x in sink.context.dead_letter.path.read_bytes().splitlines())
    assert dead == list(range(8)) and sink.dead_lettered == 8
