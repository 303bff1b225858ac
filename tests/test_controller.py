"""The `capture_session` controller through the real SDK against the emulator."""

from __future__ import annotations

import asyncio
import json
import logging
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pipeline.api import Context
from pipeline.emulator import Emulator
from pipeline.errors import StageError
from pipeline.session import SessionLink
from stages.controller.capture_session import CaptureSessionController
from stages.controller.lifecycle import Lifecycle
from tests.videodb_harness import API_KEY, FULL_ON_ACTIVE, make_stages, run_stages, scenario_file, settings

MIC, SYS, DSP = "rts-mic-01", "rts-sys-02", "rts-dsp-03"


@pytest.fixture
async def emulator() -> AsyncIterator[Callable[..., Emulator]]:
    made: list[Emulator] = []

    def make(**kw: Any) -> Emulator:
        emu = Emulator(**{"speed": 0, **kw})
        made.append(emu)
        return emu

    yield make
    for emu in made:
        await emu.stop()


def calls(emu: Emulator, method: str, suffix: str) -> list[dict[str, Any]]:
    return [c for c in emu.calls if c["method"] == method and c["path"].endswith(suffix)]


def bound_ids(emu: Emulator, path_part: str) -> list[str]:
    """ws_connection_id of every POST whose path contains `path_part`."""
    return [c["body"]["ws_connection_id"] for c in emu.calls
            if c["method"] == "POST" and path_part in c["path"] and "ws_connection_id" in (c["body"] or {})]


async def test_creates_session_starts_pipelines_and_exits_on_export(
        emulator: Callable[..., Emulator], make_context: Callable[..., Context], tmp_path: Path) -> None:
    emu = emulator(api_key=API_KEY)
    await emu.start()
    src, ctl = make_stages(make_context, emu, controller={
        "end_user_id": "user-42", "metadata": {"app": "tests"}, "client_token_expires_in": 600,
        "on_active": FULL_ON_ACTIVE})
    assert ctl is not None
    run = await run_stages(src, ctl)
    ws = run.connections[0]

    assert (run.link.exit_code, run.link.exit_reason) == (0, "capture session exported")
    assert ctl.lifecycle.history == ["created", "starting", "active", "stopping", "stopped", "exported"]
    [create] = calls(emu, "POST", "/collection/default/capture/session")
    assert create["body"] == {"end_user_id": "user-42", "ws_connection_id": ws, "metadata": {"app": "tests"}}
    [token] = calls(emu, "POST", "/capture/session/token")
    assert token["body"] == {"expires_in": 600}
    assert emu.calls.index(token) < emu.calls.index(create)  # a token names no session: made first

    transcripts = calls(emu, "POST", "/transcription")
    assert sorted(c["path"] for c in transcripts) == [f"/rtstream/{r}/transcription" for r in (MIC, SYS)]
    assert all(c["body"] == {"action": "start", "ws_connection_id": ws} for c in transcripts)
    indexes = calls(emu, "POST", "/index/scene")
    visual = [c for c in indexes if c["body"]["extraction_type"] == "time"]
    audio = [c for c in indexes if c["body"]["extraction_type"] != "time"]
    assert [c["path"] for c in visual] == [f"/rtstream/{DSP}/index/scene"]
    assert visual[0]["body"]["prompt"] == "Describe the screen"
    assert visual[0]["body"]["extraction_config"] == {"time": 2, "frame_count": 5}
    assert visual[0]["body"]["name"] == "screen"
    assert sorted(c["path"] for c in audio) == [f"/rtstream/{MIC}/index/scene", f"/rtstream/{SYS}/index/scene"]
    assert all(c["body"]["extraction_config"] == {"segmenter": "word", "segmentation_value": 50} for c in audio)
    assert all(c["body"]["ws_connection_id"] == ws for c in indexes)
    [event] = calls(emu, "POST", "/rtstream/event")
    assert event["body"] == {"event_prompt": "Source code is visible", "label": "code_on_screen"}
    [alert] = [c for c in emu.calls if c["path"].endswith("/alert")]
    assert alert["path"].startswith(f"/rtstream/{DSP}/index/")
    assert alert["body"]["ws_connection_id"] == ws
    assert any(e.get("channel") == "alert" and e["data"]["event_label"] == "code_on_screen" for e in run.events)
    assert all(c.get("status") == 200 for c in emu.calls)

    saved = tmp_path / "capture_session.json"  # state_dir defaults to the context's state_dir
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    rec = json.loads(saved.read_text())
    assert rec["session_id"] == ctl.session_id and rec["ws_connection_id"] == ws
    assert rec["client_token"].startswith("ct-") and rec["expires_in"] == 600 and rec["expires_at"].endswith("Z")
    assert rec["status"] == "exported" and rec["exported_video_id"].startswith("v_")


