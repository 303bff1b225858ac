"""Resume after a crash: `kill -9` a real `pipeline run` mid-session, restart it with the same config."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.api import Context
from pipeline.emulator import Emulator
from tests.videodb_harness import API_KEY, FULL_ON_ACTIVE, make_stages

PIPELINE = Path(sys.executable).parent / "pipeline"
NAME = "resume-e2e"
RULE = {"name": "user-on-screen", "channels": ["visual_index"], "keywords": ["user"], "cooldown": "1h"}


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    e = Emulator(speed=8, api_key=API_KEY)  # the 76 s scenario plays in ~10 s: time to kill and restart
    await e.start()
    yield e
    await e.stop()


def write_config(tmp_path: Path, emu: Emulator) -> Path:
    """No state_dir key: state goes to out/<name> under the working directory (the default)."""
    cfg = {
        "name": NAME,
        "videodb": {"api_key": "${VIDEO_DB_API_KEY}", "base_url": emu.base_url},
        "source": {"type": "videodb", "backoff_initial": "50ms"},
        "controller": {"type": "capture_session", "end_user_id": "demo-user", "on_active": FULL_ON_ACTIVE,
                       "status_poll_interval": "300ms"},
        "stages": [{"type": "enrich"}, {"type": "rules", "rules": [RULE]}],
        "sinks": [{"type": "jsonl", "path": str(tmp_path / "events.jsonl")},
                  {"type": "jsonl", "path": str(tmp_path / "alerts.jsonl"), "channels": ["alert"]}],
        "dead_letter": str(tmp_path / "dead-letter.jsonl"),
    }
    path = tmp_path / "meeting.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


async def start(config: Path, cwd: Path, log: Path, *extra: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "VIDEO_DB_API_KEY": API_KEY}
    with log.open("ab") as err:
        return await asyncio.create_subprocess_exec(str(PIPELINE), "run", str(config), *extra, cwd=cwd, env=env,
                                                    stdout=err, stderr=err)


def read(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]


def creates(emu: Emulator) -> list[dict[str, Any]]:
    return [c for c in emu.calls if c["method"] == "POST" and c["path"] == "/collection/default/capture/session"]


def transcript_binds(emu: Emulator) -> list[str]:
    return [c["body"]["ws_connection_id"] for c in emu.calls
            if c["method"] == "POST" and c["path"].endswith("/transcription") and c["body"]]


async def test_kill_9_then_restart_resumes_the_same_session(emu: Emulator, tmp_path: Path) -> None:
    config, log = write_config(tmp_path, emu), tmp_path / "run.log"
    first = await start(config, tmp_path, log)
    try:
        async with asyncio.timeout(30):  # mid-session: the rule fired once, some events are in
            while not (read(tmp_path / "alerts.jsonl") and len(read(tmp_path / "events.jsonl")) >= 12):
                await asyncio.sleep(0.05)
    finally:
        first.send_signal(signal.SIGKILL)
        await first.wait()
    before = len(read(tmp_path / "events.jsonl"))
    binds_before = len(transcript_binds(emu))
    crashed = json.loads((tmp_path / "out" / NAME / "capture_session.json").read_text())
    assert len(crashed["indexes"]) == 3  # visual on the screen, audio on mic and system audio
    [session] = [s for s in emu.registry.sessions.values()]
    assert session.status == "active", log.read_text()

    second = await start(config, tmp_path, log)
    async with asyncio.timeout(60):
        assert await second.wait() == 0, log.read_text()
    output = log.read_text()
    assert "ended: capture session exported" in output and "Traceback" not in output

    # One capture session; the restart re-bound its AI pipelines to the new connection.
    assert len(creates(emu)) == 1 and len(emu.registry.sessions) == 1
    assert "resuming capture session " + session.id in output
    binds = transcript_binds(emu)
    first_conn = creates(emu)[0]["body"]["ws_connection_id"]
    assert binds[:binds_before] == [first_conn] * binds_before
    assert binds[binds_before:] and first_conn not in binds[binds_before:]
    saved = json.loads((tmp_path / "out" / NAME / "capture_session.json").read_text())
    assert saved["session_id"] == session.id and saved["status"] == "exported"
    # the desktop client keeps the token it was given: a still-valid saved token is not replaced
    assert saved["client_token"] == crashed["client_token"]
    assert len([c for c in emu.calls if c["path"] == "/capture/session/token"]) == 1
    assert saved["ws_connection_id"] == binds[-1]
    stopped = {c["path"] for c in emu.calls if c["method"] == "PATCH" and (c["body"] or {}).get("action") == "stop"}
    for i in crashed["indexes"]:  # the crashed run's indexes would keep running against a dead connection
        assert f"/rtstream/{i['rtstream_id']}/index/scene/{i['index_id']}/status" in stopped

    # Rule state survived: "user" is on screen again after the restart, inside the 1 h cooldown: no new alert.
    events = read(tmp_path / "events.jsonl")
    after = events[before:]
    assert any("user" in e["data"]["text"].lower() for e in after if e.get("channel") == "visual_index")
    fired = [a for a in read(tmp_path / "alerts.jsonl") if a.get("origin") == "rules"]
    assert len(fired) == 1, fired
    # Enrich state survived: the active event came before the kill, yet later events still get enriched.
    media = [e for e in after if e.get("channel") in ("transcript", "visual_index", "audio_index")]
    assert media and all(e.get("capture_session_id") == session.id and e.get("media_types") for e in media)


async def saved_session_run(make_context: Callable[..., Context], emu: Emulator, tmp_path: Path,
                            new_session: bool) -> str | None:
    """Start a controller beside a saved capture_session.json; return the session id it settled on."""
    src, ctl = make_stages(make_context, emu, controller={"end_user_id": "demo-user"})
    assert ctl is not None
    ctl.context.settings["new_session"] = new_session
    reader = asyncio.create_task(anext(aiter(src.batches()), None))
    try:
        async with asyncio.timeout(20):
            await ctl.start()
    finally:
        await src.stop()
        reader.cancel()
        await ctl.close()
    return ctl.session_id


async def existing_session(emu: Emulator, tmp_path: Path, status: str) -> tuple[Any, dict[str, Any]]:
    """(SDK connection, record): a capture session made at the emulator, saved as `status` in the state file."""
    import videodb

    conn = videodb.connect(api_key=API_KEY, base_url=emu.base_url)
    existing = await asyncio.to_thread(conn.create_capture_session, end_user_id="demo-user", collection_id="default")
    record = {"session_id": existing.id, "collection_id": "default", "end_user_id": "demo-user", "status": status}
    (tmp_path / "capture_session.json").write_text(json.dumps(record))
    return conn, record


async def test_saved_session_is_attached_and_new_session_flag_creates_one(
        make_context: Callable[..., Context], tmp_path: Path) -> None:
    emu = Emulator(speed=0, api_key=API_KEY, autostart=False)
    await emu.start()
    try:
        _, record = await existing_session(emu, tmp_path, "created")
        assert await saved_session_run(make_context, emu, tmp_path, new_session=False) == record["session_id"]
        assert len(creates(emu)) == 1
        fresh = await saved_session_run(make_context, emu, tmp_path, new_session=True)
        assert fresh not in (None, record["session_id"]) and len(creates(emu)) == 2
        assert json.loads((tmp_path / "capture_session.json").read_text())["session_id"] == fresh
    finally:
        await emu.stop()


@pytest.mark.parametrize("case", ["saved-as-exported", "ended-at-videodb", "unknown-to-videodb", "other-user"])
async def test_a_saved_session_that_cannot_be_resumed_gets_a_new_one(
        make_context: Callable[..., Context], tmp_path: Path, case: str) -> None:
    """Resume only a live session of the same collection and end user; otherwise create one (and say why)."""
    import urllib.request

    emu = Emulator(speed=0, api_key=API_KEY, autostart=False)
    await emu.start()
    try:
        conn, record = await existing_session(emu, tmp_path, "active")
        existing_id = record["session_id"]
        if case == "saved-as-exported":
            record["status"] = "exported"
        elif case == "unknown-to-videodb":
            record["session_id"] = "cap-000000000000"
        elif case == "other-user":
            record["end_user_id"] = "someone-else"
        else:  # the file says active, but the session ended while no pipeline ran
            for hook in ("start", "stop"):
                req = urllib.request.Request(f"{emu.base_url}/_emulator/sessions/{existing_id}/{hook}", method="POST")
                await asyncio.to_thread(urllib.request.urlopen, req, None, 5)
            async with asyncio.timeout(10):
                while (await asyncio.to_thread(conn.get_capture_session, existing_id)).status != "exported":
                    await asyncio.sleep(0.05)
        (tmp_path / "capture_session.json").write_text(json.dumps(record))

        fresh = await saved_session_run(make_context, emu, tmp_path, new_session=False)
        assert fresh not in (None, existing_id, record["session_id"]) and len(creates(emu)) == 2
        assert json.loads((tmp_path / "capture_session.json").read_text())["session_id"] == fresh
    finally:
        await emu.stop()


def test_new_session_flag_is_in_run_help() -> None:
    import subprocess

    out = subprocess.run([str(PIPELINE), "run", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--new-session" in out
