"""A dropped connection loses nothing VideoDB keeps: no resend, reconnect at once, backfill over the SDK.

Real parts only: the real videodb SDK against the emulator, real `pipeline run`
and `pipeline emulate` processes, a real WebSocket server on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import videodb
import websockets
import yaml

from pipeline.api import Context
from pipeline.emulator import Emulator
from pipeline.session import SessionLink
from stages.sources.websocket import WebSocketSource
from tests.backfill_checks import key, produced, tracked
from tests.videodb_harness import API_KEY, FULL_ON_ACTIVE, make_stages, run_stages, scenario_file

REPO = Path(__file__).resolve().parents[1]
PIPELINE = Path(sys.executable).parent / "pipeline"


async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)


def run_config(tmp_path: Path, base_url: str, **controller: Any) -> Path:
    cfg = {
        "name": "backfill",
        "videodb": {"api_key": "${VIDEO_DB_API_KEY}", "base_url": base_url},
        "source": {"type": "videodb"},
        "controller": {"type": "capture_session", "end_user_id": "u", "state_dir": str(tmp_path / "state"),
                       "on_active": FULL_ON_ACTIVE, **controller},
        "sinks": [{"type": "jsonl", "path": str(tmp_path / "events.jsonl")}],
        "dead_letter": str(tmp_path / "dead-letter.jsonl"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


async def pipeline_run(config: Path, timeout: float) -> tuple[int, str, float]:
    env = {**os.environ, "VIDEO_DB_API_KEY": API_KEY}
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(str(PIPELINE), "run", str(config), cwd=config.parent, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"pipeline run still going after {timeout}s") from None
    assert proc.returncode is not None
    return proc.returncode, (out + err).decode(), time.monotonic() - t0


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def written(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]


# --- the emulator: no resend, everything over REST -------------------------------------------------

async def _session_with_pipelines(emu: Emulator) -> tuple[Any, Any, Any, Any, Any]:
    conn = videodb.connect(api_key="k", base_url=emu.base_url)
    ws = await (await call(conn.connect_websocket)).connect()
    session = await call(conn.create_capture_session, "u", ws_connection_id=ws.connection_id)
    while (await call(conn.get_capture_session, session.id)).status != "active":
        await asyncio.sleep(0.02)
    s = await call(conn.get_capture_session, session.id)
    mic, screen = s.get_rtstream("mic")[0], s.get_rtstream("screen")[0]
    await call(mic.start_transcript, ws_connection_id=ws.connection_id)
    visual = await call(screen.index_visuals, prompt="p", ws_connection_id=ws.connection_id)
    audio = await call(mic.index_audio, prompt="p", ws_connection_id=ws.connection_id)
    return ws, mic, visual, audio, session


async def test_rest_returns_every_produced_record_in_pages_through_the_sdk() -> None:
    emu = Emulator(speed=0, drop_after=3)
    await emu.start()
    try:
        ws, mic, visual, audio, _ = await _session_with_pipelines(emu)
        await asyncio.wait_for(emu.wait_finished(), 20)
        await ws.close()
        made = [r for r in emu.emitted if tracked(r["event"])]
        assert any(not r["live"] for r in made)  # the socket dropped: most were never sent
        for channel, rid, read in (("transcript", mic.id, None), ("visual_index", visual.rtstream_id, visual),
                                   ("audio_index", audio.rtstream_id, audio)):
            want = [r["event"]["data"] for r in made
                    if r["event"]["channel"] == channel and r["event"]["rtstream_id"] == rid]
            assert len(want) > 3
            got: list[dict[str, Any]] = []
            for page in range(1, 100):
                if read is None:
                    resp = await call(mic.get_transcript, page=page, page_size=3)
                    got += resp["segments"]
                    more = resp["next_page"]
                else:
                    resp = await call(read.get_scenes, page=page, page_size=3)
                    got += resp["scenes"]
                    more = resp["next_page"]
                if not more:
                    break
            assert got == want, channel
            cut = want[len(want) // 2]["start"]  # start/end filters (get_scenes sends both or neither)
            if read is None:
                resp = await call(mic.get_transcript, start=cut, page_size=1000)
                assert resp["segments"] == [d for d in want if d["start"] >= cut]
                resp = await call(mic.get_transcript, since=cut, page_size=1000)
                assert resp["segments"] == [d for d in want if d["start"] > cut]
            else:
                resp = await call(read.get_scenes, start=cut, end=cut + 10**9, page_size=1000)
                assert resp["scenes"] == [d for d in want if d["start"] >= cut] and resp["next_page"] is False
        listed = await call(get_json, emu.base_url + "/_emulator/events")
        assert len(listed) == len(emu.emitted)
        first = next(x for x in listed if x["channel"] == "transcript")
        assert set(first) >= {"rtstream_id", "channel", "start", "text", "live"}
        assert Counter(x["live"] for x in listed)[True] == emu.hub.delivered
    finally:
        await emu.stop()


@pytest.mark.parametrize("queue_on_drop", [False, True])
async def test_events_for_a_dropped_connection_are_not_resent_unless_queue_on_drop(queue_on_drop: bool) -> None:
    emu = Emulator(speed=0, drop_after=2, queue_on_drop=queue_on_drop)
    await emu.start()
    try:
        ws, mic, _visual, _audio, _ = await _session_with_pipelines(emu)
        await asyncio.wait_for(emu.wait_finished(), 20)
        await ws.close()
        conn = videodb.connect(api_key="k", base_url=emu.base_url)
        ws2 = await (await call(conn.connect_websocket)).connect()
        await call(mic.start_transcript, ws_connection_id=ws2.connection_id)  # re-bind
        got: list[dict[str, Any]] = []
        try:
            async with asyncio.timeout(1.0):
                async for msg in ws2.receive():
                    got.append(msg)
        except (TimeoutError, websockets.ConnectionClosed):
            pass
        await ws2.close()
        missed = [r for r in emu.emitted if r["event"].get("channel") == "transcript" and not r["live"]]
        assert missed
        if queue_on_drop:  # the new connection inherits what the old one missed
            assert len(got) == 2 and emu.hub.undelivered == 0
        else:
            assert got == [] and emu.hub.undelivered > 0
    finally:
        await emu.stop()


def test_cli_has_queue_on_drop() -> None:
    out = subprocess.run([sys.executable, "-m", "pipeline.emulator.cli", "--help"], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True).stdout
    assert "--queue-on-drop" in out


# --- reconnect at once ---------------------------------------------------------------------------

async def test_websocket_source_reopens_a_connection_that_delivered_at_once(
        make_context: Callable[..., Context], caplog: pytest.LogCaptureFixture) -> None:
    accepted: list[float] = []
    closed: list[float] = []

    async def serve(ws: Any) -> None:
        accepted.append(time.monotonic())
        await ws.send(json.dumps({"channel": "transcript", "data": {"text": "hi", "start": len(accepted)}}))
        if len(accepted) <= 3:  # one event, then an abnormal close
            await asyncio.sleep(0.05)
            closed.append(time.monotonic())
            await ws.close(code=1012)
        else:
            await ws.wait_closed()

    async with websockets.serve(serve, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        ctx = make_context("source:websocket", session=SessionLink())
        src = WebSocketSource(WebSocketSource.Options.model_validate(
            {"url": f"ws://127.0.0.1:{port}", "backoff_initial": 5}), ctx)
        got: list[dict[str, Any]] = []

        async def read() -> None:
            async for batch in src.batches():
                got.extend(batch)

        task = asyncio.create_task(read())
        try:
            async with asyncio.timeout(4):  # with a 5 s backoff, only an immediate reconnect gets here
                while len(got) < 4:
                    await asyncio.sleep(0.01)
        finally:
            await src.stop()
            await task
    gaps = [a - c for c, a in zip(closed, accepted[1:], strict=False)]
    assert len(gaps) == 3 and max(gaps) < 1.0, gaps
    assert len(got) == 4
    assert ctx.session.gaps.reconnects == 3 and 0 < ctx.session.gaps.gap_seconds < 3.0
    logged = [r.getMessage() for r in caplog.records if ": reconnected" in r.getMessage()]
    assert len(logged) == 3 and all(re.search(r"reconnected after a 0\.\d{3}s gap$", m) for m in logged), logged


async def test_websocket_source_backs_off_when_a_connection_delivered_nothing(
        make_context: Callable[..., Context]) -> None:
    accepted: list[float] = []

    async def serve(ws: Any) -> None:
        accepted.append(time.monotonic())
        await ws.close(code=1012)  # accepts and drops at once: a flapping server

    async with websockets.serve(serve, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        src = WebSocketSource(WebSocketSource.Options.model_validate(
            {"url": f"ws://127.0.0.1:{port}", "backoff_initial": 0.3}), make_context("source:websocket"))

        async def read() -> None:
            async for _ in src.batches():
                pass

        task = asyncio.create_task(read())
        await asyncio.sleep(1.0)
        await src.stop()
        await task
    assert 2 <= len(accepted) <= 4  # 0.3 s, then 0.6 s: not hammered
    assert all(b - a >= 0.2 for a, b in itertools.pairwise(accepted))


@pytest.mark.parametrize("greets", [True, False], ids=["greeting", "silent"])
async def test_a_quiet_connection_that_stayed_up_is_not_a_failed_reconnect(
        make_context: Callable[..., Context], greets: bool) -> None:
    """Before a meeting starts a connection can be quiet for a long time. One that stayed open longer than
    backoff_max and then dropped was counted as a failed reconnect: delays grew and `max_retries` quiet drops
    ended the run ("gave up"). Now its drop waits backoff_initial and never counts toward max_retries."""
    accepted: list[float] = []
    closed: list[float] = []

    async def serve(ws: Any) -> None:
        accepted.append(time.monotonic())
        if greets:  # as VideoDB does; a plain server may send nothing before its first event
            await ws.send(json.dumps({"connection_id": f"conn-{len(accepted)}"}))
        await asyncio.sleep(0.4)  # up and healthy, no event yet, then a server restart
        closed.append(time.monotonic())
        await ws.close(code=1012)

    async with websockets.serve(serve, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        src = WebSocketSource(WebSocketSource.Options.model_validate(
            {"url": f"ws://127.0.0.1:{port}", "backoff_initial": 0.05, "backoff_max": 0.3, "max_retries": 2}),
            make_context("source:websocket"))

        async def read() -> None:
            async for _ in src.batches():
                pass

        task = asyncio.create_task(read())
        while len(accepted) < 5 and not task.done():
            await asyncio.sleep(0.02)
        await src.stop()
        await task  # before: StageError "gave up after 2 reconnect attempts: connection keeps dropping"
    waits = [a - c for c, a in zip(closed, accepted[1:], strict=False)]
    assert len(waits) >= 4 and max(waits) < 0.2, waits  # backoff_initial each time, not 0.1, 0.2, 0.3 ...


async def test_drop_to_rebind_under_a_second(make_context: Callable[..., Context], tmp_path: Path) -> None:
    events = [{"at": 0.2 * i, "channel": "transcript", "rtstream": "mic:default", "text": f"t{i}"}
              for i in range(1, 40)]
    emu = Emulator(scenario_file(tmp_path, events, end=8.2), speed=4, drop_after=5)
    await emu.start()
    try:
        src, ctl = make_stages(make_context, emu, source={"backoff_initial": 5},
                               controller={"end_user_id": "u", "on_active": {"transcript": True}})
        await run_stages(src, ctl, timeout=30)
    finally:
        await emu.stop()
    binds = [c for c in emu.calls if c["method"] == "POST" and c["path"].endswith("/transcription")]
    assert emu.hub.drop_times
    for dropped in emu.hub.drop_times:
        later = [c["at"] - dropped for c in binds if c["at"] > dropped]
        if later:  # (the last drop may come after the session ended)
            assert later[0] < 1.0, later[0]
    assert len([d for d in emu.hub.drop_times if any(c["at"] > d for c in binds)]) >= 2


# --- backfill ----------------------------------------------------------------------------------------

async def test_backfill_comes_before_the_new_connections_events(
        make_context: Callable[..., Context], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    events = [{"at": 0.1 * i, "channel": "transcript", "rtstream": "mic:default", "text": f"t{i}"}
              for i in range(1, 200)]
    caplog.set_level(logging.INFO, logger="pipeline.backfill")
    emu = Emulator(scenario_file(tmp_path, events, end=20.1), speed=5, drop_after=10)
    await emu.start()
    try:
        src, ctl = make_stages(make_context, emu, controller={"end_user_id": "u", "on_active": {"transcript": True}})
        run = await run_stages(src, ctl, timeout=30)
    finally:
        await emu.stop()
    got = [e for e in run.events if e.get("channel") == "transcript"]
    assert Counter(map(key, got)) == Counter(map(key, filter(tracked, produced(emu))))
    # every event that did not go out live came by backfill (how many a drop loses depends on timing)
    missed = Counter(map(key, (r["event"] for r in emu.emitted if tracked(r["event"]) and not r["live"])))
    assert not missed - Counter(map(key, (e for e in got if e.get("backfill")))) and emu.hub.drops >= 5
    starts = [e["data"]["start"] for e in got]
    assert starts == sorted(starts)  # held live events wait for the backfill: event-time order across gaps
    # each backfill is logged per channel; the counts add up to what was backfilled
    logged = [re.search(r"backfill after re-bind to ws-\w+: (?:transcript (\d+)|nothing missing) \(", r.getMessage())
              for r in caplog.records if "backfill after re-bind" in r.getMessage()]
    assert logged and all(logged)
    came_by_backfill = sum(1 for e in got if e.get("backfill"))  # 0 when no drop happened to lose one
    assert sum(int(m.group(1) or 0) for m in logged if m) == src.context.session.gaps.backfilled.get(
        "transcript", 0) == came_by_backfill


def mic_transcripts(n: int) -> list[dict[str, Any]]:
    """Scenario cues: `n` transcripts on the mic, 0.1 s apart."""
    return [{"at": 0.1 * i, "channel": "transcript", "rtstream": "mic:default", "text": f"t{i}"}
            for i in range(1, n + 1)]


async def streaming_single(make_context: Callable[..., Context], emu: Emulator, poll: float, live: int,
                           seen: list[dict[str, Any]] | None = None,
                           source: dict[str, Any] | None = None) -> tuple[Any, asyncio.Task[Any]]:
    """(controller, run task): one session with its transcripts bound, status polled every `poll` s, running
    until `live` events went out live; `seen` gets every batch the controller observes, as it comes; `source`:
    source options."""
    src, ctl = make_stages(make_context, emu, source=source, controller={
        "end_user_id": "u", "status_poll_interval": poll, "on_active": {"transcript": True}})
    assert ctl is not None
    if seen is not None:
        observe = ctl.observe
        ctl.observe = lambda batch: (seen.extend(batch), observe(batch))[1]  # type: ignore[method-assign]
    run_task = asyncio.create_task(run_stages(src, ctl, timeout=30))
    while len([r for r in emu.emitted if r["live"]]) < live:
        await asyncio.sleep(0.02)
    return ctl, run_task


async def test_a_re_bind_call_that_failed_is_tried_again_and_its_gap_backfilled_single_session(
        make_context: Callable[..., Context], tmp_path: Path) -> None:
    """After a drop, the re-bind's start_transcript got a VideoDB 500: the controller counted the pipeline as
    bound to the new connection all the same, so transcripts kept going to the dead one, and with the connection
    up nothing fetched them until the session ended (hours later in a meeting: its alerts that late). Now a bind
    with a failed call is tried again every status_poll_interval, then backfilled, while the session runs."""
    emu = Emulator(scenario_file(tmp_path, mic_transcripts(59), end=6.1), speed=1)
    await emu.start()
    try:
        seen: list[dict[str, Any]] = []
        _ctl, run_task = await streaming_single(make_context, emu, 0.5, 10, seen)
        failed = emu.fault("POST", "/transcription", status=500, times=1)
        await emu.hub.drop()
        while failed.hits < 1:
            await asyncio.sleep(0.02)
        await asyncio.sleep(2.0)  # the retry comes after status_poll_interval (0.5 s)
        due = Counter(map(key, filter(tracked, produced(emu))))
        await asyncio.sleep(1.0)
        got_by_then = Counter(map(key, filter(tracked, seen)))
        assert not run_task.done()  # still streaming: what arrived so far came while the session ran
        run = await run_task
    finally:
        await emu.stop()
    assert [r for r in emu.emitted if not r["live"] and tracked(r["event"])]  # some went to the dead connection
    assert not due - got_by_then
    assert not Counter(map(key, filter(tracked, produced(emu)))) - Counter(map(key, filter(tracked, run.events)))


async def test_a_bind_retry_does_not_bind_a_session_videodb_stopped_meanwhile_single_session(
        make_context: Callable[..., Context], tmp_path: Path) -> None:
    """A re-bind whose start_transcript kept failing was tried again every status_poll_interval until the session
    was done: once VideoDB stopped it (exit_on: exported, the export awaited), the next retry started transcripts
    on its stopped rtstreams. Now a failed bind is retried only while the session is active."""
    emu = Emulator(scenario_file(tmp_path, mic_transcripts(29), end=3.0), speed=3, export_outcome="never")
    await emu.start()
    try:
        ctl, run_task = await streaming_single(make_context, emu, 0.2, 5)
        failed = emu.fault("POST", "/transcription", status=500)
        await emu.hub.drop()
        while failed.hits < 4 or ctl.lifecycle.state != "stopped":  # retried, then VideoDB stopped it
            assert not run_task.done()
            await asyncio.sleep(0.02)
        emu.faults.clear()
        stopped_at = time.monotonic()
        await asyncio.sleep(1.0)  # five status_poll_intervals: retries would have come
        run_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run_task
    finally:
        await emu.stop()
    assert [c["path"] for c in list(emu.calls) if c["at"] > stopped_at and c["method"] == "POST"
            and "/transcription" in c["path"] and (c.get("body") or {}).get("action") == "start"] == []


async def test_a_reconnect_does_not_re_bind_a_session_videodb_stopped_meanwhile_single_session(
        make_context: Callable[..., Context], tmp_path: Path) -> None:
    """The WebSocket down, VideoDB stopped the session (the status poll saw it; exit_on: exported, the export
    awaited): the reconnect re-bound it all the same, starting transcripts on its stopped rtstreams. Now only
    the gap is backfilled."""
    emu = Emulator(scenario_file(tmp_path, mic_transcripts(290), end=30.0), speed=3, export_outcome="never")
    await emu.start()
    try:
        seen: list[dict[str, Any]] = []
        ctl, run_task = await streaming_single(make_context, emu, 0.2, 3, seen, source={"backoff_max": 0.05})
        link, pipes = ctl.context.session, ctl.pipelines
        first = link.connection_id
        await emu.hub.drop()  # a first reconnect: the status poll runs from now on
        while pipes.bound_to in (None, first):
            await asyncio.sleep(0.02)
        second = link.connection_id
        refused = emu.fault("GET", "/websocket", status=500)  # no reconnect for now
        await emu.hub.drop()
        lost = len([r for r in emu.emitted if not r["live"]])
        while len([r for r in emu.emitted if not r["live"]]) < lost + 2:  # produced for nobody
            await asyncio.sleep(0.02)
        async with aiohttp.ClientSession() as http, \
                http.post(f"{emu.base_url}/_emulator/sessions/{ctl.session_id}/stop") as r:
            assert r.status == 200
        while ctl.lifecycle.state != "stopped":  # polled
            assert not run_task.done()
            await asyncio.sleep(0.02)
        emu.faults.remove(refused)
        while link.connection_id in (None, second):
            await asyncio.sleep(0.02)
        last, want = link.connection_id, Counter(map(key, filter(tracked, produced(emu))))
        while want - Counter(map(key, filter(tracked, seen))):  # the gap, backfilled
            assert not run_task.done()
            await asyncio.sleep(0.02)
        run_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run_task
    finally:
        await emu.stop()
    assert [c["path"] for c in list(emu.calls) if c["method"] == "POST"
            and (c.get("body") or {}).get("ws_connection_id") == last] == []


async def test_a_rate_limited_bind_retry_waits_for_retry_after_single_session(
        make_context: Callable[..., Context], tmp_path: Path) -> None:
    """A re-bind VideoDB rate-limited (429, Retry-After: 30) was tried again every status_poll_interval (0.2 s
    here) all the same; now the retry waits what VideoDB asked."""
    emu = Emulator(scenario_file(tmp_path, mic_transcripts(29), end=30.0), speed=1)
    await emu.start()
    try:
        ctl, run_task = await streaming_single(make_context, emu, 0.2, 3)
        pipes = ctl.pipelines
        assert pipes is not None
        while pipes.bound_to is None:  # the first bind done (on a loaded machine it can still be under way)
            await asyncio.sleep(0.02)
        old = pipes.bound_to
        limited = emu.fault("POST", "/transcription", status=429, headers={"Retry-After": "30"})
        await emu.hub.drop()
        while not (pipes.bind_failed and pipes.bound_to not in (None, old)
                   and pipes.bound_to == ctl.context.session.connection_id):
            assert not run_task.done()
            await asyncio.sleep(0.02)
        first = limited.hits  # the re-bind's start_transcript calls
        await asyncio.sleep(1.0)  # five status_poll_intervals
        run_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run_task
    finally:
        await emu.stop()
    assert limited.hits == first


async def test_backfill_false_fetches_nothing_and_the_gap_stays_lost(make_context: Callable[..., Context]) -> None:
    emu = Emulator(speed=0, drop_after=5)
    await emu.start()
    try:
        src, ctl = make_stages(make_context, emu, source={"backfill": False},
                               controller={"end_user_id": "u", "on_active": {"transcript": True},
                                           "status_poll_interval": "300ms"})
        run = await run_stages(src, ctl, timeout=30)
    finally:
        await emu.stop()
    assert emu.hub.drops >= 1 and emu.hub.undelivered > 0
    assert not any(e.get("backfill") for e in run.events) and not src.context.session.gaps.backfilled
    assert not [c for c in emu.calls if c["method"] == "GET" and c["path"].endswith("/transcription")]
    live = [r["event"] for r in emu.emitted if tracked(r["event"]) and r["live"]]
    assert Counter(map(key, filter(tracked, run.events))) == Counter(map(key, live))  # only what went out live


def test_inlet_dedupes_both_ways_and_orders_backfill_by_event_time() -> None:
    from stages.sources.inlet import Inlet

    woke: list[int] = []
    inlet = Inlet(lambda: woke.append(1))

    def ev(start: int, text: str, **kw: Any) -> dict[str, Any]:
        return {"channel": "transcript", "rtstream_id": "r", "data": {"start": start, "text": text}, **kw}

    assert inlet.admit([ev(1, "a"), {"event": "capture_session.active"}, ev(2, "b")]) == \
        [ev(1, "a"), {"event": "capture_session.active"}, ev(2, "b")]
    inlet.mark_gap([ev(3, "c")])  # received, not yet yielded: precedes the gap too
    assert inlet.since("r", "transcript") == 3
    inlet.inject([ev(5, "e", backfill=True), ev(3, "c", backfill=True), ev(4, "d", backfill=True)])
    assert woke and inlet.queued
    batch = inlet.take()
    assert batch is not None and [e["data"]["start"] for e in batch] == [3, 4, 5]
    assert inlet.admit(batch) == batch  # "c" is only pending, not seen yet: the live copy will be dropped
    assert inlet.admit([ev(3, "c"), ev(6, "f")]) == [ev(6, "f")]  # the live copy of a backfilled event
    assert inlet.admit([ev(6, "f", backfill=True), ev(2, "b", backfill=True)]) == []
    assert inlet.admit([ev(2, "b")]) == [ev(2, "b")]  # a live repeat of a live event is not ours to drop
    assert inlet.backfilled == Counter({"transcript": 3}) and inlet.duplicates == 3
    inlet.covered("r", "transcript", 3)
    assert inlet.since("r", "transcript") == 6


def test_a_flood_of_rtstream_ids_keeps_the_dedupe_keys_bounded_in_all_and_a_busy_channel_still_dedupes() -> None:
    """Keys were bounded per rtstream and channel only (4,096, times up to 100,000 channels: hundreds of
    millions of keys from a peer that invents rtstream ids). Now they are bounded in all: the channels that
    went longest without a new event lose their keys first, and a busy channel keeps deduplicating."""
    from stages.sources.inlet import MAX_KEYS, Inlet

    inlet = Inlet()
    t0 = 1_700_000_000_000

    def ev(rid: str, start: int, text: str, **kw: Any) -> dict[str, Any]:
        return {"channel": "transcript", "rtstream_id": rid, "data": {"start": start, "text": text}, **kw}

    inlet.admit([ev("quiet", t0, "first words")])
    most = 0
    for n in range(20):  # 20,000 invented rtstreams x 20 events each, all inside the 30 s dedupe window
        for first in range(0, 20_000, 1000):
            batch = [ev(f"x-{i}", t0 + n, f"flood {n}") for i in range(first, first + 1000)]
            inlet.admit([*batch, ev("busy", t0 + n * 1000 + first, f"busy {n} {first}")])
            assert inlet.keys_held <= MAX_KEYS
            most = max(most, inlet.keys_held)
        held = sum(len(s.keys) for s in inlet._seen.values())  # the keys themselves, not only the count
        assert held == inlet.keys_held and all(len(s) == len(s.keys) for s in inlet._seen.values())
    assert MAX_KEYS // 2 < most <= MAX_KEYS  # 400,000 keys came in; the bound held them
    dup = ev("busy", t0 + 19_000 + 19_000, "busy 19 19000", backfill=True)
    assert inlet.known(dup) and inlet.admit([dup]) == []  # the busy channel still drops a backfilled copy
    assert not inlet.known(ev("quiet", t0, "first words"))  # the quiet one's keys went first ...
    inlet.mark_gap()
    assert inlet.since("quiet", "transcript") == t0  # ... its gap mark did not
    inlet.forget(["busy"])
    assert inlet.keys_held == sum(len(s.keys) for s in inlet._seen.values())


def test_a_hold_keeps_back_only_new_live_events_and_lasts_at_most_hold_max(monkeypatch: pytest.MonkeyPatch) -> None:
    """While a re-bind and backfill run, the new connection's events wait; after HOLD_MAX they go on anyway."""
    from stages.sources import inlet as inlet_module
    from stages.sources.inlet import HOLD_MAX, Inlet

    now = [1000.0]
    monkeypatch.setattr(inlet_module.time, "monotonic", lambda: now[0])
    accepted = [2]  # two events of the old connection are pending when the hold starts
    woke: list[int] = []
    inlet = Inlet(lambda: woke.append(1), position=lambda: accepted[0])
    inlet.hold()
    accepted[0] = 5  # the new connection delivered three more
    assert inlet.releasable(5) == 2  # the old connection's two may go, the new three wait
    inlet.hold()  # a second re-bind overlaps the first: one release is not enough
    inlet.release()
    assert inlet.releasable(5) == 2 and not woke
    inlet.release()
    assert inlet.releasable(5) == 5 and woke == [1]
    inlet.hold()
    accepted[0] = 9
    now[0] += HOLD_MAX - 0.1
    assert inlet.releasable(9) == 5
    now[0] += 0.2  # the backfill is too slow: live events go on, the hold is over
    assert inlet.releasable(9) == 9 and inlet.hold_from is None


