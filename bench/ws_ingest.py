"""Benchmark 3: WebSocket ingest from the emulator into the jsonl sink, one connection and 50 sessions.

Ours: the `websocket` source -> `jsonl` sink, run by the local runtime, timed
from the first event received until the sink has written and closed. Baseline
from the same emulator: a bare `websockets` client that only parses each frame
(the most the emulator can deliver, so the ratio is our share of that ceiling).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson

from bench.common import Result, pipeline_config, workdir, write_config
from bench.emulated import emulator, scenario, start_session, ws_url

TARGET = 50_000
SESSIONS = 50
LIFECYCLE = 6  # created, starting, active, stopping, stopped, exported


class _Probe:
    """Counts events as the source stamps them; notes first/last receipt; stops the run after `exported`."""

    def __init__(self, source: Any, on_end: Any) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self._stamp = source._stamp
        self._on_end = on_end
        source._stamp = self

    def __call__(self, event: dict[str, Any]) -> dict[str, Any]:
        now = time.perf_counter()
        if not self.count:
            self.first = now
        self.count += 1
        self.last = now
        if event.get("event") == "capture_session.exported":
            self._on_end()
        return self._stamp(event)  # type: ignore[no-any-return]


async def _pipeline(http: Any, base: str, url: str, out: Path, name: str) -> tuple[_Probe, float]:
    """One websocket -> jsonl pipeline bound to its own capture session; (probe, finish time)."""
    from pipeline.build import build
    from pipeline.config import load_config
    from pipeline.runtime.local import LocalRuntime

    cfg = pipeline_config(name, {"type": "websocket", "url": url, "max_retries": 3},
                          [{"type": "jsonl", "path": str(out / f"{name}.jsonl"), "clear": True}], out,
                          processors=False)
    built = build(load_config(write_config(out / f"{name}.yaml", cfg)))
    rt = LocalRuntime(built, install_signals=False)
    loop = asyncio.get_running_loop()
    probe = _Probe(built.source, lambda: loop.create_task(rt.stop()))
    tasks: list[asyncio.Task[str]] = []

    async def bind(conn_id: str) -> None:
        tasks.append(loop.create_task(start_session(http, base, conn_id)))

    if http is not None:
        built.session.on_connection(bind)
    code = await rt.run()
    done = time.perf_counter()
    for t in tasks:
        t.result()  # setup errors surface here
    if code != 0:
        raise RuntimeError(f"{name}: pipeline exited {code}: {rt.error}")
    return probe, done


async def _bare(http: Any, base: str, url: str) -> tuple[int, float]:
    """The emulator's ceiling: read and parse frames, nothing else."""
    import websockets

    n = 0
    first = 0.0
    async with websockets.connect(url, max_size=None) as ws:
        conn_id = orjson.loads(await ws.recv())["connection_id"]
        setup = asyncio.create_task(start_session(http, base, conn_id))
        async for frame in ws:
            event = orjson.loads(frame)
            if not n:
                first = time.perf_counter()
            n += 1
            if event.get("event") == "capture_session.exported":
                break
    await setup
    return n, time.perf_counter() - first


