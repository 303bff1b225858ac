"""Silent sessions are asked about at VideoDB: a session whose lifecycle events are lost while the WebSocket stays
up still ends in the session API.

Before, sessions were polled only after a reconnect or a restart: one VideoDB stopped whose events never came
stayed "active" in `GET /v1/sessions` for ever. Real SDK against the emulator (which can lose a session's
lifecycle events), real HTTP.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest
from pydantic import ValidationError

from pipeline.api import Context
from pipeline.emulator import Emulator
from stages.controller.session_options import SessionApiOptions
from tests.test_session_api import TOKEN, Live, hook, running
from tests.test_session_api import emulator as emulator  # the shared fixture


def gets(emu: Emulator, sid: str) -> int:
    return sum(c["method"] == "GET" and c["path"].endswith(f"/capture/session/{sid}") for c in emu.calls)



async def stopped_with_export(live: Live, emu: Emulator, outcome: str) -> str:
    """A session made through the API whose export will end with `outcome`, started and stopped (its
    `stopped` event arrived); its id."""
    mgr = live.ctl.manager
    sid = str((await live.call("POST", "/v1/sessions", json={"end_user_id": "u"}))[1]["session_id"])
    async with live.http.post(f"{emu.base_url}/_emulator/sessions/{sid}/export", json={"outcome": outcome}) as r:
        assert r.status == 200
    await hook(live, emu, f"sessions/{sid}/start")
    await live.wait_for(lambda: mgr.get(sid).lifecycle.state == "active", timeout=10)
    await hook(live, emu, f"sessions/{sid}/stop")
    await live.wait_for(lambda: mgr.get(sid).lifecycle.state == "stopped", timeout=10)
    return sid

async def test_a_session_stopped_without_its_events_ends_within_the_check_interval(
        emulator: Emulator, make_context: Callable[..., Context]) -> None:
    emu = emulator
    async with running(make_context, emu, api={"silent_check_interval": 0.3}) as live:
        link = live.ctl.context.session
        sid = (await live.call("POST", "/v1/sessions", json={"end_user_id": "u"}))[1]["session_id"]
        other = (await live.call("POST", "/v1/sessions", json={"end_user_id": "v"}))[1]["session_id"]
        await hook(live, emu, f"sessions/{sid}/start")
        await live.wait_for(lambda: live.ctl.manager.get(sid).lifecycle.state == "active", timeout=10)
        conn = link.connection_id
        async with live.http.post(f"{emu.base_url}/_emulator/sessions/{sid}/stop",
                                  json={"lifecycle_lost": True}) as r:
            assert r.status == 200
        await live.wait_for(lambda: emu.registry.sessions[sid].status == "exported", timeout=10)

        async def status() -> str:
            return str((await live.call("GET", f"/v1/sessions/{sid}"))[1]["status"])

        async with asyncio.timeout(3):  # a few check intervals
            while await status() != "exported":
                await asyncio.sleep(0.05)
        view = (await live.call("GET", f"/v1/sessions/{sid}"))[1]
        assert view["exported_video_id"] == emu.registry.sessions[sid].export["exported_video_id"]
        assert not [e for e in live.of(sid) if e.get("event") in ("capture_session.stopping",
                                                                   "capture_session.stopped",
                                                                   "capture_session.exported")]
        assert link.connection_id == conn  # no reconnect: the check alone found it
        assert not [c for c in emu.calls if c["method"] == "GET" and c["path"].endswith("/capture/session")]
        assert (await live.call("GET", f"/v1/sessions/{other}"))[1]["status"] == "created"
        assert gets(emu, other) >= 1  # never started, so silent: asked about too, and still created


async def test_at_most_silent_check_max_sessions_are_asked_about_per_interval_oldest_first(
        emulator: Emulator, make_context: Callable[..., Context]) -> None:
    emu = emulator
    async with running(make_context, emu, api={"silent_check_interval": 60, "silent_check_max": 3}) as live:
        made = []
        for i in range(7):
            made.append((await live.call("POST", "/v1/sessions", json={"end_user_id": f"u{i}"}))[1]["session_id"])
        await live.wait_for(lambda: all(live.ctl.manager.get(s).counts for s in made), timeout=10)
        check = live.ctl.manager.silent
        check.interval = 0.4  # checks by hand (the periodic one waits its 60 s)
        start = len(emu.calls)
        await check.check_once()  # none is silent for a whole interval yet
        await asyncio.sleep(0.45)
        await check.check_once()
        asked = [c["path"].rsplit("/", 1)[1] for c in list(emu.calls)[start:] if c["method"] == "GET"]
        assert sorted(asked) == sorted(made[:3]), asked  # the three heard from longest ago, only them
        await check.check_once()
        asked = [c["path"].rsplit("/", 1)[1] for c in list(emu.calls)[start:] if c["method"] == "GET"]
        assert sorted(asked[3:]) == sorted(made[3:6]), asked  # then the next ones, not the same again


async def test_a_silent_session_whose_export_failed_or_that_vanished_ends_as_failed(
        emulator: Emulator, make_context: Callable[..., Context]) -> None:
    """`export_status: failed` comes with no event (the session stays `stopped`), and a session VideoDB no
    longer has sends nothing: the check ends both as failed (the second after two 404s in a row)."""
    emu = emulator
    async with running(make_context, emu, api={"silent_check_interval": 60}) as live:
        mgr = live.ctl.manager
        check = mgr.silent
        gone = (await live.call("POST", "/v1/sessions", json={"end_user_id": "v"}))[1]["session_id"]
        failing = await stopped_with_export(live, emu, "failed")  # its events arrive; the export fails quietly
        await live.wait_for(lambda: emu.registry.sessions[failing].export_failed, timeout=10)
        emu.registry.sessions.pop(gone)
        check.interval = 0.05  # checks by hand (the periodic one waits its 60 s)
        await asyncio.sleep(0.06)
        await check.check_once()
        view = (await live.call("GET", f"/v1/sessions/{failing}"))[1]
        assert view["status"] == "failed" and "could not export" in view["error"], view
        assert (await live.call("GET", f"/v1/sessions/{gone}"))[1]["status"] == "created"  # one 404: not yet
        await asyncio.sleep(0.06)
        await check.check_once()
        view = (await live.call("GET", f"/v1/sessions/{gone}"))[1]
        assert view["status"] == "failed" and "no longer exists at VideoDB" in view["error"], view


@pytest.mark.parametrize(("key", "bad"), [("silent_check_interval", 0), ("silent_check_interval", "2d"),
                                          ("silent_check_interval", "often"), ("silent_check_max", 0),
                                          ("silent_check_max", 10001)])
def test_silent_check_options_are_validated(key: str, bad: object) -> None:
    with pytest.raises(ValidationError, match=key):
        SessionApiOptions.model_validate({"token": TOKEN, key: bad})
    opts = SessionApiOptions.model_validate({"token": TOKEN})
    assert (opts.silent_check_interval, opts.silent_check_max) == (60.0, 50)


async def test_a_silent_session_still_stopped_whose_export_status_is_exported_ends_as_exported(
        emulator: Emulator, make_context: Callable[..., Context]) -> None:
    """`export_status: exported` is the SDK's word for a finished export: a session whose `status` still read
    `stopped` stayed stopped in the API for ever."""
    emu = emulator
    async with running(make_context, emu, api={"silent_check_interval": 60}) as live:
        mgr = live.ctl.manager
        sid = await stopped_with_export(live, emu, "never")
        data = {**emu.registry.sessions[sid].shape(), "export_status": "exported", "exported_video_id": "m-done"}
        emu.fault("GET", f"/capture/session/{sid}", status=200, body=json.dumps({"success": True, "data": data}))
        mgr.silent.interval = 0.05  # checks by hand (the periodic one waits its 60 s)
        await asyncio.sleep(0.06)
        await mgr.silent.check_once()
        view = (await live.call("GET", f"/v1/sessions/{sid}"))[1]
        assert (view["status"], view["exported_video_id"]) == ("exported", "m-done"), view


async def test_a_check_against_a_slow_videodb_ends_at_the_first_call_past_its_deadline(
        emulator: Emulator, make_context: Callable[..., Context], monkeypatch: pytest.MonkeyPatch) -> None:
    """VideoDB answers get_capture_session after 1 s, the call deadline is 0.3 s: the round stops after the
    first few calls (before: every due session was asked, one deadline per 4 of them; 50 sessions at the real
    60 s deadline took 13 minutes); those not asked come first in the next check."""
    from pipeline import videodb_sdk
    from stages.controller.silent_check import CONCURRENCY

    emu = emulator
    async with running(make_context, emu, api={"silent_check_interval": 60, "silent_check_max": 2 * CONCURRENCY}) \
            as live:
        made = []
        for i in range(3 * CONCURRENCY):
            made.append((await live.call("POST", "/v1/sessions", json={"end_user_id": f"u{i}"}))[1]["session_id"])
        check = live.ctl.manager.silent
        monkeypatch.setattr(videodb_sdk, "CALL_DEADLINE", 0.3)
        emu.fault("GET", "/capture/session/", status=404, delay=1.0, times=CONCURRENCY)
        check.interval = 0.05  # checks by hand (the periodic one waits its 60 s)
        await asyncio.sleep(0.06)
        start = len(emu.calls)
        await check.check_once()
        asked = {c["path"].rsplit("/", 1)[1] for c in list(emu.calls)[start:] if c["method"] == "GET"}
        assert asked == set(made[:CONCURRENCY]), asked  # only the first few: then it gave up for this round
        await asyncio.sleep(0.06)
        await check.check_once()
        asked = [c["path"].rsplit("/", 1)[1] for c in list(emu.calls)[start:] if c["method"] == "GET"]
        assert set(asked[CONCURRENCY:]) == set(made[CONCURRENCY:]), asked  # those not asked first (in time now)
        assert all(live.ctl.manager.get(s).lifecycle.state == "created" for s in made)  # one 404 ends nothing