async def test_drop_after_5_at_speed_every_event_once_and_on_time(tmp_path: Path) -> None:
    speed = 8.0
    emu = Emulator(speed=speed, api_key=API_KEY, drop_after=5)
    await emu.start()
    try:
        code, output, took = await pipeline_run(run_config(tmp_path, emu.base_url, status_poll_interval="1s"), 60)
    finally:
        await emu.stop()
    assert code == 0, output
    assert "ended: capture session exported" in output and "Traceback" not in output
    events = written(tmp_path)
    want = Counter(map(key, filter(tracked, produced(emu))))
    got = Counter(map(key, filter(tracked, events)))
    assert got == want  # every transcript, visual and audio event exactly once, live or backfilled
    missed = [r["event"] for r in emu.emitted if tracked(r["event"]) and not r["live"]]
    # what never went out live came by backfill (so may some that did: a held live copy yields to its twin).
    # How much a drop misses here depends on timing (a busy machine may re-bind before the next event);
    # the speed-0 test below always misses events and proves they come back by backfill.
    assert not Counter(map(key, missed)) - Counter(map(key, (e for e in events if e.get("backfill"))))
    assert emu.hub.drops >= 5 and "reconnects: " in output
    # the scenario plays 76 s of meeting and ~5 s of stop/export: at 8x about 10 s, plus start-up
    assert took < (76 + 5) / speed + 8, took


