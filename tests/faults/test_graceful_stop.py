"""SIGTERM while a stalled sink holds the WebSocket source back: every frame the server sent before it saw
our close is read and written, none is thrown away with the socket. Real process, real signal."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import websockets

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = [sys.executable, "-m", "pipeline.cli"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TOTAL = 10_000

pytestmark = pytest.mark.timeout(60)


async def _stalled_run(tmp_path: Path, port: int, name: str, source_extra: str = "",
                       runtime: str = "") -> tuple[asyncio.subprocess.Process, Path, Path]:
    """`pipeline run` from a WebSocket on `port` into a sink that stalls from its first batch until the
    returned hold file is removed; (process, counts file, hold file)."""
    counts = tmp_path / "counts.txt"
    hold = Path(f"{counts}.hold")
    hold.touch()
    (tmp_path / "p.yaml").write_text(f"""
name: {name}
source: {{type: websocket, url: "ws://127.0.0.1:{port}/", batch_max: 100{source_extra}}}
{runtime}sinks:
  - {{type: "tests.slow_sink:GatedSink", path: {counts}, delay: 0}}
dead_letter: {tmp_path}/dead.jsonl
""")
    proc = await asyncio.create_subprocess_exec(*PIPELINE, "run", str(tmp_path / "p.yaml"), cwd=tmp_path, env=ENV,
                                                stderr=subprocess.PIPE)
    return proc, counts, hold


async def _until_sent(sent: Callable[[], int]) -> None:
    for _ in range(300):
        if sent() == TOTAL:
            return
        await asyncio.sleep(0.05)


async def test_sigterm_behind_a_stalled_sink_reads_what_the_server_already_sent(tmp_path: Path) -> None:
    """At SIGTERM the source closed the socket and gave the close handshake 1 s. Behind a stalled sink
    the server's answer sat behind thousands of frames already in our socket buffers: the socket was
    aborted and those frames were gone, counted nowhere (about 9,000 of the 10,000 here: 870 were written;
    34,000 of 47,000 events behind a merely slow sink). Now the source reads until the server answers its close (at most
    drain_timeout), and the sinks get every frame."""
    sent = 0
    closed = asyncio.Event()

    async def handler(ws: websockets.ServerConnection) -> None:
        nonlocal sent
        await ws.send(orjson.dumps({"connection_id": "conn-1"}).decode())
        try:
            while sent < TOTAL:
                await ws.send(orjson.dumps({"channel": "transcript", "id": sent, "rtstream_id": "rts-1",
                                            "data": {"text": f"event {sent}", "start": sent}}).decode())
                sent += 1
            await ws.wait_closed()
        finally:
            closed.set()

    server = await websockets.serve(handler, "127.0.0.1", 0, max_size=None)
    port = server.sockets[0].getsockname()[1]
    proc, counts, hold = await _stalled_run(tmp_path, port, "graceful", runtime="runtime: {drain_timeout: 20s}\n")
    try:
        await _until_sent(lambda: sent)
        assert sent == TOTAL, f"the server could send only {sent} events before SIGTERM"
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.5)  # longer than the old close handshake timeout
        hold.unlink()
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
        server.close()
    await asyncio.wait_for(closed.wait(), 5)
    assert proc.returncode == 0, err.decode()
    written = sum(int(x) for x in counts.read_text().split())
    read = int(next(ln for ln in err.decode().splitlines() if "source:websocket" in ln).split()[2])
    assert written == read == TOTAL, f"server sent {TOTAL}, pipeline read {read}, wrote {written}"


async def test_a_stalled_sink_does_not_make_our_keepalive_drop_the_connection(tmp_path: Path) -> None:
    """While the pipeline is held back the source stops reading, so the server's answers to our keepalive
    pings wait behind the frames in our socket buffers: after `keepalive` x 2 (40 s by default) the library
    declared the server gone (1011) and dropped the connection, and every frame in our buffers with it
    (19,528 of 20,000 behind a sink stalled 50 s). Now the ping timeout is off while the source waits."""
    sent = 0
    conns = 0

    async def handler(ws: websockets.ServerConnection) -> None:
        nonlocal sent, conns
        conns += 1
        await ws.send(orjson.dumps({"connection_id": f"conn-{conns}"}).decode())
        while conns == 1 and sent < TOTAL:
            await ws.send(orjson.dumps({"channel": "transcript", "id": sent, "rtstream_id": "rts-1",
                                        "data": {"text": f"event {sent}", "start": sent}}).decode())
            sent += 1
        await ws.wait_closed()

    server = await websockets.serve(handler, "127.0.0.1", 0, max_size=None)
    port = server.sockets[0].getsockname()[1]
    proc, counts, hold = await _stalled_run(tmp_path, port, "stalled",
                                            source_extra=", keepalive: 0.3s, backoff_initial: 0.1s")
    try:
        await _until_sent(lambda: sent)
        await asyncio.sleep(2.0)  # stalled for keepalive x 6
        hold.unlink()
        for _ in range(200):
            if counts.exists() and sum(int(x) for x in counts.read_text().split()) >= TOTAL:
                break
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
        server.close()
    assert proc.returncode == 0, err.decode()
    assert conns == 1, err.decode()
    assert sum(int(x) for x in counts.read_text().split()) == TOTAL
