"""`clear: true` and a restart after a crash: the restart resumes the same capture session, so it appends to
the session's output instead of emptying it. Real parts: `pipeline run` processes, the real videodb SDK and
the emulator, SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from pipeline.emulator import Emulator
from tests.backfill_checks import key, produced, tracked
from tests.videodb_harness import API_KEY, FULL_ON_ACTIVE

PIPELINE = Path(sys.executable).parent / "pipeline"

pytestmark = pytest.mark.timeout(60)


async def test_a_restart_that_resumes_the_session_does_not_clear_its_output(tmp_path: Path) -> None:
    emu = Emulator(speed=10, api_key=API_KEY)  # the 76 s scenario in ~8 s: time to kill and restart
    await emu.start()
    cfg = {
        "name": "clear",
        "videodb": {"api_key": "${VIDEO_DB_API_KEY}", "base_url": emu.base_url},
        "source": {"type": "videodb"},
        "controller": {"type": "capture_session", "end_user_id": "u", "on_active": FULL_ON_ACTIVE,
                       "status_poll_interval": "300ms"},
        "sinks": [{"type": "jsonl", "path": str(tmp_path / "events.jsonl"), "clear": True}],
        "dead_letter": str(tmp_path / "dead-letter.jsonl"),
        "state_dir": str(tmp_path / "state"),
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "VIDEO_DB_API_KEY": API_KEY}
    saved = tmp_path / "state" / "capture_session.json"
    out = tmp_path / "events.jsonl"
    log = tmp_path / "run.log"
    try:
        with log.open("ab") as fh:
            first = await asyncio.create_subprocess_exec(str(PIPELINE), "run", str(config), env=env, stdout=fh,
                                                         stderr=fh)
        try:
            async with asyncio.timeout(20):  # past a checkpoint (every 2 s), mid-session
                while not (saved.exists() and "backfill_from" in saved.read_text()):
                    await asyncio.sleep(0.05)
        finally:
            first.kill()
            await first.wait()
        first_run = out.read_text().splitlines()
        with log.open("ab") as fh:
            second = await asyncio.create_subprocess_exec(str(PIPELINE), "run", str(config), env=env, stdout=fh,
                                                          stderr=fh)
            code = await asyncio.wait_for(second.wait(), 30)
    finally:
        await emu.stop()
    text = log.read_text()
    assert code == 0, text
    assert "resuming capture session" in text
    lines = out.read_text().splitlines()
    # the restart emptied the file: the first run's lines were gone (its lifecycle events for good; a backfill
    # fetches only transcripts and index results again, and only from shortly before the crash)
    assert first_run and lines[:len(first_run)] == first_run, (len(first_run), len(lines))
    events = [json.loads(x) for x in lines]
    missing = Counter(map(key, filter(tracked, produced(emu)))) - Counter(map(key, filter(tracked, events)))
    assert not missing, sorted(missing.elements())[:3]