async def test_polled_exported_does_not_cut_the_stream(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    emu = subprocess.Popen([str(PIPELINE), "emulate", "--speed", "0", "--drop-after", "7", "--garbage-every", "3",
                            "--api-key", API_KEY], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                           env=env, cwd=tmp_path)
    try:
        assert emu.stdout is not None
        url = emu.stdout.readline().strip().split("=", 1)[1]
        code, output, _ = await pipeline_run(run_config(tmp_path, url, status_poll_interval="1s"), 60)
        listed = get_json(url + "/_emulator/events")
    finally:
        emu.terminate()
        emu.wait(10)
    assert code == 0, output
    assert "ended: capture session exported" in output
    made = [x for x in listed if x["channel"] in ("transcript", "visual_index", "audio_index")]
    assert len(made) > 50
    events = written(tmp_path)
    assert Counter(map(key, filter(tracked, events))) == Counter(
        (x["rtstream_id"], x["channel"], x["start"], x["text"]) for x in made)
    not_live = Counter((x["rtstream_id"], x["channel"], x["start"], x["text"]) for x in made if not x["live"])
    assert not_live and not not_live - Counter(map(key, (e for e in events if e.get("backfill"))))


async def test_kill_9_then_restart_backfills_what_the_dead_run_missed(tmp_path: Path) -> None:
    emu = Emulator(speed=6, api_key=API_KEY)  # the 76 s scenario in ~13 s: time to kill and restart
    await emu.start()
    config = run_config(tmp_path, emu.base_url, status_poll_interval="300ms")
    env = {**os.environ, "VIDEO_DB_API_KEY": API_KEY}
    log = tmp_path / "run.log"
    try:
        with log.open("ab") as err:
            first = await asyncio.create_subprocess_exec(str(PIPELINE), "run", str(config), cwd=tmp_path, env=env,
                                                         stdout=err, stderr=err)
        try:
            async with asyncio.timeout(30):  # past a checkpoint (every 2 s), mid-session
                while "backfill_from" not in (tmp_path / "state" / "capture_session.json").read_text() \
                        if (tmp_path / "state" / "capture_session.json").exists() else True:
                    await asyncio.sleep(0.05)
        finally:
            first.kill()
            await first.wait()
        await asyncio.sleep(1.0)  # events produced now go to a dead connection
        before = len(written(tmp_path))
        code, output, _ = await pipeline_run(config, 60)
    finally:
        await emu.stop()
    assert code == 0, output
    assert "resuming capture session" in output
    events = written(tmp_path)
    want = Counter(map(key, filter(tracked, produced(emu))))
    got = Counter(map(key, filter(tracked, events)))
    missing = sorted((want - got).elements())
    assert not missing, (missing, before)  # nothing produced is missing, though the first run died mid-session
    twice = got - want
    assert not twice - Counter(map(key, filter(tracked, events[:before])))  # only across the crash
    assert any(e.get("backfill") for e in events[before:])
