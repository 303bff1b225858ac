"""A peer that sends one enormous WebSocket message must not make the pipeline's memory follow it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import websockets

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = [sys.executable, "-m", "pipeline.cli"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

pytestmark = pytest.mark.timeout(60)
HUGE = 300  # MiB in the one message (sent in 1 MiB fragments, so this test's server never holds it whole)


def event(i: int) -> bytes:
    return orjson.dumps({"channel": "transcript", "id": i, "rtstream_id": "rts-1",
                         "data": {"text": f"event {i}", "is_final": True, "start": 1710000000000 + i}})


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc")
async def test_one_huge_message_is_refused_without_being_held_in_memory(tmp_path: Path) -> None:
    """Before: the source read messages of any size (to dead-letter those over max_message_bytes), so one
    300 MiB message took the pipeline to 640 MiB RSS. Now a message over 4 x max_message_bytes makes the
    connection close (1009) as soon as that is known; the source dead-letters one line and reconnects."""
    conns = 0

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"pad": "'
        for _ in range(HUGE):
            yield b"x" * (1 << 20)
        yield b'"}'

    async def handler(ws: websockets.ServerConnection) -> None:
        nonlocal conns
        conns += 1
        await ws.send(orjson.dumps({"connection_id": f"conn-{conns}"}).decode())
        await ws.send(event(conns).decode())
        if conns == 1:
            try:
                await ws.send(chunks())
            except websockets.ConnectionClosed:
                return
        await asyncio.Future()

    server = await websockets.serve(handler, "127.0.0.1", 0, max_size=None)
    port = server.sockets[0].getsockname()[1]
    out = tmp_path / "out.jsonl"
    (tmp_path / "p.yaml").write_text(f"""
name: huge
source: {{type: websocket, url: "ws://127.0.0.1:{port}/", backoff_initial: 0.05s}}
sinks:
  - {{type: jsonl, path: {out}, flush_interval: 0}}
dead_letter: {tmp_path}/dead.jsonl
""")
    proc = await asyncio.create_subprocess_exec(*PIPELINE, "run", str(tmp_path / "p.yaml"), cwd=tmp_path, env=ENV,
                                                stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (out.exists() and out.read_bytes().count(b"\n") >= 2):
            await asyncio.sleep(0.05)
        peak = peak_rss_mib(proc.pid)
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
        server.close()
    assert peak < HUGE / 2, f"peak RSS {peak:.0f} MiB while a {HUGE} MiB message arrived"
    assert proc.returncode == 0, err.decode()
    assert [orjson.loads(x)["id"] for x in out.read_bytes().splitlines()] == [1, 2]
    dead = [orjson.loads(x) for x in (tmp_path / "dead.jsonl").read_bytes().splitlines()]
    assert len(dead) == 1 and "larger than 4194304 bytes" in dead[0]["reason"], dead
