"""A WebSocket peer that floods and never answers our close, behind a stalled sink, at a stop: every event the
source accepted is written or dead-lettered, none is dropped with the source when drain_timeout ends."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.build import build
from pipeline.config import load_config
from pipeline.errors import StageError
from pipeline.runtime.local import LocalRuntime
from stages.sources.inlet import Inlet
from stages.sources.websocket import WebSocketSource

pytestmark = pytest.mark.timeout(30)

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


async def flood_server() -> tuple[asyncio.AbstractServer, int]:
    """A raw WebSocket server: handshake, a connection id, then numbered events without end; it never reads
    again, so our close is never answered (a peer that is gone, or stuck)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(ln.split(b":", 1)[1].strip() for ln in head.split(b"\r\n")
                   if ln.lower().startswith(b"sec-websocket-key"))
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")

        def frame(payload: bytes) -> bytes:
            n = len(payload)
            return (b"\x81" + (bytes([n]) if n < 126 else b"\x7e" + struct.pack(">H", n))) + payload

        writer.write(frame(b'{"connection_id": "c-1"}'))
        i = 0
        try:
            while True:
                writer.write(frame(orjson.dumps({"channel": "transcript", "id": i, "rtstream_id": "r",
                                                 "data": {"text": f"e{i}", "start": i}})))
                i += 1
                if i % 100 == 0:
                    await writer.drain()
        except (ConnectionError, OSError):
            pass

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_a_stop_that_outlasts_drain_timeout_dead_letters_what_the_source_held(tmp_path: Path) -> None:
    server, port = await flood_server()
    counts = tmp_path / "counts.txt"
    (tmp_path / "counts.txt.hold").touch()
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""
name: flood
source: {{type: websocket, url: "ws://127.0.0.1:{port}/", batch_max: 100}}
runtime: {{drain_timeout: 0.3s, queue_size: 2}}
sinks:
  - {{type: "tests.slow_sink:GatedSink", path: {counts}, delay: 0}}
dead_letter: {tmp_path}/dead.jsonl
""")
    rt = LocalRuntime(build(load_config(cfg)), install_signals=False)
    run = asyncio.create_task(rt.run())
    try:
        async with asyncio.timeout(10):
            while rt.b.source.context.stats.received < 200:
                await asyncio.sleep(0.01)
        await rt.stop()
        (tmp_path / "counts.txt.hold").unlink()
        code = await asyncio.wait_for(run, 10)
    finally:
        server.close()
    src = rt.b.source
    written = sum(int(x) for x in counts.read_text().split()) if counts.exists() else 0
    dead = [orjson.loads(x) for x in (tmp_path / "dead.jsonl").read_bytes().splitlines()]
    assert all("event" in d for d in dead)
    assert written + len(dead) == src._accepted, (written, len(dead), src._accepted, rt.summary())
    assert code == 1, (written, len(dead), src._accepted, rt.summary())  # something was dead-lettered at the stop


async def test_events_held_for_a_backfill_when_the_reader_gives_up_are_dead_lettered(
        make_context: Any, tmp_path: Path) -> None:
    """A re-bind holds back the new connection's events until its backfill is queued; that connection drops
    and reconnecting fails for good (max_retries). The held events were accepted, then vanished with the
    source: neither yielded nor dead-lettered."""
    import websockets

    connections = 0

    async def handler(ws: websockets.ServerConnection) -> None:
        nonlocal connections
        connections += 1
        if connections > 1:  # the next connection fails at once, and the source has no retries left
            await ws.close()
            return
        await ws.send(orjson.dumps({"connection_id": "c-1"}).decode())
        for i in range(50):
            await ws.send(orjson.dumps({"channel": "transcript", "id": i, "rtstream_id": "r",
                                        "data": {"text": f"e{i}", "start": i}}).decode())
        await ws.close()

    server = await websockets.serve(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ctx = make_context("source:websocket")
    src = WebSocketSource(WebSocketSource.Options.model_validate(
        {"url": f"ws://127.0.0.1:{port}/", "max_retries": 0, "backoff_initial": 0.01}), ctx)
    src._inlet = Inlet(src._ready.set, position=lambda: src._accepted)
    src._inlet.hold()  # a re-bind and its backfill are under way
    yielded: list[Any] = []

    async def consume() -> None:
        async for batch in src.batches():
            yielded.extend(batch)

    try:
        with pytest.raises(StageError, match="gave up"):
            await asyncio.wait_for(consume(), 10)
    finally:
        server.close()
    dead = [orjson.loads(x) for x in (tmp_path / "dead-letter.jsonl").read_bytes().splitlines()] \
        if (tmp_path / "dead-letter.jsonl").exists() else []
    assert src._accepted == 50
    assert len(yielded) + len(dead) == 50 and dead, (len(yielded), len(dead))
