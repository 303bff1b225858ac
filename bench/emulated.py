"""Drive the VideoDB emulator for the WebSocket benchmarks: scenario file, server process, session setup.

The emulator runs in its own process (`python -m pipeline.emulator.cli`) so it
does not share a core's time with the pipeline being measured. Sessions are set
up over its HTTP API exactly as the SDK would (create the capture session with
the connection id, wait for `active`, start transcripts and indexes).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

from bench.common import ROOT
from bench.gen import events
from pipeline.files import open_private

HEADERS = {"x-access-token": "bench-key", "content-type": "application/json"}


def scenario(path: Path, n: int, spacing: float, *, tag: bool = False) -> Path:
    """A JSONL scenario of `n` transcript/visual/audio events from the generator, `spacing` s apart.

    `tag=True` appends ` #<i>` to every text so each event can be recognised (latency probes).
    """
    with open_private(path, truncate=True) as fh:
        i = 0
        for ev in events(n * 2):
            ch = ev.get("channel")
            if ch not in ("transcript", "visual_index", "scene_index", "audio_index"):
                continue
            text = ev["data"]["text"] + (f" #{i}" if tag else "")
            cue: dict[str, Any] = {"at": round(i * spacing, 6), "channel": ch, "rtstream": ev["rtstream_name"],
                                   "text": text, "span": 0}
            if ch == "transcript":
                cue["is_final"] = ev["data"].get("is_final", True)
            fh.write(orjson.dumps(cue, option=orjson.OPT_APPEND_NEWLINE))
            i += 1
            if i >= n:
                break
    return path


@contextlib.asynccontextmanager
async def emulator(scenario_path: Path, speed: float) -> AsyncIterator[str]:
    """Run the emulator CLI in a child process; yields its base URL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline.emulator.cli", "--scenario", str(scenario_path), "--speed", str(speed),
        "--port", "0", cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        if not line.startswith("EMULATOR_URL="):
            raise RuntimeError(f"emulator did not start: {line!r}")
        yield line.split("=", 1)[1]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def ws_url(http: Any, base: str) -> str:
    async with http.get(f"{base}/collection/default/websocket", headers=HEADERS) as r:
        return str((await r.json())["data"]["websocket_url"])


async def start_session(http: Any, base: str, conn_id: str) -> str:
    """Create a capture session bound to `conn_id`, wait for active, start every AI pipeline on it."""
    async with http.post(f"{base}/collection/default/capture/session", headers=HEADERS,
                         json={"end_user_id": "bench", "ws_connection_id": conn_id}) as r:
        sid = str((await r.json())["data"]["session_id"])
    for _ in range(400):
        async with http.get(f"{base}/collection/default/capture/session/{sid}", headers=HEADERS) as r:
            data = (await r.json())["data"]
        if data["status"] == "active" and data["rtstreams"]:
            break
        await asyncio.sleep(0.05)
    else:
        raise RuntimeError(f"emulated session {sid} never became active")
    for rts in data["rtstreams"]:
        rid = rts["rtstream_id"]
        if "video" in rts["media_types"]:
            body = {"extraction_type": "time", "prompt": "Describe the screen", "ws_connection_id": conn_id}
            async with http.post(f"{base}/rtstream/{rid}/index/scene", headers=HEADERS, json=body) as r:
                r.raise_for_status()
            continue
        async with http.post(f"{base}/rtstream/{rid}/transcription", headers=HEADERS,
                             json={"action": "start", "ws_connection_id": conn_id}) as r:
            r.raise_for_status()
        body = {"extraction_type": "transcript", "prompt": "Summarize", "ws_connection_id": conn_id}
        async with http.post(f"{base}/rtstream/{rid}/index/scene", headers=HEADERS, json=body) as r:
            r.raise_for_status()
    return sid
