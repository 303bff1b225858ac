"""`exit_on: exported` when the export fails or never comes: real SDK, real emulator, real `pipeline run`.

Before the fix the run waited for the `exported` event for ever: VideoDB reports a failed export only in the
session's `export_status` (no lifecycle event follows), and nothing bounded the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from pipeline.api import Context
from pipeline.emulator import Emulator
from stages.controller.capture_session import CaptureSessionOptions
from tests.procs import communicate
from tests.videodb_harness import API_KEY, make_stages, run_stages

PIPELINE = Path(sys.executable).parent / "pipeline"


async def test_emulated_export_failure_is_reported_as_videodb_does() -> None:
    """The emulator's failed export: `export_status: failed` on the session (still `stopped`) and on export()."""
    import videodb

    emu = Emulator(speed=0, api_key=API_KEY, export_outcome="failed", setup_timeout=0.1)
    await emu.start()
    try:
        conn = videodb.connect(api_key=API_KEY, base_url=emu.base_url)
        made = await asyncio.to_thread(conn.create_capture_session, end_user_id="u")
        await asyncio.wait_for(emu.wait_finished(), 10)
        session = await asyncio.to_thread(conn.get_capture_session, made.id)
        assert (session.status, session.export_status, session.exported_video_id) == ("stopped", "failed", None)
        assert (await asyncio.to_thread(session.export))["export_status"] == "failed"
    finally:
        await emu.stop()


