"""A WebSocket peer flooding large frames that are not JSON: each costs one bounded dead-letter line, as a bad
line of a replayed file or a bad Kafka record does. A real `pipeline run` process against a real server."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import orjson
import pytest
import websockets

from tests.procs import communicate

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

pytestmark = pytest.mark.timeout(40)

FRAMES = 40
FRAME_BYTES = 512 << 10  # under max_message_bytes (1 MiB): read, parsed, refused


async def test_large_garbage_frames_cost_bounded_dead_letter_lines(tmp_path: Path) -> None:
    """Before: every refused frame was copied whole into its dead-letter line, 512 KiB each (20 MiB for 40
    frames; a peer could fill the disk 250 times faster than with bad replay lines, which keep 4 KiB, and a
    full disk stops the run). Now the first 4 KiB are kept, and the good events around them are written."""
    sent = asyncio.Event()

    async def handler(ws: websockets.ServerConnection) -> None:
        await ws.send(orjson.dumps({"connection_id": "c-1"}).decode())
        for i in range(FRAMES):
            await ws.send("not json " + "x" * FRAME_BYTES)
            await ws.send(orjson.dumps({"channel": "transcript", "id": i, "data": {"text": "t", "start": i}}).decode())
        sent.set()
        await asyncio.Future()

    server = await websockets.serve(handler, "127.0.0.1", 0, max_size=None)
    port = server.sockets[0].getsockname()[1]
    (tmp_path / "p.yaml").write_text(f"""
name: garbage
source: {{type: websocket, url: "ws://127.0.0.1:{port}/"}}
sinks: [{{type: jsonl, path: {tmp_path}/out.jsonl, flush_interval: 0}}]
dead_letter: {tmp_path}/dead.jsonl
state_dir: {tmp_path}/state
""")
    out, dead = tmp_path / "out.jsonl", tmp_path / "dead.jsonl"
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "pipeline.cli", "run", "p.yaml",
                                                cwd=tmp_path, env=ENV, stderr=asyncio.subprocess.PIPE)
    try:
        await asyncio.wait_for(sent.wait(), 20)
        async with asyncio.timeout(20):
            while not out.exists() or out.read_bytes().count(b"\n") < FRAMES:
                await asyncio.sleep(0.02)
        proc.terminate()
        _, err = await communicate(proc, 20)
    finally:
        server.close()
    assert proc.returncode == 0, err.decode()
    lines = [orjson.loads(x) for x in dead.read_bytes().splitlines()]
    assert len(lines) == FRAMES and all(d["reason"].startswith("not JSON") for d in lines), lines[:1]
    assert all(d["raw"].startswith("not json xxx") and len(d["raw"]) == 4096 for d in lines)
    assert dead.stat().st_size < FRAMES * 8192, dead.stat().st_size
