"""Text logs carry what peers send (a WebSocket server's close reason and connection id): terminal escape
sequences in them are shown as text, never sent raw to the operator's terminal. A real `pipeline run`, a real
WebSocket server, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import orjson
import websockets

from tests.procs import communicate

ROOT = Path(__file__).resolve().parents[1]
EVIL = "\x1b]0;pwned\x07\x1b[2J\x1b[31m"  # retitle the terminal, clear it, turn it red


async def test_escape_sequences_a_peer_sends_are_logged_as_text(tmp_path: Path) -> None:
    connections = 0

    async def handler(ws: websockets.ServerConnection) -> None:
        nonlocal connections
        connections += 1
        await ws.send(orjson.dumps({"connection_id": f"conn-{connections}{EVIL}"}).decode())
        await ws.send(orjson.dumps({"channel": "transcript", "data": {"text": "hello"}}).decode())
        if connections == 1:
            await ws.close(4000, f"bye{EVIL}")
        else:
            await ws.wait_closed()

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        cfg = tmp_path / "p.yaml"
        cfg.write_text(f"""name: esc
source: {{type: websocket, url: "ws://127.0.0.1:{port}/"}}
sinks: [{{type: jsonl, path: {tmp_path}/out.jsonl, flush_interval: 0}}]
runtime: {{status_interval: 0}}
""")
        err = tmp_path / "stderr"
        with err.open("wb") as e:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pipeline.cli", "run", str(cfg), stdout=asyncio.subprocess.DEVNULL, stderr=e,
                env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            while "reconnected" not in err.read_text(errors="replace"):
                assert loop.time() < deadline and proc.returncode is None, err.read_text(errors="replace")
                await asyncio.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
        finally:
            await communicate(proc, 20)
    assert proc.returncode == 0
    text = err.read_bytes().decode()
    assert "connection dropped after 1 events" in text and "bye" in text, text
    assert "\x1b" not in text and "\x07" not in text, repr(text)
    assert "bye\\x1b]0;pwned\\x07\\x1b[2J" in text and "conn-2\\x1b]0;pwned" in text, text
