"""Kafka source against a real broker: group consumption, dead-lettering, commit only after sinks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from pipeline.api import Context
from pipeline.build import build
from pipeline.config import load_config
from pipeline.kafka import ensure_topics
from pipeline.runtime.local import LocalRuntime
from stages.sources.kafka import KafkaSource, KafkaSourceOptions
from tests.broker import Broker, kafka_broker  # noqa: F401

pytestmark = pytest.mark.timeout(90)


async def produce(bootstrap: str, topic: str, values: list[bytes], partitions: int = 2) -> None:
    await ensure_topics([bootstrap], [topic], partitions, 1, logging.getLogger("test"), "test")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        futs = [await producer.send(topic, v, key=str(i % 5).encode()) for i, v in enumerate(values)]
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


def event(i: int) -> bytes:
    return orjson.dumps({"channel": "transcript", "rtstream_id": "rts-1", "id": i,
                         "data": {"text": f"line {i}", "is_final": True, "start": i}})


async def committed(bootstrap: str, group: str, topic: str, partitions: int = 2) -> int:
    """Sum of the group's committed offsets over the topic's partitions."""
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        total = 0
        for p in range(partitions):
            total += (await c.committed(TopicPartition(topic, p))) or 0
        return total
    finally:
        await c.stop()


async def test_consumes_all_dead_letters_malformed_with_origin_and_commits_what_it_is_told(
        kafka_broker: Broker, make_context: Callable[..., Context]) -> None:  # noqa: F811
    values = [event(i) for i in range(200)]
    values[10:10] = [b"not json", b"[1, 2]", b'"a string"']
    await produce(kafka_broker.bootstrap, "src1", values)
    ctx = make_context("kafka-in")
    src = KafkaSource(KafkaSourceOptions(bootstrap_servers=kafka_broker.bootstrap, topic="src1", group="g1",
                                         batch_max=50, session_timeout="1s"), ctx)
    seen: list[dict[str, Any]] = []
    index = -1
    async for batch in src.batches():
        index += 1
        seen.extend(batch)
        if index == 0:
            assert await committed(kafka_broker.bootstrap, "g1", "src1") == 0
            await src.commit(0)  # only the first batch is "written everywhere"
            assert await committed(kafka_broker.bootstrap, "g1", "src1") == len(batch) + src.rejected
        if len(seen) == 200 and src.rejected == 3:
            await src.stop()
    assert sorted(e["id"] for e in seen) == list(range(200))
    assert all("ts" in e and "unix_ts" in e for e in seen)
    dead = [orjson.loads(x) for x in ctx.dead_letter.path.read_bytes().splitlines()]
    assert sorted(d["raw"] for d in dead) == ['"a string"', "[1, 2]", "not json"]
    assert all(d["origin"]["topic"] == "src1" and d["origin"]["partition"] in (0, 1)
               and isinstance(d["origin"]["offset"], int) for d in dead)
    assert ctx.stats.dropped == 3
    await asyncio.sleep(0)  # batches() ended: the source leaves the group once all is committed
    await src.commit(index)
    await asyncio.sleep(0.1)
    assert src._consumer is None
    assert await committed(kafka_broker.bootstrap, "g1", "src1") == 203


def config(tmp_path: Path, bootstrap: str, group: str, sink: str) -> Path:
    p = tmp_path / f"{group}-{len(list(tmp_path.iterdir()))}.yaml"
    p.write_text(f"""
name: kin
source: {{type: kafka, bootstrap_servers: "{bootstrap}", topic: src2, group: {group}, batch_max: 40,
          session_timeout: 1s}}
