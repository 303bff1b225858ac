"""A faust worker that could not keep every reject exits 1 on SIGTERM, saying why, as `pipeline run` does.

Real broker, real `pipeline worker` subprocess, real SIGTERM: rejects a full dead-letter file left out
(`dead_letter_max_bytes`), and events LOST because the dead-letter file could not be written at all.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest
import yaml

from tests.broker import Broker, kafka_broker  # noqa: F401
from tests.faults.test_faust_attacks import ROOT, gated_config, produce
from tests.test_faust_runtime import Workers

pytestmark = pytest.mark.timeout(60)
JUNK = 300  # ~4.2 KiB dead-letter lines: about 250 fit in 1 MiB


async def produce_raw(broker: Broker, topic: str, key: bytes, values: list[bytes]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=4 << 20)
    await producer.start()
    try:
        for value in values:
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


async def sigterm_when(worker: subprocess.Popen[bytes], workers: Workers, done: object) -> tuple[int, str]:
    """Wait until `done()` (the worker still running), SIGTERM it; its exit code and log."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not done():  # type: ignore[operator]
        assert worker.poll() is None, workers.procs[-1][1].read_text()[-3000:]
        await asyncio.sleep(0.1)
    assert done(), workers.procs[-1][1].read_text()[-3000:]  # type: ignore[operator]
    worker.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.to_thread(worker.wait, 20)
    finally:
        workers.stop_all()
    return code, workers.procs[-1][1].read_text()


def lines_in(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


async def test_a_worker_whose_dead_letter_file_filled_exits_1_on_sigterm_saying_why(
        kafka_broker: Broker, tmp_path: Path) -> None:  # noqa: F811
    """Before: the worker logged "N reject(s) not dead-lettered" and exited 0 on SIGTERM, so a supervisor saw a
    clean stop although rejects that should have been kept were not."""
    name = f"dlfull{os.getpid()}"
    lines = tmp_path / "out/lines.jsonl"
    cfg = gated_config(tmp_path, kafka_broker, name, lines)
    cfg.write_text(cfg.read_text() + "dead_letter_max_bytes: 1MiB\n")
    await produce(kafka_broker, name, [])  # the ingest topic, 4 partitions
    junk = [b"junk %04d " % i + b"x" * 4000 for i in range(JUNK)]
    good = orjson.dumps({"channel": "visual_index", "capture_session_id": "cap-j", "rtstream_id": "rts-j",
                         "data": {"text": "code", "start": 1000}})
    await produce_raw(kafka_broker, f"{name}-ingest", b"cap-j", [*junk, good])  # one partition: junk first
    workers = Workers(cfg, tmp_path, {**os.environ, "PYTHONPATH": str(ROOT), "PIPELINE_LOG_LEVEL": "info"})
    code, log = await sigterm_when(workers.start(), workers, lambda: lines_in(lines) == 2)  # the event, its alert
    dead = tmp_path / "out/dead-letter.jsonl"
    kept = lines_in(dead)
    assert dead.stat().st_size <= 1 << 20 and 200 < kept < JUNK, kept
    why = f"{dead} reached dead_letter_max_bytes (1 MiB)"
    assert code == 1, log[-3000:]
    assert f"NOT DEAD-LETTERED {JUNK - kept} reject(s): {why}; rotate or remove it to make room" in log
    assert "Traceback" not in log, log[-3000:]
    assert log.strip().splitlines()[-1] == f"pipeline: worker: {JUNK - kept} reject(s) not dead-lettered: {why}"


async def test_a_worker_that_lost_events_at_stop_exits_1_saying_why(
        kafka_broker: Broker, tmp_path: Path) -> None:  # noqa: F811
    """The windows still open at SIGTERM go to a sink that fails, and the dead-letter file's directory is gone
    (a file in its place): the metrics are LOST. Before: logged as a warning, exit 0."""
    name = f"dllost{os.getpid()}"
    out = tmp_path / "out"
    lines = out / "lines.txt"
    cfg = gated_config(tmp_path, kafka_broker, name, out / "unused.jsonl")
    doc = yaml.safe_load(cfg.read_text())
    (out / "dl").mkdir()
    doc["stages"] = [{"type": "window", "size": "1h"}]
    doc["sinks"] = [{"type": "tests.slow_sink:DeadLetterGoneSink", "path": str(lines), "delay": 0},
                    {"type": "tests.slow_sink:FailingSink", "channels": ["metrics"]}]
    doc["dead_letter"] = str(out / "dl/dead.jsonl")
    cfg.write_text(yaml.safe_dump(doc))
    await produce(kafka_broker, name, [{"channel": "transcript", "capture_session_id": "cap-l", "rtstream_id": "r",
                                        "data": {"text": "hello", "start": 1000, "end": 2000}}])
    workers = Workers(cfg, tmp_path, {**os.environ, "PYTHONPATH": str(ROOT), "PIPELINE_LOG_LEVEL": "info"})
    code, log = await sigterm_when(workers.start(), workers, lambda: lines_in(lines) == 1)
    assert code == 1, log[-3000:]
    why = f"{out / 'dl/dead.jsonl'}: cannot write the dead-letter file"
    assert f"LOST 1 event(s) that could not be dead-lettered ({why}" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    last = log.strip().splitlines()[-1]
    assert last.startswith(f"pipeline: worker: {why}") and last.endswith("; 1 event(s) lost"), last
