"""A capture session that ends while its pipeline is down (`kill -9`, restarted only after the end): the restart
fetches what it produced after the saved checkpoint before it creates a new session. Real `pipeline run`
processes against the emulator."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from pipeline.emulator import Emulator
from tests.backfill_checks import key, tracked
from tests.procs import pipeline_started
from tests.videodb_harness import API_KEY, FULL_ON_ACTIVE, scenario_file


@pytest.fixture
async def emu(tmp_path: Path) -> AsyncIterator[Emulator]:
    """60 transcripts 1 s of event time apart at 40 times real time (1.5 s), the end 10 s later."""
    cues = [{"at": float(i), "channel": "transcript", "rtstream": "mic:default", "text": f"t{i}"}
            for i in range(1, 61)]
    e = Emulator(scenario_file(tmp_path, cues, end=70.0), speed=40, api_key=API_KEY)
    await e.start()
    yield e
    await e.stop()


async def run(config: Path, cwd: Path) -> asyncio.subprocess.Process:
    return await pipeline_started(config, cwd, VIDEO_DB_API_KEY=API_KEY)


async def test_a_session_that_ended_while_no_run_was_up_is_fetched_by_the_restart(emu: Emulator,
                                                                                    tmp_path: Path) -> None:
    """Before: the restart saw the saved session exported, created a new one and fetched nothing: the first
    session's transcripts after the kill (and those not yet flushed) were in no file: 44 of 60."""
    cfg = {"name": "ended", "videodb": {"api_key": "${VIDEO_DB_API_KEY}", "base_url": emu.base_url},
           "source": {"type": "videodb", "backoff_initial": "50ms"},
           "controller": {"type": "capture_session", "end_user_id": "demo-user", "on_active": FULL_ON_ACTIVE,
                          "status_poll_interval": "300ms"},
           "sinks": [{"type": "jsonl", "path": "events.jsonl"}], "dead_letter": "dead.jsonl"}
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump(cfg))
    first = await run(config, tmp_path)
    try:
        async with asyncio.timeout(30):
            while sum(tracked(r["event"]) for r in emu.emitted) < 30:
                await asyncio.sleep(0.02)
    finally:
        first.send_signal(signal.SIGKILL)
        await first.wait()
    [session] = emu.registry.sessions.values()
    async with asyncio.timeout(30):  # the meeting ends while no run is up
        while session.status not in ("stopped", "exported"):
            await asyncio.sleep(0.05)
    wanted = {key(r["event"]) for r in emu.emitted if tracked(r["event"])}
    second = await run(config, tmp_path)
    async with asyncio.timeout(60):
        assert await second.wait() == 0, (tmp_path / "run.log").read_text()
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    written = {key(e) for e in (json.loads(x) for x in lines if x.endswith("}")) if tracked(e)}
    missing = sorted(wanted - written, key=str)
    assert len(wanted) == 60 and not missing, (len(missing), missing[:3])
