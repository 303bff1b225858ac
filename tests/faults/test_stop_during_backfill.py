"""SIGTERM while VideoDB hangs on a call (a backfill page): the stop stays within its bound.

Real parts: a `pipeline run` process with the real videodb SDK, the emulator on loopback whose
transcript endpoint stops answering once the source has reconnected (a backfill is then under way).
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


def hang_transcripts(emu: Emulator) -> tuple[asyncio.Event, list[float]]:
    """Make GET .../transcription (a backfill page) hang until the returned event is set."""
    release = asyncio.Event()
    hung: list[float] = []
    inner = emu._middleware

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "GET" and request.path.endswith("/transcription"):
            hung.append(time.monotonic())
            await release.wait()
        return await inner(request, handler)

    emu._middleware = middleware  # type: ignore[method-assign]
    return release, hung


async def test_sigterm_while_a_backfill_call_hangs_ends_within_the_bound(tmp_path: Path) -> None:
    emu = Emulator(speed=4, drop_after=6, api_key=API_KEY)
    release, hung = hang_transcripts(emu)
    await emu.start()
    cfg = {
        "name": "hang",
        "videodb": {"api_key": "${VIDEO_DB_API_KEY}", "base_url": emu.base_url},
        "source": {"type": "videodb"},
        "controller": {"type": "capture_session", "end_user_id": "u", "on_active": FULL_ON_ACTIVE},
        "runtime": {"drain_timeout": "1s"},
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
            while not hung:  # the source reconnected and the backfill's first page is waiting for an answer
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            raise AssertionError("pipeline run still going 15 s after SIGTERM\n" + log.read_text()[-3000:]) from None
        took = time.monotonic() - t0
    finally:
        release.set()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await emu.stop()
    text = log.read_text()
    # drain_timeout 1 s; the jsonl sink closes at once. It took the SDK's timeout (30 s) and retry, or more:
    # the stuck call's worker thread was joined when the loop closed and again at interpreter exit.
    assert took < 5, f"SIGTERM took {took:.1f}s\n{text}"
    assert proc.returncode == 0, text
    assert "summary:" in text