async def test_rebinds_every_pipeline_after_each_reconnect(
        emulator: Callable[..., Emulator], make_context: Callable[..., Context]) -> None:
    emu = emulator(drop_after=15, queue_on_drop=True)  # a lossless server: order is checked exactly
    await emu.start()
    src, ctl = make_stages(make_context, emu, source={"backfill": False},
                           controller={"end_user_id": "u", "on_active": FULL_ON_ACTIVE})
    run = await run_stages(src, ctl)

    conns = run.connections
    assert len(conns) >= 4
    # every connection id the source announced got transcripts, both indexes and the alert bound to it
    # (the re-bind to the last one may be cut short: the session is exported meanwhile and the run ends)
    full = conns[:-1]
    transcripts = bound_ids(emu, "/transcription")
    assert transcripts[:2 * len(full)] == [c for c in full for _ in (MIC, SYS)]
    assert transcripts[2 * len(full):] in ([conns[-1]], [conns[-1]] * 2)  # the first call moves the queue
    assert bound_ids(emu, "/index/scene")[:3 * len(full)] == [c for c in full for _ in range(3)]
    assert bound_ids(emu, "/alert")[:len(full)] == full
    assert set(bound_ids(emu, "/index/scene")[3 * len(full):]) <= {conns[-1]}
    assert len(calls(emu, "POST", "/rtstream/event")) == 1  # the alert's event is created once
    replaced = calls(emu, "PATCH", "/status")  # old indexes stopped after each complete re-bind
    assert len(replaced) in (3 * (len(conns) - 2), 3 * (len(conns) - 1))
    assert all(c["body"] == {"action": "stop"} for c in replaced)
    assert run.link.exit_code == 0
    assert [{k: v for k, v in e.items() if k not in ("ts", "unix_ts")} for e in run.events] == \
        [e["event"] for e in emu.emitted]
    saved = json.loads((ctl.context.out_dir / "capture_session.json").read_text())
    assert saved["ws_connection_id"] in full[-1:] + conns[-1:]  # the file names a live connection, not the first


async def test_exit_on_stopped(emulator: Callable[..., Emulator], make_context: Callable[..., Context]) -> None:
    emu = emulator()
    await emu.start()
    src, ctl = make_stages(make_context, emu, controller={"end_user_id": "u", "exit_on": "stopped",
                                                          "on_active": {"transcript": True}})
    run = await run_stages(src, ctl)
    assert (run.link.exit_code, run.link.exit_reason) == (0, "capture session stopped")
    assert "capture_session.stopped" in [e.get("event") for e in run.events[-2:]]


async def test_failed_session_ends_with_exit_code_3_and_the_error(
        emulator: Callable[..., Emulator], make_context: Callable[..., Context], tmp_path: Path) -> None:
    scn = scenario_file(tmp_path, [
        {"at": 0.1, "channel": "transcript", "rtstream": "mic:default", "text": "hello"},
        {"at": 0.2, "event": "capture_session.failed", "error": "screen capture permission revoked"},
    ])
    emu = emulator(scenario=scn)
    await emu.start()
    src, ctl = make_stages(make_context, emu, controller={"end_user_id": "u", "on_active": {"transcript": True}})
    assert ctl is not None
    run = await run_stages(src, ctl)
    assert run.link.exit_code == 3
    assert run.link.exit_reason == "capture session failed: screen capture permission revoked"
    assert ctl.lifecycle.state == "failed"


async def test_wrong_api_key_is_one_line_naming_the_call(
        emulator: Callable[..., Emulator], make_context: Callable[..., Context]) -> None:
    emu = emulator(api_key=API_KEY)
    await emu.start()
    wrong = "k-not-the-right-key-55"
    ctx = make_context("controller:capture_session", session=SessionLink())
    ctx.settings = settings(emu, wrong)
    ctl = CaptureSessionController(CaptureSessionController.Options(end_user_id="u"), ctx)
    await ctx.session.announce_connection("ws-from-elsewhere")
    with pytest.raises(StageError) as info:
        await ctl.start()
    msg = str(info.value)
    assert msg.startswith("controller:capture_session: generate_client_token failed: authentication failed")
    assert wrong not in msg and "\n" not in msg
    await ctl.close()


