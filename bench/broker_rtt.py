"""Raw aiokafka produce -> consume latency on the test broker, per consumer fetch wait (no pipeline code).

Why: it separates the broker's share of the faust runtime's latency from ours.
A fetch asks the broker to hold it until records arrive or `fetch_max_wait_ms`
passes; Apache Kafka answers on arrival, the test broker (tansu) only after
part of the wait, so its round trip grows with the wait.

    .venv/bin/python -m bench.broker_rtt            # waits 1500, 500, 100, 10 ms
    .venv/bin/python -m bench.broker_rtt --stored   # an idle fetch's CPU cost vs batches stored

`--stored`: one consumer polls an idle topic with a 10 ms fetch wait while the
topic holds 0, 4,000, 8,000 and 16,000 stored batches (10 records each); prints
the broker's CPU use. The test broker's fetch cost grows with what the topic
holds, so a long faust run slowly loads it more.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

RECORDS = 60
GAP = 0.05  # seconds between records: every record finds the consumer waiting


def _q(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))] if s else float("nan")


async def trial(bootstrap: str, topic: str, fetch_wait_ms: int) -> tuple[float, float]:
    """(p50, p99) in ms from `send_and_wait` start to the record in `getmany`, consumer group of one."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 4, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks="all")
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"{topic}-g",
                                fetch_max_wait_ms=fetch_wait_ms, auto_offset_reset="latest")
    await producer.start()
    await consumer.start()
    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=100)
        await asyncio.sleep(0.5)
        lat: list[float] = []

        async def consume() -> None:
            while len(lat) < RECORDS:
                got = await consumer.getmany(timeout_ms=1000)
                now = time.perf_counter()
                lat.extend((now - float(m.value)) * 1000 for msgs in got.values() for m in msgs)

        task = asyncio.create_task(consume())
        for i in range(RECORDS):
            await producer.send_and_wait(topic, str(time.perf_counter()).encode(), key=str(i).encode())
            await asyncio.sleep(GAP)
        await asyncio.wait_for(task, 10 + fetch_wait_ms / 100)
        return _q(lat, 0.5), _q(lat, 0.99)
    finally:
        await consumer.stop()
        await producer.stop()


def _cpu_ticks(pid: int) -> int:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115
    return int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks


async def stored(bootstrap: str, pid: int, steps: list[int], seconds: float = 5.0) -> None:
    """The broker's CPU share while one consumer polls an idle topic, after each step of stored batches."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic("stored", 4, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks="all")
    consumer = AIOKafkaConsumer("stored", bootstrap_servers=bootstrap, group_id="stored-g",
                                fetch_max_wait_ms=10, auto_offset_reset="latest")
    await producer.start()
    await consumer.start()
    hz = os.sysconf("SC_CLK_TCK")
    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=100)
        held = 0
        for target in steps:
            while held < target:  # one batch per send_and_wait: each is stored as its own batch
                await asyncio.gather(*[await producer.send("stored", b"x" * 500, partition=held % 4)
                                       for _ in range(10)])
                held += 1
            await consumer.getmany(timeout_ms=100)  # catch up to the end first: then every poll is idle
            t0, c0 = time.monotonic(), _cpu_ticks(pid)
            while time.monotonic() - t0 < seconds:
                await consumer.getmany(timeout_ms=100)
            share = (_cpu_ticks(pid) - c0) / hz / (time.monotonic() - t0)
            print(f"{held:6,d} batches stored: broker CPU {share * 100:3.0f}% of a core while one consumer "
                  f"polls (fetch wait 10 ms)")
    finally:
        await consumer.stop()
        await producer.stop()


def main(waits: list[int]) -> None:
    from tests.broker import running_broker

    with running_broker() as broker:
        for k, wait in enumerate(waits):
            p50, p99 = asyncio.run(trial(broker.bootstrap, f"rtt-{k}", wait))
            print(f"fetch_max_wait_ms {wait:5d}: produce -> consume p50 {p50:7.1f} ms, p99 {p99:7.1f} ms")


def main_stored(steps: list[int]) -> None:
    from tests.broker import running_broker

    with running_broker() as broker:
        assert broker.pid is not None
        asyncio.run(stored(broker.bootstrap, broker.pid, steps))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--stored"]:
        main_stored([int(a) for a in sys.argv[2:]] or [0, 4000, 8000, 16000])
    else:
        main([int(a) for a in sys.argv[1:]] or [1500, 500, 100, 10])
