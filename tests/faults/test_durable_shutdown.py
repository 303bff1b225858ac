"""Shutdown paths of a disk-buffered sink: what was spooled stays spooled unless the sink delivered it."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import orjson
import pytest

from pipeline.build import build
from pipeline.config import load_config
from pipeline.runtime.local import LocalRuntime
from tests.broker import free_port

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = [sys.executable, "-m", "pipeline.cli"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

pytestmark = pytest.mark.timeout(60)


def event(i: int) -> dict:
    return {"channel": "transcript", "id": i, "rtstream_id": "rts-1", "capture_session_id": "cap-1",
            "data": {"text": f"event {i}", "is_final": True, "start": 1710000000000 + i}}


def dead_ids(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [orjson.loads(x)["event"]["id"] for x in path.read_bytes().splitlines()]


async def test_session_exit_with_the_broker_down_leaves_the_disk_backlog_spooled(tmp_path: Path) -> None:
    """The capture session ends (exit_on) while the broker is away: the kafka sink used to start its own
    shutdown_timeout at once and, past it, dead-letter every batch the drain read back from the spool,
    emptying a disk buffer into the dead-letter file. Only the batch being written may be dead-lettered."""
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps(event(i)) + b"\n" for i in range(2000)))
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""
name: exiting
source: {{type: replay, path: {src}, batch_size: 100}}
runtime: {{drain_timeout: 2s}}
sinks:
  - type: kafka
    bootstrap_servers: 127.0.0.1:{free_port()}
    topic: t
    shutdown_timeout: 0.3s
    request_timeout: 0.5s
    retry_backoff: 0.05s
    max_retry_backoff: 0.1s
    buffer: {{type: disk}}
dead_letter: {tmp_path}/dead.jsonl
state_dir: {tmp_path}/state
""")
    rt = LocalRuntime(build(load_config(cfg)), install_signals=False)
    run = asyncio.create_task(rt.run())
    await asyncio.sleep(0.3)
    rt.b.session.request_exit(0, "capture session exported")  # what the capture_session controller does
    started = time.monotonic()
    await asyncio.wait_for(run, 20)
    assert time.monotonic() - started < 2 + 0.3 + 2 + 1  # still bounded: drain_timeout + shutdown_timeout
    dead = dead_ids(tmp_path / "dead.jsonl")
    assert dead == list(range(100)), f"{len(dead)} events dead-lettered: only the batch in flight may be"
    assert "left spooled 1900" in rt.summary()
