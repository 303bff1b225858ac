"""Another producer writes hostile records straight to `<name>-ingest`: a real worker keeps the good lines."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import orjson
import pytest

from pipeline.kafka import ensure_topics
from tests.broker import Broker, kafka_broker  # noqa: F401
from tests.test_faust_runtime import Workers, count, workers_env, write_config  # noqa: F401

pytestmark = pytest.mark.timeout(120)


def good(n: int) -> bytes:
    return orjson.dumps({"channel": "transcript", "capture_session_id": "cap-h", "seq": n})


HOSTILE: list[tuple[bytes | None, bytes | None]] = [  # (key, value)
    (None, b"\n\n\n" + good(0) + b"\n\n\n" + good(1) + b"\n\n"),     # blank lines
    (b"cap-h", good(2) + b"\r\n\r\n" + good(3) + b"\r\n"),             # CRLF endings
    (None, b"{}\n" * 300_000),                                        # a huge count of tiny events
    (None, b"\xff\xfe\xfd\n" + good(4)),                              # non-UTF-8 line, then a good one
    (None, b"[1,2]\n" + good(5) + b"\n[]"),                           # JSON arrays
    (None, b'{"a":' * 1000 + b"1" + b"}" * 1000 + b"\n" + good(6)),   # a line nested 1,000 deep
    (b"cap-h", None),                                                 # a tombstone
    (None, b""),                                                      # empty
    (None, good(7)),                                                  # a plain one-event record
]
GOOD, BAD = 300_000 + 8, 6  # bad: the \xff line, two arrays, the deep line, the tombstone, the empty value


async def test_a_worker_dead_letters_only_the_bad_lines_of_hostile_records_and_keeps_running(
        kafka_broker: Broker, workers_env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    from aiokafka import AIOKafkaProducer

    name = f"hostile{os.getpid()}"
    cfg = write_config(tmp_path / "faust.yaml", engine="faust", bootstrap=kafka_broker.bootstrap,
                       out=tmp_path / "out", stages=[], name=name)
    await ensure_topics([kafka_broker.bootstrap], [f"{name}-ingest"], 4, 1, logging.getLogger("test"), "test")
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap, max_request_size=4 << 20)
    await producer.start()
    try:
        for key, value in HOSTILE:
            await producer.send_and_wait(f"{name}-ingest", value=value, key=key, partition=1)
    finally:
        await producer.stop()

    workers = Workers(cfg, tmp_path, workers_env)
    out = tmp_path / "out/events.jsonl"
    dead = tmp_path / "out/dead-letter.jsonl"
    try:
        proc = workers.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (count(out) < GOOD or count(dead) < BAD):
            assert proc.poll() is None, workers.procs[0][1].read_text()[-3000:]
            await asyncio.sleep(0.3)
        await asyncio.sleep(0.5)
        peak_kib = int(next(x for x in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                            if x.startswith("VmHWM")).split()[1])
    finally:
        codes = workers.stop_all()
    assert codes == [0]
    seqs = [ev["seq"] for line in out.read_bytes().splitlines() if "seq" in (ev := orjson.loads(line))]
    assert seqs == list(range(8)) and count(out) == GOOD
    reasons = [orjson.loads(line) for line in dead.read_bytes().splitlines()]
    assert len(reasons) == BAD, reasons
    assert all(r["origin"]["partition"] == 1 for r in reasons)
    assert [(r["origin"]["offset"], r["origin"].get("line")) for r in reasons] == [
        (3, 1), (4, 1), (4, 3), (5, 1), (6, None), (7, None)]
    print(f"worker peak RSS {peak_kib} KiB")
    assert peak_kib < 600 * 1024, f"worker peak RSS {peak_kib} KiB"
