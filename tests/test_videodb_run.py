"""`pipeline run` with the videodb source and capture_session controller, end to end against the emulator."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.emulator import Emulator
from tests.backfill_checks import key, produced, tracked
from tests.videodb_harness import API_KEY, FULL_ON_ACTIVE

PIPELINE = Path(sys.executable).parent / "pipeline"


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    e = Emulator(speed=0, api_key=API_KEY, drop_after=25, garbage_every=9)
    await e.start()
    yield e
    await e.stop()


def write_config(tmp_path: Path, emu: Emulator) -> Path:
    cfg = {
        "name": "meeting-e2e",
        "videodb": {"api_key": "${VIDEO_DB_API_KEY}", "base_url": emu.base_url},
        "source": {"type": "videodb", "backoff_initial": "50ms"},
        "controller": {"type": "capture_session", "end_user_id": "demo-user", "metadata": {"app": "e2e"},
                       "state_dir": str(tmp_path / "state"), "on_active": FULL_ON_ACTIVE},
        "sinks": [{"type": "jsonl", "path": str(tmp_path / "events.jsonl")}],
        "dead_letter": str(tmp_path / "dead-letter.jsonl"),
    }
    path = tmp_path / "meeting.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


async def run(config: Path, key: str, cwd: Path) -> tuple[int, str]:
    env = {**os.environ, "VIDEO_DB_API_KEY": key}
    proc = await asyncio.create_subprocess_exec(str(PIPELINE), "run", str(config), cwd=cwd, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, (out + err).decode()


async def test_pipeline_run_follows_the_session_through_drops_to_export(emu: Emulator, tmp_path: Path) -> None:
    code, output = await run(write_config(tmp_path, emu), API_KEY, tmp_path)

    assert code == 0, output
    assert "ended: capture session exported" in output
    assert "Traceback" not in output and "unexpected transition" not in output
    assert API_KEY not in output
    events: list[dict[str, Any]] = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    # VideoDB does not resend what a dropped connection missed: those events come back by backfill
    assert Counter(map(key, filter(tracked, events))) == Counter(map(key, filter(tracked, produced(emu))))
    assert any(e.get("backfill") for e in events) and emu.hub.undelivered > 0
    assert "backfilled: " in output and "reconnects: " in output
    assert emu.hub.drops >= 1
    dead = (tmp_path / "dead-letter.jsonl").read_text().splitlines()
    assert len(dead) == emu.hub.garbage_sent > 0
    saved = json.loads((tmp_path / "state" / "capture_session.json").read_text())
    assert saved["status"] == "exported" and saved["session_id"].startswith("cap-")


async def test_pipeline_run_with_a_wrong_key_is_one_clear_line(emu: Emulator, tmp_path: Path) -> None:
    wrong = "k-wrong-key-424242"
    code, output = await run(write_config(tmp_path, emu), wrong, tmp_path)

    assert code == 1
    errors = [line for line in output.splitlines() if line.startswith("pipeline: ")]
    assert len(errors) == 1
    assert "connect_websocket failed: authentication failed" in errors[0]
    assert wrong not in output and "Traceback" not in output