async def test_a_failed_export_ends_pipeline_run_with_one_line_and_exit_code_3(tmp_path: Path) -> None:
    emu = Emulator(speed=0, api_key=API_KEY, export_outcome="failed")
    await emu.start()
    try:
        cfg = {"name": "export-fails",
               "videodb": {"api_key": "${VIDEO_DB_API_KEY}", "base_url": emu.base_url},
               "source": {"type": "videodb", "backoff_initial": "50ms"},
               "controller": {"type": "capture_session", "end_user_id": "u", "status_poll_interval": "100ms",
                              "state_dir": str(tmp_path / "state"), "on_active": {"transcript": True}},
               "sinks": [{"type": "jsonl", "path": str(tmp_path / "events.jsonl")}]}
        config = tmp_path / "p.yaml"
        config.write_text(yaml.safe_dump(cfg))
        proc = await asyncio.create_subprocess_exec(
            str(PIPELINE), "run", "-q", str(config), cwd=tmp_path, env={**os.environ, "VIDEO_DB_API_KEY": API_KEY},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await communicate(proc, 30)
        output = (out + err).decode()
        [sid] = emu.registry.sessions
        assert proc.returncode == 3, output
        assert "Traceback" not in output and API_KEY not in output
        why = f"capture session {sid} stopped but VideoDB could not export it"
        [line] = [line for line in output.splitlines() if why in line]  # -q: no summary, the one error line
        assert " ERROR " in line and line.endswith("(get_capture_session: export_status failed)"), output
        saved = json.loads((tmp_path / "state" / "capture_session.json").read_text())
        assert saved["status"] == "stopped" and "could not export" in saved["error"]
    finally:
        await emu.stop()


async def test_an_export_that_never_comes_ends_the_run_after_export_timeout(
        make_context: Callable[..., Context]) -> None:
    emu = Emulator(speed=0, export_outcome="never")
    await emu.start()
    try:
        src, ctl = make_stages(make_context, emu, controller={"end_user_id": "u", "export_timeout": "600ms",
                                                              "on_active": {"transcript": True}})
        assert ctl is not None
        began = time.monotonic()
        run = await run_stages(src, ctl, timeout=10)
        assert run.link.exit_code == 3
        assert run.link.exit_reason == (f"capture session {ctl.session_id} stopped but was not exported within "
                                        "export_timeout=0.6s of stopping")
        assert time.monotonic() - began >= 0.6
        assert ctl.lifecycle.state == "stopped"
    finally:
        await emu.stop()


@pytest.mark.parametrize("bad", [0, "0s", -1, "8d", "soon", True])
def test_export_timeout_is_validated(bad: object) -> None:
    with pytest.raises(ValidationError, match="export_timeout"):
        CaptureSessionOptions.model_validate({"end_user_id": "u", "export_timeout": bad})
    assert CaptureSessionOptions.model_validate({"end_user_id": "u"}).export_timeout == 1800.0
    assert CaptureSessionOptions.model_validate({"end_user_id": "u", "export_timeout": "2h"}).export_timeout == 7200


async def test_a_session_still_stopped_whose_export_status_is_exported_ends_the_run_as_exported(
        make_context: Callable[..., Context]) -> None:
    """The SDK's `export_status` says `exported` once the export is done; a session whose `status` still read
    `stopped` was waited on until export_timeout and ended the run with exit code 3, its video made."""
    emu = Emulator(speed=0, export_outcome="never")
    await emu.start()
    try:
        src, ctl = make_stages(make_context, emu, controller={
            "end_user_id": "u", "export_timeout": "3s", "status_poll_interval": "100ms",
            "on_active": {"transcript": True}})
        assert ctl is not None
        run = asyncio.create_task(run_stages(src, ctl, timeout=10))
        async with asyncio.timeout(5):
            while ctl.lifecycle.state != "stopped":
                await asyncio.sleep(0.01)
        sid = ctl.session_id
        data = {**emu.registry.sessions[sid].shape(), "status": "stopped", "export_status": "exported",
                "exported_video_id": "m-done"}
        emu.fault("GET", f"/capture/session/{sid}", status=200, body=json.dumps({"success": True, "data": data}))
        began = time.monotonic()
        done = await run
        assert (done.link.exit_code, done.link.exit_reason) == (0, "capture session exported")
        assert time.monotonic() - began < 2  # a poll or two, not export_timeout
        assert ctl.record["exported_video_id"] == "m-done"
    finally:
        await emu.stop()


async def _crash_while_export_awaited(make_context: Callable[..., Context], emu: Emulator, state: Path,
                                      **options: Any) -> str:
    """A first run that stops (cancelled, as a crash would) while it waits for its session's export."""
    src, ctl = make_stages(make_context, emu, controller={
        "end_user_id": "u", "state_dir": str(state), "status_poll_interval": "100ms",
        "on_active": {"transcript": True}, **options})
    assert ctl is not None
    run = asyncio.create_task(run_stages(src, ctl, timeout=20))
    async with asyncio.timeout(5):
        while ctl.record.get("status") != "stopped":
            await asyncio.sleep(0.01)
    run.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await run
    assert ctl.session_id is not None
    return ctl.session_id


async def test_a_restart_while_the_export_is_awaited_resumes_that_session_and_keeps_its_timeout(
        tmp_path: Path, make_context: Callable[..., Context]) -> None:
    """A run that crashed after `stopped`, waiting for the export: its restart made a new session (stopped
    ones were never resumed), which nobody starts, and the export of the first was never seen. Now the
    restart follows the stopped session, and export_timeout still counts from its stop."""
    emu = Emulator(speed=0, export_outcome="never")
    await emu.start()
    try:
        sid = await _crash_while_export_awaited(make_context, emu, tmp_path / "state", export_timeout="2s")
        await asyncio.sleep(1.0)  # the crashed run was down for half of export_timeout
        src, ctl = make_stages(make_context, emu, controller={
            "end_user_id": "u", "state_dir": str(tmp_path / "state"), "export_timeout": "2s"})
        assert ctl is not None
        began = time.monotonic()
        run = await run_stages(src, ctl, timeout=10)
        assert list(emu.registry.sessions) == [sid]  # no second session
        assert (run.link.exit_code, run.link.exit_reason) == (
            3, f"capture session {sid} stopped but was not exported within export_timeout=2s of stopping")
        assert time.monotonic() - began < 1.6  # what was left of the 2 s, not 2 s again
    finally:
        await emu.stop()


async def test_a_restart_finds_the_export_made_while_it_was_down(
        tmp_path: Path, make_context: Callable[..., Context]) -> None:
    emu = Emulator(speed=0, export_outcome="never")
    await emu.start()
    try:
        sid = await _crash_while_export_awaited(make_context, emu, tmp_path / "state")
        data = {**emu.registry.sessions[sid].shape(), "status": "exported", "exported_video_id": "m-late"}
        emu.fault("GET", f"/capture/session/{sid}", status=200, body=json.dumps({"success": True, "data": data}))
        src, ctl = make_stages(make_context, emu, controller={"end_user_id": "u", "state_dir": str(tmp_path / "state")})
        assert ctl is not None
        run = await run_stages(src, ctl, timeout=10)
        assert (run.link.exit_code, run.link.exit_reason) == (0, "capture session exported")
        assert list(emu.registry.sessions) == [sid]
        saved = json.loads((tmp_path / "state" / "capture_session.json").read_text())
        assert (saved["session_id"], saved["status"], saved["exported_video_id"]) == (sid, "exported", "m-late")
    finally:
        await emu.stop()


def test_export_wait_counts_from_the_stop_and_survives_clock_jumps() -> None:
    from stages.controller.capture_session import export_wait

    assert export_wait("2026-01-01T00:00:00.000Z", 60, 1767225630.0) == 30.0  # stopped 30 s ago
    assert export_wait("2026-01-01T00:00:00.000Z", 60, 1767225700.0) == 0.0
    assert export_wait("2026-01-01T00:00:00.000Z", 60, 1767225500.0) == 60  # the clock went back
    assert export_wait(None, 60, 0.0) == export_wait("garbage", 60, 0.0) == 60
