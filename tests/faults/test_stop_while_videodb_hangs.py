"""SIGTERM while VideoDB does not answer a call: the stop stays within its bound.

Real parts: a `pipeline run` process with the real videodb SDK and the emulator on loopback, one of whose
endpoints stops answering (a backfill page after a reconnect, the WebSocket URL request at start).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from pipeline.emulator import Emulator
from tests.videodb_harness import API_KEY, FULL_ON_ACTIVE

PIPELINE = Path(sys.executable).parent / "pipeline"

pytestmark = pytest.mark.timeout(60)


def hang(emu: Emulator, method: str, suffix: str) -> tuple[asyncio.Event, list[float]]:
    """Make `method` requests whose path ends with `suffix` hang until the returned event is set."""
    release = asyncio.Event()
    hung: list[float] = []
    inner = emu._middleware

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == method and request.path.endswith(suffix):
            hung.append(time.monotonic())
            await release.wait()
        return await inner(request, handler)

    emu._middleware = middleware  # type: ignore[method-assign]
    return release, hung


async def sigterm_once_hung(tmp_path: Path, emu: Emulator, hung: list[float], release: asyncio.Event,
                            drain_timeout: str) -> tuple[float, int, str]:
    """Run the pipeline, SIGTERM it once a call hangs; (seconds from SIGTERM to exit, exit code, output)."""
    await emu.start()
    cfg = {
        "name": "hang",
        "videodb": {"api_key": "${VIDEO_DB_API_KEY}", "base_url": emu.base_url},
        "source": {"type": "videodb"},
        "controller": {"type": "capture_session", "end_user_id": "u", "on_active": FULL_ON_ACTIVE},
        "runtime": {"drain_timeout": drain_timeout},
        "sinks": [{"type": "jsonl", "path": str(tmp_path / "events.jsonl")}],
        "dead_letter": str(tmp_path / "dead-letter.jsonl"),
        "state_dir": str(tmp_path / "state"),
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "VIDEO_DB_API_KEY": API_KEY}
    log = tmp_path / "run.log"
    with log.open("wb") as fh:
        proc = await asyncio.create_subprocess_exec(str(PIPELINE), "run", str(config), cwd=tmp_path, env=env,
                                                    stdout=fh, stderr=fh)
    try:
        async with asyncio.timeout(20):
            while not hung:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            raise AssertionError("pipeline run still going 15 s after SIGTERM\n" + log.read_text()[-3000:]) from None
        took = time.monotonic() - t0
    finally:
        release.set()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await emu.stop()
    assert proc.returncode is not None
    return took, proc.returncode, log.read_text()


async def test_sigterm_while_a_backfill_call_hangs_ends_within_the_bound(tmp_path: Path) -> None:
    """The source reconnected (the emulator drops it every 6 events) and the backfill's first page gets no
    answer. It took longer than the SDK's 30 s timeout: the stuck call's worker thread was joined when the
    loop closed and again at interpreter exit."""
    emu = Emulator(speed=4, drop_after=6, api_key=API_KEY)
    release, hung = hang(emu, "GET", "/transcription")
    took, code, text = await sigterm_once_hung(tmp_path, emu, hung, release, "1s")
    assert took < 5, f"SIGTERM took {took:.1f}s\n{text}"  # drain_timeout 1 s; the jsonl sink closes at once
    assert code == 0, text
    assert "summary:" in text


async def test_sigterm_while_the_first_websocket_request_hangs_ends_at_once(tmp_path: Path) -> None:
    """VideoDB does not answer the WebSocket URL request at start: the source waited for it (30 s, retried)
    whatever drain_timeout said. Now the stop cancels it: nothing was read, nothing is lost."""
    emu = Emulator(speed=4, api_key=API_KEY)
    release, hung = hang(emu, "GET", "/websocket")
    took, code, text = await sigterm_once_hung(tmp_path, emu, hung, release, "10s")
    assert took < 3, f"SIGTERM took {took:.1f}s\n{text}"
    assert code == 0, text
    assert "read         0" in text