sinks: [{sink}]
dead_letter: {tmp_path}/dead.jsonl
""")
    return p


async def run_until(cfg_path: Path, done: Callable[[KafkaSource], bool], limit: float) -> tuple[int, LocalRuntime]:
    """Run the local runtime until `done(source)` (or `limit` seconds), then stop it like a signal would."""
    rt = LocalRuntime(build(load_config(cfg_path)), install_signals=False)
    source = rt.b.source
    assert isinstance(source, KafkaSource)
    task = asyncio.create_task(rt.run())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not task.done() and not done(source) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    await rt.stop()
    code = await asyncio.wait_for(task, 30)
    await source.close()  # leave the group, as the runtime's end does
    return code, rt


def count_lines(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


async def test_offsets_move_only_after_every_sink_wrote(kafka_broker: Broker, tmp_path: Path) -> None:  # noqa: F811
    await produce(kafka_broker.bootstrap, "src2", [event(i) for i in range(300)])
    out = tmp_path / "out.jsonl"
    jsonl = f"{{type: jsonl, path: {out}}}"

    # 1. One of two sinks fails on its first write: nothing may be committed.
    failing = f'{jsonl}, {{type: "tests.slow_sink:FailingSink"}}'
    code, rt = await run_until(config(tmp_path, kafka_broker.bootstrap, "g2", failing), lambda s: False, 20)
    assert code == 1 and "No space left" in str(rt.error)
    assert await committed(kafka_broker.bootstrap, "g2", "src2") == 0

    # 2. Restarted with healthy sinks, the same group gets every event again, and commits them.
    out.unlink(missing_ok=True)
    code, _ = await run_until(config(tmp_path, kafka_broker.bootstrap, "g2", jsonl),
                              lambda s: count_lines(out) >= 300, 20)
    assert code == 0
    ids = [orjson.loads(x)["id"] for x in out.read_bytes().splitlines()]
    assert sorted(set(ids)) == list(range(300))
    assert await committed(kafka_broker.bootstrap, "g2", "src2") == 300

    # 3. A third run of the group, once it owns both partitions, has nothing left to read.
    out.unlink()
    joined: list[float] = []

    def settled(s: KafkaSource) -> bool:
        if s.assigned == 2 and not joined:
            joined.append(asyncio.get_running_loop().time())
        return bool(joined) and asyncio.get_running_loop().time() - joined[0] > 1.0

    code, _ = await run_until(config(tmp_path, kafka_broker.bootstrap, "g2", jsonl), settled, 20)
    assert code == 0 and joined and count_lines(out) == 0


async def test_shutdown_behind_a_hanging_webhook_stays_bounded_with_a_committing_source(
        kafka_broker: Broker, tmp_path: Path) -> None:  # noqa: F811
    """The last offset commit flushed every sink first, without a deadline: the alert forwarder's flush
    waits for its queued alerts to be delivered, so behind a webhook that never answers the run took
    max_attempts x timeout per alert instead of drain_timeout + shutdown_timeout. Now that commit gets
    what is left of drain_timeout; what it cannot cover is read again by the next run (at-least-once)."""
    from tests.webhook_server import HANG, WebhookServer

    alerts = [orjson.dumps({"channel": "alert", "rtstream_id": "rts-1", "id": i,
                            "data": {"event_label": "x", "text": f"alert {i}", "timestamp": 1710000000000 + i}})
              for i in range(5)]
    await produce(kafka_broker.bootstrap, "alerts-in", alerts)
    server = await WebhookServer(script=[HANG] * 100).start()
    try:
        cfg = tmp_path / "p.yaml"
        cfg.write_text(f"""
name: hang
source: {{type: kafka, bootstrap_servers: "{kafka_broker.bootstrap}", topic: alerts-in, group: gh,
          session_timeout: 1s}}
runtime: {{drain_timeout: 0.5s}}
sinks:
  - {{type: alert_forwarder, url: "{server.url()}", timeout: 3s, max_attempts: 5, backoff_initial: 0.05s,
      shutdown_timeout: 0.5s}}
dead_letter: {tmp_path}/dead.jsonl
""")
        rt = LocalRuntime(build(load_config(cfg)), install_signals=False)
        task = asyncio.create_task(rt.run())
        for _ in range(400):
            if len(server.requests) >= 4:
                break
            await asyncio.sleep(0.05)
        assert server.requests, "the forwarder never reached the webhook"
        started = asyncio.get_running_loop().time()
        await rt.stop()
        await asyncio.wait_for(asyncio.shield(task), 20)
        took = asyncio.get_running_loop().time() - started
    finally:
        await server.stop()
    assert took < 0.5 + 0.5 + 2 + 1, f"shutdown took {took:.1f}s"
    dead = [orjson.loads(x)["event"]["id"] for x in (tmp_path / "dead.jsonl").read_bytes().splitlines()]
    assert sorted(dead) == list(range(5))


async def test_a_stop_during_a_long_group_join_ends_the_source_at_once(
        kafka_broker: Broker, make_context: Callable[..., Context]) -> None:  # noqa: F811
    """Joining a group can take up to the session timeout (the broker waits that long for other members);
    the join did not look at stop, so with `session_timeout: 20m` a SIGTERM went unheeded for 20 minutes."""
    await produce(kafka_broker.bootstrap, "src-join", [event(i) for i in range(3)])
    src = KafkaSource(KafkaSourceOptions(bootstrap_servers=kafka_broker.bootstrap, topic="src-join",
                                         group="g-join", session_timeout="20m"), make_context("kafka-in"))

    async def drain() -> int:
        return sum([len(b) async for b in src.batches()])

    task = asyncio.create_task(drain())
    await asyncio.sleep(2.0)
    started = asyncio.get_running_loop().time()
    await src.stop()
    await asyncio.wait_for(task, 10)
    assert asyncio.get_running_loop().time() - started < 3.0


@pytest.mark.parametrize("value", ["0s", "500ms", "2h"])
def test_session_timeout_outside_what_kafka_accepts_is_a_config_error(value: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="session_timeout"):
        KafkaSourceOptions(topic="t", session_timeout=value)
