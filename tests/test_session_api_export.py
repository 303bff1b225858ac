"""The session API bounds the wait for an export: a session VideoDB stopped but never exports ends as failed
`export_timeout` after its first stop, a restart counting on from there.

Before, such a session stayed `stopped` in `GET /v1/sessions` for ever, counted as live (under max_sessions,
polled, re-attached by every restart). Real SDK against the emulator (whose export can never finish), real HTTP.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from pipeline.api import Context
from pipeline.emulator import Emulator
from pipeline.events import iso_ts
from tests.test_session_api import emulator as emulator  # the shared fixture
from tests.test_session_api import running
from tests.test_session_api_silent import stopped_with_export


async def test_a_session_never_exported_ends_as_failed_after_export_timeout(
        emulator: Emulator, make_context: Callable[..., Context], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    emu = emulator
    async with running(make_context, emu, export_timeout=0.5) as live:
        mgr = live.ctl.manager
        caplog.set_level(logging.INFO, logger="pipeline.controller")
        sid = await stopped_with_export(live, emu, "never")
        assert (await live.call("GET", f"/v1/sessions/{sid}"))[1]["status"] == "stopped"
        await live.wait_for(lambda: mgr.get(sid).lifecycle.done, timeout=5)
        view = (await live.call("GET", f"/v1/sessions/{sid}"))[1]
        assert view["status"] == "failed", view
        assert "not exported within export_timeout=0.5s of stopping" in view["error"], view
        assert await mgr.store.flushed(sid)  # written by the writer thread
        record = orjson.loads((tmp_path / "sessions" / f"{sid}.json").read_bytes())
        assert record["status"] == "failed" and record["error"] == view["error"]
        assert isinstance(record["stopped_at"], str)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR and sid in r.getMessage()]
        assert len(errors) == 1 and "export_timeout" in errors[0].getMessage(), errors
        assert not emu.registry.sessions[sid].export_failed  # VideoDB itself never said so


async def test_export_timeout_counts_from_the_first_stop_across_a_restart(
        emulator: Emulator, make_context: Callable[..., Context], tmp_path: Path) -> None:
    """The record keeps `stopped_at`: a restart 29 min 59 s after the stop (export_timeout 30m) ends the session
    a second later, not 30 minutes later; one stopped just now keeps waiting."""
    emu = emulator
    async with running(make_context, emu) as live:
        old = await stopped_with_export(live, emu, "never")
        new = await stopped_with_export(live, emu, "never")
    path = tmp_path / "sessions" / f"{old}.json"
    record = orjson.loads(path.read_bytes())
    assert record["status"] == "stopped" and isinstance(record["stopped_at"], str)
    record["stopped_at"] = iso_ts(time.time() - 1799)  # as if the pipeline had been down since
    path.write_bytes(orjson.dumps(record))
    async with running(make_context, emu) as live:
        mgr = live.ctl.manager
        await live.wait_for(lambda: mgr.get(old).lifecycle.done, timeout=5)
        view = (await live.call("GET", f"/v1/sessions/{old}"))[1]
        assert view["status"] == "failed" and "export_timeout=1800s" in view["error"], view
        assert (await live.call("GET", f"/v1/sessions/{new}"))[1]["status"] == "stopped"
    assert orjson.loads(path.read_bytes())["stopped_at"] == record["stopped_at"]  # not restarted by the restart