async def _measure(n: int, sessions: int, out: Path) -> tuple[float, float]:
    """(ours events/s, bare-client events/s) for `sessions` concurrent sessions sharing n events."""
    import aiohttp

    per = max(1, n // sessions)
    path = scenario(out / f"scenario-{per}.jsonl", per, 0.0)
    async with aiohttp.ClientSession() as http:
        async with emulator(path, speed=0) as base:
            url = await ws_url(http, base)
            results = await asyncio.gather(*(_pipeline(http, base, url, out, f"ws-{i}") for i in range(sessions)))
        async with emulator(path, speed=0) as base:
            url = await ws_url(http, base)
            bare = await asyncio.gather(*(_bare(http, base, url) for _ in range(sessions)))
    total = sum(p.count for p, _ in results)
    expected = sessions * (per + LIFECYCLE)
    if total != expected:
        raise RuntimeError(f"received {total} events, expected {expected}")
    ours = total / (max(done for _, done in results) - min(p.first for p, _ in results))
    bare_rate = sum(c for c, _ in bare) / max(s for _, s in bare)
    return ours, bare_rate


# A WebSocket server that answers the upgrade by hand and then writes pre-encoded text frames straight to the
# socket: no per-frame work at all, so it shows how fast our side can ingest when the server is not the limit.
_FRAME_SERVER = r"""
import asyncio, base64, hashlib, sys
import orjson
from bench.emulated import scenario
from pathlib import Path

def frame(payload):
    n = len(payload)
    head = bytes([0x81, n]) if n < 126 else (bytes([0x81, 126]) + n.to_bytes(2, "big") if n < 65536
                                             else bytes([0x81, 127]) + n.to_bytes(8, "big"))
    return head + payload

cues = [orjson.loads(x) for x in Path(sys.argv[1]).read_bytes().splitlines()]
body = [frame(b'{"connection_id": "ws-blast"}')]
for i, c in enumerate(cues):
    data = {"text": c["text"], "start": 1772323200000 + i, "end": 1772323200000 + i}
    body.append(frame(orjson.dumps({"channel": c["channel"], "rtstream_id": "rts-1", "rtstream_name": c["rtstream"],
                                    "data": data})))
body.append(frame(b'{"event": "capture_session.exported", "capture_session_id": "cap-blast", "status": "exported"}'))
stream = b"".join(body)

async def serve(reader, writer):
    head = await reader.readuntil(b"\r\n\r\n")
    key = next(l.split(b":", 1)[1].strip() for l in head.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key"))
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    writer.write(stream)
    await writer.drain()
    try:  # then answer as a server does: a ping with its pong, the client's close with a close
        while True:
            b0, b1 = await reader.readexactly(2)
            n = b1 & 0x7F
            if n >= 126:
                n = int.from_bytes(await reader.readexactly(2 if n == 126 else 8), "big")
            mask = await reader.readexactly(4) if b1 & 0x80 else bytes(4)
            payload = bytes(c ^ mask[i % 4] for i, c in enumerate(await reader.readexactly(n)))
            if b0 & 0x0F == 0x9:
                writer.write(bytes([0x8A, len(payload)]) + payload)
            elif b0 & 0x0F == 0x8:
                writer.write(bytes([0x88, len(payload)]) + payload)
                await writer.drain()
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    print("PORT=%d" % server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def _ceiling(n: int, out: Path) -> float:
    """Our pipeline against the pre-encoded frame server (one connection)."""
    import os
    import sys

    from bench.common import ROOT

    path = scenario(out / f"scenario-{n}.jsonl", n, 0.0)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _FRAME_SERVER, str(path), cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE,
                                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode().strip()
        if not line.startswith("PORT="):
            raise RuntimeError(f"frame server did not start: {line!r}")
        url = f"ws://127.0.0.1:{line.removeprefix('PORT=')}/"
        probe, done = await _pipeline(None, "", url, out, "ws-ceiling")
    finally:
        proc.kill()
        await proc.wait()
    if probe.count != n + 1:
        raise RuntimeError(f"received {probe.count} events from the frame server, expected {n + 1}")
    return probe.count / (done - probe.first)


def run(n: int, repeats: int = 2) -> list[Result]:
    """One connection and the ceiling: best of `repeats` (the machine is shared); 50 sessions: one run."""
    out = workdir("ws")
    one = one_bare = ceiling = 0.0
    for _ in range(repeats):
        ours, bare = asyncio.run(_measure(n, 1, out))
        one, one_bare = max(one, ours), max(one_bare, bare)
        ceiling = max(ceiling, asyncio.run(_ceiling(n, out)))
    many, many_bare = asyncio.run(_measure(n, SESSIONS, out))
    r1 = Result("websocket ingest, 1 connection", one, baseline=one_bare, baseline_name="bare client",
                target=f"≥ {TARGET:,} ev/s", ok=one >= TARGET)
    r1.notes.append(f"{n:,} events, emulator in its own process at speed 0; best of {repeats}")
    r2 = Result(f"websocket ingest, {SESSIONS} sessions", many, baseline=many_bare, baseline_name="bare clients")
    r2.notes.append(f"{SESSIONS} pipelines (one connection and capture session each) in one process")
    r3 = Result("websocket ingest, 1 connection, server not the limit", ceiling, target=f"≥ {TARGET:,} ev/s",
                ok=ceiling >= TARGET)
    r3.notes.append("a server writing pre-encoded frames straight to the socket, in its own process")
    return [r1, r2, r3]
