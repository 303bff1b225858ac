"""The `videodb` source through the real SDK against the emulator: receive, stamp, reconnect, dead-letter."""

from __future__ import annotations

import json
import os
import re
import stat
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from pipeline.api import Context
from pipeline.emulator import Emulator
from pipeline.errors import StageError
from stages.sources.videodb import PID_FILE, WS_ID_FILE
from tests.videodb_harness import API_KEY, FULL_ON_ACTIVE, make_stages, run_stages, scenario_file, strip_stamp

ISO_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TRANSCRIPT_ONLY = {"end_user_id": "u-1", "on_active": {"transcript": True}}


@pytest.fixture
async def emulator() -> AsyncIterator[Callable[..., Emulator]]:
    made: list[Emulator] = []

    def make(**kw: object) -> Emulator:
        emu = Emulator(**{"speed": 0, **kw})  # type: ignore[arg-type]
        made.append(emu)
        return emu

    yield make
    for emu in made:
        await emu.stop()


def emitted_to_us(emu: Emulator) -> list[dict[str, object]]:
    return [e["event"] for e in emu.emitted]


async def test_receives_and_stamps_every_event(emulator: Callable[..., Emulator],
                                               make_context: Callable[..., Context]) -> None:
    emu = emulator()
    await emu.start()
    src, ctl = make_stages(make_context, emu, controller=TRANSCRIPT_ONLY)
    before = time.time()
    run = await run_stages(src, ctl)
    after = time.time()

    assert len(run.connections) == 1
    assert [strip_stamp(e) for e in run.events] == emitted_to_us(emu)
    assert any(e.get("channel") == "transcript" for e in run.events)
    for e in run.events:
        assert ISO_MS_Z.match(e["ts"]), e["ts"]
        assert before - 0.01 <= e["unix_ts"] <= after + 0.01
    assert run.events[-1]["event"] == "capture_session.exported"
    assert src.context.stats.dropped == 0
    assert not src.context.dead_letter.path.exists()


async def test_reconnects_after_drops_and_loses_nothing(emulator: Callable[..., Emulator],
                                                        make_context: Callable[..., Context]) -> None:
    emu = emulator(drop_after=12, queue_on_drop=True)  # a lossless server: order is checked exactly
    await emu.start()
    src, ctl = make_stages(make_context, emu, source={"backfill": False},
                           controller={"end_user_id": "u-1", "on_active": FULL_ON_ACTIVE})
    run = await run_stages(src, ctl)

    assert emu.hub.drops >= 3
    assert len(run.connections) == emu.hub.drops + 1
    assert len(set(run.connections)) == len(run.connections)  # a new connection id each time
    received = [strip_stamp(e) for e in run.events]
    assert received == emitted_to_us(emu)  # every event generated, once, in order
    assert {e.get("channel") for e in received} >= {"transcript", "visual_index", "audio_index", "alert"}
    assert received[-1]["event"] == "capture_session.exported"


async def test_garbage_frames_are_dead_lettered(emulator: Callable[..., Emulator],
                                                make_context: Callable[..., Context]) -> None:
    emu = emulator(garbage_every=5)
    await emu.start()
    src, ctl = make_stages(make_context, emu, controller=TRANSCRIPT_ONLY)
    run = await run_stages(src, ctl)

    assert emu.hub.garbage_sent > 3
    lines = [json.loads(x) for x in src.context.dead_letter.path.read_text().splitlines()]
    assert len(lines) == emu.hub.garbage_sent == src.context.stats.dropped
    for rec in lines:
        assert rec["reason"].startswith("not JSON")
        assert "emulator garbage frame" in rec["raw"]
        assert rec["stage"] == "source:videodb"
        assert rec["origin"]["connection_id"] == run.connections[0]
    assert [strip_stamp(e) for e in run.events] == emitted_to_us(emu)


async def test_frames_over_one_mib_are_dead_lettered_not_fatal(emulator: Callable[..., Emulator],
                                                               make_context: Callable[..., Context],
                                                               tmp_path: Path) -> None:
    # The SDK opens its socket with websockets' 1 MiB limit; the source lifts it and applies
    # max_message_bytes itself, so a 2 MiB frame is dead-lettered with a reason and the stream goes on.
    big = "x" * (2 << 20)
    scn = scenario_file(tmp_path, [
        {"at": 0.1, "channel": "transcript", "rtstream": "mic:default", "text": "before"},
        {"at": 0.2, "channel": "transcript", "rtstream": "mic:default", "text": big},
        {"at": 0.3, "channel": "transcript", "rtstream": "mic:default", "text": "after"},
    ])
    emu = emulator(scenario=scn)
    await emu.start()
    src, ctl = make_stages(make_context, emu, controller=TRANSCRIPT_ONLY)
    run = await run_stages(src, ctl)

    texts = [e["data"]["text"] for e in run.events if e.get("channel") == "transcript"]
    assert texts == ["before", "after"]
    assert len(run.connections) == 1
    rec = json.loads(src.context.dead_letter.path.read_text())
    assert "exceeds max_message_bytes=1048576" in rec["reason"]


async def test_state_dir_holds_ws_id_and_pid_while_running(emulator: Callable[..., Emulator],
                                                           make_context: Callable[..., Context],
                                                           tmp_path: Path) -> None:
    emu = emulator()
    await emu.start()
    state = tmp_path / "state"
    src, _ = make_stages(make_context, emu, source={"state_dir": str(state)})
    seen: dict[str, str] = {}

    async def on_connection(conn_id: str) -> None:
        seen["ws_id"] = (state / WS_ID_FILE).read_text()
        seen["pid"] = (state / PID_FILE).read_text()
        await src.stop()

    src.context.session.on_connection(on_connection)
    run = await run_stages(src, None)

    assert seen == {"ws_id": run.connections[0], "pid": str(os.getpid())}
    assert stat.S_IMODE((state / WS_ID_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert not (state / PID_FILE).exists()  # removed when the source ends


async def test_wrong_api_key_fails_fast_naming_the_call(emulator: Callable[..., Emulator],
                                                        make_context: Callable[..., Context]) -> None:
    emu = emulator(api_key=API_KEY)
    await emu.start()
    wrong = "k-wrong-secret-987654"
    src, _ = make_stages(make_context, emu, api_key=wrong)
    with pytest.raises(StageError) as info:
        await run_stages(src, None, timeout=10)
    msg = str(info.value)
    assert "connect_websocket" in msg and "authentication failed" in msg
    assert wrong not in msg and "\n" not in msg
    assert len(emu.calls) == 1  # no retry loop on a bad key


async def test_unreachable_api_retries_then_gives_up(make_context: Callable[..., Context],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    emu = Emulator(speed=0)
    await emu.start()
    await emu.stop()  # nothing listens on that port any more
    src, _ = make_stages(make_context, emu, source={"max_retries": 2, "backoff_initial": 0.01})
    with pytest.raises(StageError, match="gave up after 2 reconnect attempts"):
        await run_stages(src, None, timeout=20)
    attempts = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(attempts) == 2
    assert "connect_websocket failed: cannot reach the VideoDB API" in attempts[0].getMessage()