async def test_attaches_to_an_existing_session_and_follows_it_by_polling(
        emulator: Callable[..., Emulator], make_context: Callable[..., Context]) -> None:
    import videodb

    emu = emulator()
    await emu.start()
    conn = videodb.connect(api_key=API_KEY, base_url=emu.base_url)
    # created elsewhere, without a WebSocket: its lifecycle events reach no one, so the controller polls
    existing = await asyncio.to_thread(conn.create_capture_session, end_user_id="someone")
    src, ctl = make_stages(make_context, emu, controller={"session_id": existing.id, "status_poll_interval": 0.05,
                                                          "on_active": {"transcript": True}})
    assert ctl is not None
    run = await run_stages(src, ctl)

    assert ctl.lifecycle.state == "exported" and run.link.exit_code == 0
    assert not calls(emu, "POST", "/collection/default/capture/session")[1:]  # nothing new created
    assert calls(emu, "GET", f"/capture/session/{existing.id}")
    assert bound_ids(emu, "/transcription") == [run.connections[0]] * 2
    assert sum(e.get("channel") == "transcript" for e in run.events) > 10


async def test_no_connection_id_times_out_clearly(make_context: Callable[..., Context]) -> None:
    ctx = make_context("controller:capture_session")
    ctx.settings = {"videodb": {"api_key": API_KEY, "base_url": "http://127.0.0.1:9", "collection_id": "default"}}
    ctl = CaptureSessionController(CaptureSessionController.Options(end_user_id="u", connect_timeout=0.05), ctx)
    with pytest.raises(StageError, match=r"no WebSocket connection id from the source after 0.05s"):
        await ctl.start()


def test_options_need_a_user_or_a_session_and_an_index_for_each_alert() -> None:
    Opts = CaptureSessionController.Options
    with pytest.raises(ValidationError, match="end_user_id"):
        Opts()
    with pytest.raises(ValidationError, match="index_audio"):
        Opts(end_user_id="u", on_active={"alerts": [{"label": "x", "prompt": "y", "index": "audio"}]})
    with pytest.raises(ValidationError, match="extra"):
        Opts(end_user_id="u", on_active={"transcripts": True})
    assert Opts(session_id="cap-1").exit_on == "exported"


def test_unexpected_transitions_are_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    life = Lifecycle("cap-1")
    caplog.set_level(logging.INFO, "pipeline.controller.capture_session")
    for status in ("created", "active", "starting", "active", "active", "weird"):
        life.advance(status)
    assert life.history == ["created", "active", "weird"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["capture session cap-1: unexpected transition created -> active",
                        "capture session cap-1: late or repeated starting after active ignored",
                        "capture session cap-1: unknown status 'weird' (was active)"]
    polled = Lifecycle("cap-2", "stopping")
    assert not polled.behind("active") and not polled.behind("stopping")  # a poll never moves it back
    assert polled.behind("stopped") and polled.behind("failed")


async def test_lifecycle_events_seen_before_the_session_id_never_move_it_back(
        emulator: Callable[..., Emulator], make_context: Callable[..., Context]) -> None:
    # `created` can arrive over the socket before create_capture_session returns; later events can be
    # observed while the controller is still fetching the client token. Order must be kept.
    emu = emulator(autostart=False)
    await emu.start()
    ctx = make_context("controller:capture_session", session=SessionLink())
    ctx.settings = settings(emu)
    ctl = CaptureSessionController(CaptureSessionController.Options(end_user_id="u"), ctx)
    await ctx.session.announce_connection("ws-test")
    ctl.observe([{"event": "capture_session.created", "status": "created"}])

    async def later_events() -> None:
        while ctl.session_id is None:
            await asyncio.sleep(0)
        ctl.observe([{"event": "capture_session.starting", "capture_session_id": ctl.session_id}])

    observer = asyncio.create_task(later_events())
    await ctl.start()
    await observer
    assert ctl.lifecycle.history == ["created", "starting"]
    await ctl.close()


async def test_a_failing_pipeline_call_is_one_line_and_the_rest_still_runs(
        emulator: Callable[..., Emulator], make_context: Callable[..., Context],
        caplog: pytest.LogCaptureFixture) -> None:
    emu = emulator()
    await emu.start()
    on_active = {"transcript": True, "index_visuals": {"prompt": "p"},
                 "alerts": [{"label": "empty-prompt", "prompt": ""}]}  # the API rejects an empty prompt
    src, ctl = make_stages(make_context, emu, controller={"end_user_id": "u", "on_active": on_active})
    assert ctl is not None
    run = await run_stages(src, ctl)

    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["controller:capture_session: create_event(empty-prompt) failed: "
                      "HTTP 400: event_prompt and label are required"]
    assert ctl.context.stats.errors == 1
    assert run.link.exit_code == 0
    assert {"transcript", "visual_index"} <= {e.get("channel") for e in run.events}
