"""A `kill -9` of a live capture session writing Parquet: the rows of the file not yet complete are lost with
it, so the restart's backfill must start before them. Real `pipeline run` processes against the emulator."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.emulator import Emulator
from tests.backfill_checks import key, produced, tracked
from tests.procs import pipeline_started
from tests.videodb_harness import API_KEY, FULL_ON_ACTIVE, scenario_file


@pytest.fixture
async def emu(tmp_path: Path) -> AsyncIterator[Emulator]:
    """200 transcripts 1 s of event time apart, 40 times real time (5 s), then 100 s (2.5 s) until the end."""
    cues = [{"at": float(i), "channel": "transcript", "rtstream": "mic:default", "text": f"t{i}"}
            for i in range(1, 201)]
    e = Emulator(scenario_file(tmp_path, cues, end=300.0), speed=40, api_key=API_KEY)
    await e.start()
    yield e
    await e.stop()


async def run(config: Path, cwd: Path) -> asyncio.subprocess.Process:
    return await pipeline_started(config, cwd, VIDEO_DB_API_KEY=API_KEY)


@pytest.mark.parametrize("extra", [{}, {"buffer": {"type": "disk"}, "complete_on_flush": False}],
                         ids=["memory-buffer", "disk-buffer-files-kept-open"])
async def test_kill_9_with_a_parquet_file_open_loses_no_event(emu: Emulator, tmp_path: Path,
                                                              extra: dict[str, Any]) -> None:
    """Before: the checkpoint was saved 2 s behind the source whatever the sinks held; the parquet file open
    since the session began (roll_interval 1h) died with the process, and the restart fetched only the 30 s
    of event time before the checkpoint: 34 of the 200 transcripts VideoDB produced were in no file. A disk
    buffer with `complete_on_flush: false` forgets rows once flushed, not completed: they count too."""
    cfg = {"name": "pq", "videodb": {"api_key": "${VIDEO_DB_API_KEY}", "base_url": emu.base_url},
           "source": {"type": "videodb", "backoff_initial": "50ms"},
           "controller": {"type": "capture_session", "end_user_id": "demo-user", "on_active": FULL_ON_ACTIVE,
                          "status_poll_interval": "300ms"},
           "sinks": [{"type": "parquet", "path": "pq", "roll_interval": "1h", **extra}], "dead_letter": "dead.jsonl"}
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump(cfg))
    first = await run(config, tmp_path)
    try:
        async with asyncio.timeout(30):  # a checkpoint 2 s (80 s of event time) behind is far past the start
            while sum(tracked(r["event"]) for r in emu.emitted) < 150:
                await asyncio.sleep(0.05)
    finally:
        first.send_signal(signal.SIGKILL)
        await first.wait()
    second = await run(config, tmp_path)
    async with asyncio.timeout(60):
        assert await second.wait() == 0, (tmp_path / "run.log").read_text()
    written = {key(json.loads(raw)) for f in (tmp_path / "pq").glob("*.parquet")
               for raw in pq.read_table(f).column("raw").to_pylist()}
    missing = [k for k in (key(e) for e in produced(emu) if tracked(e)) if k not in written]
    assert not missing, (len(missing), missing[:3])
