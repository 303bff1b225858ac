"""Session API: a backfill that failed after a reconnect is tried again without waiting for another reconnect."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pipeline.api import Context
from pipeline.emulator import Emulator
from tests.test_session_api import cues, hook, running
from tests.videodb_harness import API_KEY, FULL_ON_ACTIVE, scenario_file


@contextlib.asynccontextmanager
async def streaming(make_context: Callable[..., Context], tmp_path: Path, channel: str = "transcript",
                    **controller: Any) -> AsyncIterator[tuple[Any, Emulator, str]]:
    """(the running pipeline, the emulator, a session id): one session created through the API and started, its
    `channel` events arriving; `controller`: controller options."""
    emu = Emulator(scenario_file(tmp_path, cues(400), end=1000), speed=10, api_key=API_KEY, autostart=False)
    await emu.start()
    try:
        async with running(make_context, emu, **controller) as live:
            yield live, emu, await start_one(live, emu, channel)
    finally:
        await emu.stop()


async def start_one(live: Any, emu: Emulator, channel: str = "transcript") -> str:
    """A session created through the API and started, its `channel` events arriving: its id."""
    status, body = await live.call("POST", "/v1/sessions", json={"end_user_id": "u1"})
    assert status == 201, body
    sid: str = body["session_id"]
    await hook(live, emu, f"sessions/{sid}/start")
    await live.wait_for(lambda: len(live.of(sid, channel)) >= 3)
    return sid


async def drop_ws(emu: Emulator) -> None:
    """Drop the pipeline's WebSocket through the emulator's route, as a lost network would."""
    async with aiohttp.ClientSession() as http, http.post(f"{emu.base_url}/_emulator/ws/drop") as r:
        assert r.status == 200


async def test_a_failed_backfill_is_retried_while_the_connection_stays_up(
        make_context: Callable[..., Context], tmp_path: Path) -> None:
    """A backfill after a reconnect failed (VideoDB 500 on the transcript reads) and kept its gap mark "for the
    next re-bind": with the connection up from then on, no re-bind came and the gap's transcripts never arrived
    (seen in the session soak's logs: a retry came only with the next WebSocket drop or kill -9). Now it is tried
    again every status_poll_interval until it works."""
    async with streaming(make_context, tmp_path, "visual_index") as (live, emu, sid):
        emu.fault("GET", "/websocket", delay=1.0, times=1)  # the reconnect takes a second: a gap
        scenes = emu.fault("GET", "/transcription", status=500)  # every transcript read fails for now
        await drop_ws(emu)
        await live.wait_for(lambda: scenes.hits > 0 and live.ctl.context.session.connection_id is not None)
        emu.faults.clear()
        assert len([r for r in emu.emitted if not r["live"] and r["event"].get("channel") == "transcript"]) > 0

        def produced() -> set[Any]:
            return {(r["event"]["rtstream_id"], r["event"]["data"]["start"]) for r in emu.emitted
                    if r["event"].get("channel") == "transcript"}

        want = produced()
        await live.wait_for(lambda: want <= {(e["rtstream_id"], e["data"]["start"])
                                              for e in live.of(sid, "transcript")}, timeout=8)


async def test_a_re_bind_call_that_failed_is_tried_again_and_its_gap_backfilled(
        make_context: Callable[..., Context], tmp_path: Path) -> None:
    """Found by `python -m bench.soak --sessions 16 --minutes 3 --seed 8`: after a reconnect, the re-bind's
    start_transcript got a VideoDB 500; the session counted as bound to the new connection all the same, so its
    transcripts kept going to the dead one and were never fetched (the connection stayed up). Now a bind with a
    failed call is tried again every status_poll_interval, then backfilled."""
    async with streaming(make_context, tmp_path) as (live, emu, sid):
        start = emu.fault("POST", "/transcription", status=500, times=1)
        await drop_ws(emu)
        await live.wait_for(lambda: start.hits == 1)
        lost = len([r for r in emu.emitted if not r["live"] and r["event"].get("channel") == "transcript"])
        await live.wait_for(lambda: len([r for r in emu.emitted if not r["live"]
                                         and r["event"].get("channel") == "transcript"]) > lost)
        want = {(r["event"]["rtstream_id"], r["event"]["data"]["start"]) for r in emu.emitted
                if r["event"].get("channel") == "transcript"}
        await live.wait_for(lambda: want <= {(e["rtstream_id"], e["data"]["start"])
                                              for e in live.of(sid, "transcript")}, timeout=8)


async def test_a_bind_retry_does_not_bind_a_session_videodb_stopped_meanwhile(
        make_context: Callable[..., Context], tmp_path: Path) -> None:
    """A re-bind whose start_transcript kept failing was tried again every status_poll_interval while the session
    was not finished, `stopped` included: once VideoDB stopped the session (its export awaited), the next retry
    started a transcript on the stopped rtstreams. Now a failed bind is retried only while the session is active
    (its gap is still backfilled once stopped)."""
    async with streaming(make_context, tmp_path) as (live, emu, sid):
        start = emu.fault("POST", "/transcription", status=500)  # every re-bind's start_transcript fails
        await drop_ws(emu)
        await live.wait_for(lambda: start.hits >= 2)  # the re-bind, then a retry
        await hook(live, emu, f"sessions/{sid}/stop")
        s = live.ctl.manager.sessions[sid]
        await live.wait_for(lambda: s.lifecycle.state == "stopped")
        emu.faults.clear()
        stopped_at = time.monotonic()
        await asyncio.sleep(1.0)  # five status_poll_intervals: retries would have come
        assert [c["path"] for c in list(emu.calls)
                if c["at"] > stopped_at and c["method"] == "POST" and "/transcription" in c["path"]
                and (c.get("body") or {}).get("action") == "start"] == []


async def test_a_backfill_videodb_refuses_is_not_tried_again_every_interval(
        make_context: Callable[..., Context], tmp_path: Path) -> None:
    """A backfill read VideoDB refuses outright (a 4xx, e.g. 404: retrying cannot help) marked the backfill as
    due, so it was tried again, every target's read with it, every status_poll_interval for the rest of the
    session. Now only a failure worth another try (5xx, 429, network) is; a refused one waits for the next
    re-bind, as before."""
    async with streaming(make_context, tmp_path) as (live, emu, sid):
        refused = emu.fault("GET", "/transcription", status=404)
        await drop_ws(emu)
        await live.wait_for(lambda: refused.hits > 0)
        pipes = live.ctl.manager.sessions[sid].pipelines
        reads = len([t for t in pipes.backfill_targets() if t.channel == "transcript"])
        await asyncio.sleep(1.0)  # five status_poll_intervals
        assert refused.hits == reads  # one backfill, not one per interval


async def test_a_bind_retry_waits_as_long_as_videodb_s_retry_after(
        make_context: Callable[..., Context], tmp_path: Path) -> None:
    """A re-bind VideoDB rate-limited (429, Retry-After: 30) was tried again every status_poll_interval all the
    same (here 0.2 s: a full bind each time, for every session): now the retry waits what VideoDB asked."""
    async with streaming(make_context, tmp_path) as (live, emu, sid):
        limited = emu.fault("POST", "/transcription", status=429, headers={"Retry-After": "30"})
        await drop_ws(emu)
        pipes = live.ctl.manager.sessions[sid].pipelines
        await live.wait_for(lambda: pipes.bind_failed and pipes.bound_to == live.ctl.context.session.connection_id)
        first = limited.hits  # the re-bind's start_transcript calls
        await asyncio.sleep(1.0)  # five status_poll_intervals
        assert limited.hits == first


async def test_a_session_whose_rtstreams_videodb_rate_limits_is_asked_again_no_sooner_than_its_retry_after(
        make_context: Callable[..., Context], tmp_path: Path) -> None:
    """A restart asks for each live session's rtstreams by id when the listing fails. VideoDB answering that 429
    with Retry-After: 1, the session was asked for again (to be bound) one status_poll_interval later (here
    0.2 s) all the same. Now that ask waits what VideoDB asked (the SDK no longer waits it itself: each 429
    fails its call at once, see test_sdk_retry_after.py)."""
    emu = Emulator(scenario_file(tmp_path, cues(400), end=1000), speed=10, api_key=API_KEY, autostart=False)
    await emu.start()
    try:
        async with running(make_context, emu) as live:
            sid = await start_one(live, emu)
        limited = emu.fault("GET", f"/capture/session/{sid}", status=429, headers={"Retry-After": "1"})
        emu.fault("GET", "/capture/session", status=500)  # the listing fails: the restart asks for it by id
        async with running(make_context, emu) as live:
            await live.wait_for(lambda: limited.hits >= 3, timeout=10)
            at = [c["at"] for c in list(emu.calls) if c["path"].endswith(f"/capture/session/{sid}")]
            assert at[1] - at[0] >= 0.9 and at[2] - at[1] >= 0.9  # each ask 1 s after the one before
    finally:
        await emu.stop()


async def test_a_reconnect_does_not_re_bind_a_session_videodb_stopped_meanwhile(
        make_context: Callable[..., Context], tmp_path: Path) -> None:
    """The WebSocket down, VideoDB stopped a session (the status poll saw it; its export awaited): the reconnect
    re-bound it all the same, starting a transcript and a scene index on its stopped rtstreams. Now a reconnect
    re-binds only active sessions; a stopped one's gap is still backfilled."""
    emu = Emulator(scenario_file(tmp_path, cues(400), end=1000), speed=10, api_key=API_KEY, autostart=False,
                   export_outcome="never")
    await emu.start()
    try:
        async with running(make_context, emu, source={"backoff_max": 0.05}) as live:
            sid = await start_one(live, emu)
            link, s = live.ctl.context.session, live.ctl.manager.sessions[sid]
            first = link.connection_id
            await drop_ws(emu)  # a first reconnect: the status poll runs from now on
            await live.wait_for(lambda: s.pipelines is not None and s.pipelines.bound_to not in (None, first))
            second = link.connection_id
            refused = emu.fault("GET", "/websocket", status=500)  # no reconnect for now
            await drop_ws(emu)
            lost = transcripts(emu, live=False)
            await live.wait_for(lambda: len(transcripts(emu, live=False) - lost) >= 2)  # produced for nobody
            await hook(live, emu, f"sessions/{sid}/stop")
            await live.wait_for(lambda: s.lifecycle.state == "stopped")  # polled
            emu.faults.remove(refused)
            await live.wait_for(lambda: link.connection_id not in (None, second))
            want, last = transcripts(emu), link.connection_id
            await live.wait_for(lambda: want <= {(e["rtstream_id"], e["data"]["start"])
                                                  for e in live.of(sid, "transcript")})  # the gap, backfilled
            assert s.lifecycle.state == "stopped"
            assert [c["path"] for c in list(emu.calls) if c["method"] == "POST"
                    and (c.get("body") or {}).get("ws_connection_id") == last] == []
    finally:
        await emu.stop()


def transcripts(emu: Emulator, *, live: bool | None = None) -> set[tuple[Any, Any]]:
    """(rtstream id, start) of the transcripts the emulator produced (`live`: sent over a socket, or not)."""
    return {(r["event"]["rtstream_id"], r["event"]["data"]["start"]) for r in emu.emitted
            if r["event"].get("channel") == "transcript" and live in (None, r["live"])}


@pytest.mark.parametrize("fails", ["/transcription", "/index/scene", "/alert"])
async def test_a_bind_retry_redoes_only_the_call_that_failed(
        make_context: Callable[..., Context], tmp_path: Path, fails: str) -> None:
    """A re-bind one of whose calls failed (a start_transcript, an index_audio, a create_alert) was retried whole: every
    transcript started again and every scene index made anew (a good one stopped), each retry. Now only the
    failed call is made again (an index made then gets its alerts)."""
    async with streaming(make_context, tmp_path, on_active=FULL_ON_ACTIVE) as (live, emu, sid):
        s = live.ctl.manager.sessions[sid]
        failed = emu.fault("POST", fails, status=500, times=1)  # the re-bind's first such call
        await drop_ws(emu)
        await live.wait_for(lambda: failed.hits == 1)
        await live.wait_for(lambda: s.pipelines is not None and not s.pipelines.bind_failed and not s.lock.locked()
                            and s.pipelines.bound_to == live.ctl.context.session.connection_id)  # retried
        conn = s.pipelines.bound_to
        made = [c["path"].rsplit("/", 1)[-1] for c in list(emu.calls) if c["method"] == "POST"
                and (c.get("body") or {}).get("ws_connection_id") == conn]
        audio = len([r for r in s.record["rtstreams"] if "audio" in r["media_types"]])
        video = len([r for r in s.record["rtstreams"] if "video" in r["media_types"]])
        # (the failed call is not among them: the emulator does not read the body of a request it fails)
        assert sorted(made) == sorted(["transcription"] * audio + ["scene"] * (audio + video) + ["alert"] * video)
