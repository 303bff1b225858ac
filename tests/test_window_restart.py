"""`window` state survives `kill -9`: a restarted `pipeline run` continues the open windows (state.db)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import yaml

from pipeline.emulator import Emulator
from tests.test_resume import emu as emu  # the shared fixture: the scenario at speed 8
from tests.test_resume import read, start

NAME = "window-restart"


def transcripts(events: list[dict[str, Any]]) -> set[tuple[Any, Any]]:
    return {(e["rtstream_id"], e["data"]["start"]) for e in events if e.get("channel") == "transcript"}


async def test_open_windows_continue_after_kill_9(emu: Emulator, tmp_path: Path) -> None:
    cfg = {
        "name": NAME,
        "videodb": {"api_key": "${VIDEO_DB_API_KEY}", "base_url": emu.base_url},
        "source": {"type": "videodb", "backoff_initial": "50ms"},
        "controller": {"type": "capture_session", "end_user_id": "u", "status_poll_interval": "300ms",
                       "on_active": {"transcript": True}},
        # one window per session for the whole run (1 h lateness: nothing closes before the end)
        "stages": [{"type": "window", "size": "1h", "allowed_lateness": "1h"}],
        "sinks": [{"type": "jsonl", "path": str(tmp_path / "events.jsonl"), "flush_interval": 0,
                   "channels": ["transcript", "capture_session"]},
                  {"type": "jsonl", "path": str(tmp_path / "metrics.jsonl"), "channels": ["metrics"]}],
        "dead_letter": str(tmp_path / "dead-letter.jsonl"),
    }
    config, log = tmp_path / "w.yaml", tmp_path / "run.log"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    first = await start(config, tmp_path, log)
    try:
        saved = tmp_path / "out" / NAME / "capture_session.json"
        async with asyncio.timeout(30):  # a backfill checkpoint is saved: a restart does not refetch everything
            while len(transcripts(read(tmp_path / "events.jsonl"))) < 8 or "backfill_from" not in (
                    saved.read_text() if saved.exists() else ""):
                await asyncio.sleep(0.05)
    finally:
        first.send_signal(signal.SIGKILL)
        await first.wait()
    before = transcripts(read(tmp_path / "events.jsonl"))
    assert not read(tmp_path / "metrics.jsonl")  # killed: nothing was flushed

    second = await start(config, tmp_path, log)
    async with asyncio.timeout(60):
        assert await second.wait() == 0, log.read_text()  # exit_on: exported, which flushes the windows
    lines = [e for e in read(tmp_path / "events.jsonl") if e.get("channel") == "transcript"]
    counted = sum(m["data"]["events"].get("transcript", 0) for m in read(tmp_path / "metrics.jsonl"))
    # Every transcript line written, by either run, passed a window whose state was saved before the sinks
    # got it, so the windows count at least as many. Without the saved state they would count only the
    # second run's (backfilled ones included), at least the first run's lines fewer.
    assert len(transcripts(lines)) > len(before) and counted >= len(lines), (counted, len(before), len(lines))
    assert counted <= len(lines) + 20  # events counted but killed before the sink got them: one batch or so
