"""One capture session (no `api`) whose lifecycle events are lost while the WebSocket stays up still ends.

Before, the status was polled only after a reconnect, when attached or resumed, or from `stopped` on: a
session VideoDB stopped and exported whose events never came left `pipeline run` waiting for ever. Real
SDK against the emulator (which can lose a session's lifecycle events).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from pydantic import ValidationError

from pipeline.api import Context
from pipeline.emulator import Emulator
from stages.controller.capture_session import CaptureSessionOptions
from tests.test_session_api import cues
from tests.videodb_harness import API_KEY, make_stages, run_stages, scenario_file


def gets(emu: Emulator, sid: str) -> int:
    return sum(c["method"] == "GET" and c["path"].endswith(f"/capture/session/{sid}") for c in emu.calls)


async def test_a_session_stopped_without_its_events_ends_the_run_after_the_silent_check(
        tmp_path: Path, make_context: Callable[..., Context]) -> None:
    emu = Emulator(scenario_file(tmp_path, cues(), end=1000), speed=10, api_key=API_KEY, autostart=False)
    await emu.start()
    try:
        src, ctl = make_stages(make_context, emu, controller={
            "end_user_id": "u", "silent_check_interval": "300ms", "status_poll_interval": "200ms",
            "on_active": {"transcript": True},
            "state_dir": str(tmp_path / "state")})
        assert ctl is not None
        run = asyncio.create_task(run_stages(src, ctl, timeout=20))
        async with asyncio.timeout(10):
            while ctl.session_id is None:
                await asyncio.sleep(0.02)
        sid = ctl.session_id
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{emu.base_url}/_emulator/sessions/{sid}/start") as r:
                assert r.status == 200
            async with asyncio.timeout(10):
                while ctl.lifecycle.state != "active":
                    await asyncio.sleep(0.02)
            conn = src.context.session.connection_id
            async with http.post(f"{emu.base_url}/_emulator/sessions/{sid}/stop", json={"lifecycle_lost": True}) as r:
                assert r.status == 200
        done = await asyncio.wait_for(run, 5)  # a few check intervals; it waited for ever before
        assert (done.link.exit_code, done.link.exit_reason) == (0, "capture session exported")
        assert ctl.record["exported_video_id"] == emu.registry.sessions[sid].export["exported_video_id"]
        assert not [e for e in done.events if e.get("event") in ("capture_session.stopped",
                                                                   "capture_session.exported")]
        assert done.connections == [conn] or not done.connections  # no reconnect: the check alone found it
        assert gets(emu, sid) >= 1
    finally:
        await emu.stop()


async def test_a_session_that_keeps_sending_is_not_asked_about(
        tmp_path: Path, make_context: Callable[..., Context]) -> None:
    """The check costs nothing while events flow: no `get_capture_session` but the one every run makes at
    `stopped` (whether a channel is stored, so an export follows)."""
    emu = Emulator(scenario_file(tmp_path, cues(20), end=21), speed=20, api_key=API_KEY)
    await emu.start()
    try:
        src, ctl = make_stages(make_context, emu, controller={
            "end_user_id": "u", "silent_check_interval": "500ms", "on_active": {"transcript": True},
            "state_dir": str(tmp_path / "state")})
        assert ctl is not None
        done = await run_stages(src, ctl, timeout=20)
        assert (done.link.exit_code, done.link.exit_reason) == (0, "capture session exported")
        assert gets(emu, ctl.session_id or "") == 1  # only the one at `stopped` (is a channel stored?)
    finally:
        await emu.stop()


@pytest.mark.parametrize("bad", [0, "0s", -1, "2d", "often"])
def test_silent_check_interval_is_validated(bad: object) -> None:
    with pytest.raises(ValidationError, match="silent_check_interval"):
        CaptureSessionOptions.model_validate({"end_user_id": "u", "silent_check_interval": bad})
    assert CaptureSessionOptions.model_validate({"end_user_id": "u"}).silent_check_interval == 60.0


async def test_checks_of_a_session_never_started_do_not_overlap_behind_a_slow_videodb(
        tmp_path: Path, make_context: Callable[..., Context]) -> None:
    """One call at a time, the next an interval after the last answer: a VideoDB answering in 0.5 s gets a
    handful of calls in 1.3 s with a 0.1 s interval, not a pile of overlapping ones."""
    emu = Emulator(scenario_file(tmp_path, cues(), end=1000), speed=10, api_key=API_KEY, autostart=False)
    await emu.start()
    try:
        src, ctl = make_stages(make_context, emu, controller={
            "end_user_id": "u", "silent_check_interval": "100ms", "state_dir": str(tmp_path / "state")})
        assert ctl is not None
        run = asyncio.create_task(run_stages(src, ctl, timeout=20))
        async with asyncio.timeout(10):
            while ctl.session_id is None:
                await asyncio.sleep(0.02)
        emu.fault("GET", f"/capture/session/{ctl.session_id}", delay=0.5)
        await asyncio.sleep(1.3)
        assert 1 <= gets(emu, ctl.session_id) <= 3, gets(emu, ctl.session_id)
        assert ctl.lifecycle.state == "created" and not run.done()
        src.context.session.request_exit(0, "test over")
        await asyncio.wait_for(run, 5)
    finally:
        await emu.stop()
