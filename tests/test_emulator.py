"""The emulator against the real videodb SDK: sessions, routing, faults, auth, CLI, scenarios."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import videodb
import websockets
from videodb.exceptions import AuthenticationError, InvalidRequestError

from pipeline.emulator import Emulator
from pipeline.emulator import scenario as sc
from pipeline.emulator.sample import SAMPLE, recorded_session
from pipeline.errors import StageError

REPO = Path(__file__).resolve().parents[1]
EXPORTED = "capture_session.exported"


def kind(ev: dict[str, Any]) -> str:
    return str(ev.get("channel") or ev.get("event") or ("raw" if "raw" in ev else "?"))


async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """The SDK is synchronous: run it off the loop, like the controller does."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def receive_until(ws: Any, stop: str = EXPORTED, into: list[dict[str, Any]] | None = None,
                        timeout: float = 20) -> list[dict[str, Any]]:
    got = [] if into is None else into

    async def loop() -> None:
        async for msg in ws.receive():
            got.append(msg)
            if kind(msg) == stop:
                return

    await asyncio.wait_for(loop(), timeout)
    return got


async def open_session(emu: Emulator) -> tuple[Any, Any, Any]:
    """(SDK connection, its WebSocket, a capture session bound to it): the start of most tests here."""
    conn = videodb.connect(api_key="k", base_url=emu.base_url)
    ws = await (await call(conn.connect_websocket)).connect()
    session = await call(conn.create_capture_session, "u", ws_connection_id=ws.connection_id)
    return conn, ws, session


@pytest.fixture
async def emu() -> Any:
    e = Emulator(speed=0)
    await e.start()
    yield e
    await e.stop()


# --- scenario and sample ---------------------------------------------------------------------------
def test_shipped_scenario_is_realistic_and_sample_matches_it() -> None:
    scn = sc.load()
    counts = scn.counts()
    assert counts["transcript"] >= 35 and counts["visual_index"] >= 18 and counts["audio_index"] >= 8
    assert counts["alert"] >= 3
    assert {c.is_final for c in scn.cues if c.channel == "transcript"} == {True, False}
    visual = [c.text for c in scn.cues if c.channel == "visual_index"]
    assert any(isinstance(_json_or_none(t), dict) for t in visual)
    for word in ("code", "terminal", "slack", "password"):
        assert any(word in t.lower() for t in visual), word
    assert 60 <= scn.end <= 90
    assert [s.type for s in scn.streams] == ["mic", "system_audio", "screen"]

    lines = [json.loads(x) for x in SAMPLE.read_text().splitlines()]
    assert lines == recorded_session(scn), "sample drifted: run python -m pipeline.emulator.sample"
    assert 80 <= len(lines) <= 120
    assert [kind(e) for e in lines if "event" in e] == [f"capture_session.{s}" for s in (
        "created", "starting", "active", "stopping", "stopped", "exported")]
    assert all(e["ts"].endswith("Z") and isinstance(e["unix_ts"], float) for e in lines)
    assert [e["unix_ts"] for e in lines] == sorted(e["unix_ts"] for e in lines)


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def test_the_sample_rebuilder_takes_help_and_an_output_path_not_an_option_as_a_file(tmp_path: Path) -> None:
    """README: rebuild the sample with `python -m pipeline.emulator.sample`. Its one argument was taken as the
    output path whatever it was: `--help` wrote the 83 events to a file named `--help`."""
    def sample(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pipeline.emulator.sample", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=30)
    res = sample("--help")
    assert res.returncode == 0 and "usage:" in res.stdout and list(tmp_path.iterdir()) == [], res
    res = sample("--bogus")
    assert res.returncode == 2 and "Traceback" not in res.stderr and list(tmp_path.iterdir()) == [], res
    res = sample("out.jsonl")
    assert res.returncode == 0 and (tmp_path / "out.jsonl").read_bytes() == SAMPLE.read_bytes(), res


def test_the_readme_scenario_example_loads(tmp_path: Path) -> None:
    """The README's scenario example, as written (its events named a `display:1` it did not declare, so the
    emulator refused it: "`rtstream` 'display:1' is not one of the scenario's rtstreams")."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("```yaml\nname: my-meeting\n") + len("```yaml\n")
    (tmp_path / "s.yaml").write_text(readme[start:readme.index("```", start)])
    scn = sc.load(tmp_path / "s.yaml")
    assert [c.channel for c in scn.cues] == ["transcript", "visual_index", "alert", "capture_session.failed"]


def test_jsonl_scenario_with_seed_shaped_lines(tmp_path: Path) -> None:
    p = tmp_path / "s.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in [
        {"name": "tiny", "end": 5},
        {"at": 2, "channel": "scene_index", "rtstream_name": "display:1", "data": {"text": "a terminal"}},
        {"at": 1, "channel": "transcript", "rtstream": "mic:default", "text": "hi", "is_final": False},
        {"at": 3, "channel": "alert", "rtstream": "display:1", "data": {"event_label": "x", "text": "t"}},
    ]) + "\n")
    scn = sc.load(p)
    assert scn.name == "tiny" and scn.end == 5
    assert [(c.at, c.channel) for c in scn.cues] == [(1, "transcript"), (2, "visual_index"), (3, "alert")]
    assert scn.cues[0].is_final is False and scn.cues[2].label == "x"
    ev = sc.cue_event(scn, scn.cues[1], 1_000_000, "cap-1")
    assert ev["data"] == {"text": "a terminal", "start": 1_000_000, "end": 1_002_000}  # span clipped at 0


@pytest.mark.parametrize(("body", "needle"), [
    ("events: [{at: 1, channel: chat, rtstream: 'mic:default', text: x}]", "`channel` must be one of"),
    ("events: [{at: 1, channel: transcript, rtstream: 'cam:9', text: x}]", "not one of the scenario"),
    ("events: [{at: -1, channel: transcript, rtstream: 'mic:default', text: x}]", "`at`"),
    ("events: [{at: 1, channel: alert, rtstream: 'display:1', text: x}]", "needs a `label`"),
    ("events: [: bad", "invalid YAML"),
    ("name: nothing", "`events` list"),
])
def test_bad_scenarios_give_one_line_errors(tmp_path: Path, body: str, needle: str) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    with pytest.raises(StageError) as err:
        sc.load(p)
    assert needle in str(err.value) and str(p) in str(err.value) and "\n" not in str(err.value)


# --- a full session through the SDK ---------------------------------------------------------------
async def test_full_session_routes_only_started_pipelines(emu: Emulator) -> None:
    conn = videodb.connect(api_key="any-key", base_url=emu.base_url)
    ws = await (await call(conn.connect_websocket, "default")).connect()
    cid = ws.connection_id
    assert cid and cid.startswith("ws-")
    session = await call(conn.create_capture_session, end_user_id="demo-user", collection_id="default",
                         ws_connection_id=cid, metadata={"app": "tests"})
    assert session.id.startswith("cap-") and session.status == "created"
    token = await call(conn.generate_client_token, 600)
    assert isinstance(token, str) and token

    got = await receive_until(ws, "capture_session.active")
    assert [kind(e) for e in got] == ["capture_session.created", "capture_session.starting",
                                     "capture_session.active"]
    active = got[-1]
    assert active["capture_session_id"] == session.id and active["status"] == "active"
    assert active["data"]["rtstreams"] == [s.seed_shape() for s in emu.scenario.streams]

    live = await call(conn.get_capture_session, session.id)
    assert live.status == "active" and live.metadata == {"app": "tests"}
    mic, = live.get_rtstream("mic")
    screen, = live.get_rtstream("screen")
    assert len(live.get_rtstream("system_audio")) == 1
    assert (mic.name, screen.name) == ("mic:default", "display:1")
    await call(mic.start_transcript, ws_connection_id=cid)
    index = await call(screen.index_visuals, prompt="Describe the screen",
                       batch_config={"type": "time", "value": 2, "frame_count": 5},
                       model_name="basic", name="screen-idx", ws_connection_id=cid)
    assert index.rtstream_index_id and index.name == "screen-idx"
    event_id = await call(conn.create_event, "Detect Slack on screen", "slack_opened")
    alert_id = await call(index.create_alert, event_id, None, ws_connection_id=cid)
    assert alert_id

    rest = await receive_until(ws)
    kinds = Counter(kind(e) for e in rest)
    counts = emu.scenario.counts()
    mic_cues = [c for c in emu.scenario.cues if c.channel == "transcript" and c.stream == "mic:default"]
    assert kinds["transcript"] == len(mic_cues)
    assert {e["rtstream_name"] for e in rest if kind(e) == "transcript"} == {"mic:default"}
    assert kinds["visual_index"] == counts["visual_index"]
    assert "audio_index" not in kinds  # never started
    slack = [c for c in emu.scenario.cues if c.label == "slack_opened"]
    alerts = [e for e in rest if kind(e) == "alert"]
    assert len(alerts) == len(slack) >= 1
    assert alerts[0]["data"]["event_label"] == "slack_opened" and alerts[0]["data"]["alert_id"] == alert_id
    assert [kind(e) for e in rest if "event" in e] == ["capture_session.stopping", "capture_session.stopped",
                                                       EXPORTED]
    for e in rest:
        if kind(e) in ("transcript", "visual_index"):
            d = e["data"]
            assert isinstance(d["start"], int) and d["end"] >= d["start"] > 1_600_000_000_000
            assert e["rtstream_id"].startswith("rts-")
    assert all("is_final" in e["data"] for e in rest if kind(e) == "transcript")
    assert {e["data"]["is_final"] for e in rest if kind(e) == "transcript"} == {True, False}
    exported = rest[-1]["data"]
    assert exported["exported_video_id"] and exported["stream_url"].startswith("https://")
    assert exported["player_url"]
    await emu.wait_finished()
    assert (await call(conn.get_capture_session, session.id)).status == "exported"
    assert len(got) + len(rest) == len(emu.emitted)
    scenes = await call(index.get_scenes)
    assert [r["text"] for r in scenes["scenes"]] == [e["data"]["text"] for e in rest if kind(e) == "visual_index"]
    assert [i.rtstream_index_id for i in await call(screen.list_scene_indexes)] == [index.rtstream_index_id]
    assert [a["alert_id"] for a in await call(index.list_alerts)] == [alert_id]
    export = await call(live.export)
    assert export["export_status"] == "exported" and export["video_id"] == exported["exported_video_id"]
    assert (await call(mic.stop_transcript))["status"] == "stopped"

    calls: dict[tuple[str, str], Any] = {}
    for c in emu.calls:  # first call per endpoint
        calls.setdefault((c["method"], c["path"]), c["body"])
    assert calls[("POST", "/collection/default/capture/session")] == {
        "end_user_id": "demo-user", "ws_connection_id": cid, "metadata": {"app": "tests"}}
    assert calls[("POST", "/capture/session/token")] == {"expires_in": 600}
    assert calls[("POST", f"/rtstream/{mic.id}/transcription")] == {"action": "start", "ws_connection_id": cid}
    vis = calls[("POST", f"/rtstream/{screen.id}/index/scene")]
    assert vis["prompt"] == "Describe the screen" and vis["ws_connection_id"] == cid
    assert vis["extraction_config"] == {"time": 2, "frame_count": 5} and vis["model_name"] == "basic"
    assert calls[("POST", "/rtstream/event")] == {"event_prompt": "Detect Slack on screen",
                                                  "label": "slack_opened"}
    assert calls[("POST", f"/rtstream/{screen.id}/index/{index.rtstream_index_id}/alert")] == {
        "event_id": event_id, "callback_url": None, "ws_connection_id": cid}
    await ws.close()


async def test_drop_after_reconnect_and_rebind_lose_nothing() -> None:
    emu = Emulator(speed=0, drop_after=7, garbage_every=5, queue_on_drop=True)
    await emu.start()
    try:
        conn = videodb.connect(api_key="k", base_url=emu.base_url)
        received: list[dict[str, Any]] = []
        ids: list[str] = []
        session: Any = None
        pipes: dict[str, Any] = {}
        while not received or kind(received[-1]) != EXPORTED:
            ws = await (await call(conn.connect_websocket)).connect()
            ids.append(ws.connection_id)
            if session is None:
                session = await call(conn.create_capture_session, "u", ws_connection_id=ws.connection_id)
            elif pipes:  # re-bind everything to the new connection id, then retire the old index
                old = pipes["index"]
                await call(pipes["mic"].start_transcript, ws_connection_id=ws.connection_id)
                pipes["index"] = await call(pipes["screen"].index_visuals, prompt="p",
                                            ws_connection_id=ws.connection_id)
                await call(pipes["index"].create_alert, pipes["event"], None, ws_connection_id=ws.connection_id)
                await call(old.stop)
            try:
                async for msg in ws.receive():
                    received.append(msg)
                    if kind(msg) == "capture_session.active" and not pipes:
                        s = await call(conn.get_capture_session, session.id)
                        pipes["mic"], pipes["screen"] = s.get_rtstream("mic")[0], s.get_rtstream("screen")[0]
                        await call(pipes["mic"].start_transcript, ws_connection_id=ws.connection_id)
                        pipes["index"] = await call(pipes["screen"].index_visuals, prompt="p",
                                                    ws_connection_id=ws.connection_id)
                        pipes["event"] = await call(conn.create_event, "code?", "code_on_screen")
                        await call(pipes["index"].create_alert, pipes["event"], None,
                                   ws_connection_id=ws.connection_id)
                    if kind(msg) == EXPORTED:
                        break
            except websockets.ConnectionClosed:
                pass
            await ws.close()
            assert len(ids) < 60
        events = [e for e in received if "raw" not in e]
        garbage = [e for e in received if "raw" in e]
        assert len(ids) >= 3 and emu.hub.drops == len(ids) - 1
        assert garbage and all("not JSON" in g["raw"] for g in garbage)
        assert len(garbage) == emu.hub.garbage_sent
        emitted = [e["event"] for e in emu.emitted]
        assert Counter(json.dumps(e, sort_keys=True) for e in events) == \
            Counter(json.dumps(e, sort_keys=True) for e in emitted)
        kinds = Counter(kind(e) for e in events)
        assert kinds["visual_index"] == emu.scenario.counts()["visual_index"]
        assert kinds["alert"] == sum(1 for c in emu.scenario.cues if c.label == "code_on_screen")
        assert emu.hub.pending() == 0
        stops = [c for c in emu.calls if c["method"] == "PATCH" and c["path"].endswith("/status")]
        assert stops and all(c["body"] == {"action": "stop"} for c in stops)
    finally:
        await emu.stop()


async def test_manual_start_and_stop_and_nothing_unrequested() -> None:
    emu = Emulator(speed=0, autostart=False)
    await emu.start()
    try:
        conn, ws, session = await open_session(emu)
        got = await receive_until(ws, "capture_session.created")
        await asyncio.sleep(0.3)
        assert (await call(conn.get_capture_session, session.id)).status == "created"
        base = emu.base_url + f"/_emulator/sessions/{session.id}"
        await call(_post, base + "/start")
        await receive_until(ws, "capture_session.active", got)
        await call(_post, base + "/stop")
        await receive_until(ws, EXPORTED, got)
        assert [kind(e) for e in got] == [f"capture_session.{s}" for s in (
            "created", "starting", "active", "stopping", "stopped", "exported")]
        logged = await call(_get_json, emu.base_url + "/_emulator/calls")
        assert [c["path"] for c in logged] == ["/collection/default/websocket",
                                               "/collection/default/capture/session",
                                               f"/collection/default/capture/session/{session.id}"]
        await ws.close()
    finally:
        await emu.stop()


def _post(url: str) -> None:
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(url, method="POST", data=b""), timeout=5).read()


def _get_json(url: str) -> Any:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


async def test_failed_scenario_and_timed_playback(tmp_path: Path) -> None:
    p = tmp_path / "fail.yaml"
    p.write_text("events:\n  - {at: 0.2, channel: transcript, rtstream: 'mic:default', text: hello}\n"
                 "  - {at: 0.5, event: capture_session.failed, error: 'display permission revoked'}\n")
    emu = Emulator(p, speed=5, settle=0.05, setup_timeout=0.2)
    await emu.start()
    try:
        _conn, ws, _session = await open_session(emu)
        got = await receive_until(ws, "capture_session.failed")
        assert [kind(e) for e in got][-2:] == ["capture_session.active", "capture_session.failed"]
        assert got[-1]["data"]["error"] == "display permission revoked"
        await asyncio.wait_for(emu.wait_finished(), 5)
        await ws.close()
    finally:
        await emu.stop()


async def test_auth_and_bad_requests() -> None:
    emu = Emulator(speed=0, api_key="right-key")
    await emu.start()
    try:
        wrong = videodb.connect(api_key="wrong-key", base_url=emu.base_url)
        with pytest.raises(AuthenticationError):
            await call(wrong.connect_websocket)
        with pytest.raises(AuthenticationError):
            await call(wrong.create_capture_session, "u")
        assert [c["status"] for c in emu.calls] == [401, 401]
        assert not emu.registry.sessions

        right = videodb.connect(api_key="right-key", base_url=emu.base_url)
        session = await call(right.create_capture_session, "u")
        with pytest.raises(InvalidRequestError):
            await call(right.get_capture_session, "cap-nope")
        while (await call(right.get_capture_session, session.id)).status != "active":
            await asyncio.sleep(0.05)
        s = await call(right.get_capture_session, session.id)
        with pytest.raises(InvalidRequestError, match="no video"):
            await call(s.get_rtstream("mic")[0].index_visuals, prompt="x")
        with pytest.raises(InvalidRequestError, match="no audio"):
            await call(s.get_rtstream("screen")[0].start_transcript)
    finally:
        await emu.stop()


def test_cli_prints_url_serves_and_exits_zero_on_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.emulator.cli", "--port", "0", "--speed", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        assert first.startswith("EMULATOR_URL=http://127.0.0.1:")
        assert _get_json(first.split("=", 1)[1] + "/_emulator/calls") == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_bad_scenario_is_one_line(tmp_path: Path) -> None:
    from pipeline.emulator.cli import main

    assert main(["--scenario", str(tmp_path / "missing.yaml")]) == 1


def test_wakeup_times_out_wakes_early_and_leaves_no_timer_behind() -> None:
    from pipeline.emulator.state import Wakeup

    async def main() -> None:
        loop = asyncio.get_running_loop()
        w = Wakeup()
        t0 = loop.time()
        assert await w.wait(0.05) is False  # nobody set it: the timeout ends the wait
        assert loop.time() - t0 >= 0.045
        loop.call_later(0.01, w.set)
        t0 = loop.time()
        assert await w.wait(5) is True  # set() ends it long before the timeout
        assert loop.time() - t0 < 1
        assert len(loop._scheduled) == 0 or all(h.cancelled() for h in loop._scheduled)  # type: ignore[attr-defined]
        assert await w.wait(5) is True  # still set: returns at once
        w.clear()
        assert w.is_set() is False

    asyncio.run(main())


async def test_generated_events_and_rest_records_keep_only_the_newest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kept without end, they grew with every event: thousands of sessions for an hour would not fit, and the
    garbage collector walked all of them again and again (13% of the emulator's CPU at 1,000 sessions)."""
    from pipeline.emulator import player, state

    monkeypatch.setattr(player, "EMITTED_KEPT", 5, raising=False)
    monkeypatch.setattr(state, "RECORDS_KEPT", 3, raising=False)
    emu = Emulator(speed=0)
    await emu.start()
    try:
        conn, ws, session = await open_session(emu)
        got = await receive_until(ws, "capture_session.active")
        mic, = (await call(conn.get_capture_session, session.id)).get_rtstream("mic")
        await call(mic.start_transcript, ws_connection_id=ws.connection_id)
        await receive_until(ws, EXPORTED, got)
        spoken = [e["data"] for e in got if kind(e) == "transcript"]
        assert len(spoken) > 3
        assert [r["event"] for r in emu.emitted] == got[-5:]  # the newest five, in order
        listed = await call(mic.get_transcript, page_size=100)
        assert [s["start"] for s in listed["segments"]] == [d["start"] for d in spoken[-3:]]
        await ws.close()
    finally:
        await emu.stop()


async def test_recorded_api_calls_keep_only_the_newest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every API call was kept, with its body, for as long as the emulator ran: left beside a pipeline that
    polls the session status, it grew without end. Now the newest CALLS_KEPT are kept (and served)."""
    import aiohttp

    from pipeline.emulator import server

    monkeypatch.setattr(server, "CALLS_KEPT", 4)
    emu = Emulator(speed=0, autostart=False)
    await emu.start()
    try:
        conn = videodb.connect(api_key="k", base_url=emu.base_url)
        for i in range(10):
            await call(conn.generate_client_token, 60 + i)
        assert [c["body"] for c in emu.calls] == [{"expires_in": 60 + i} for i in range(6, 10)]
        async with aiohttp.ClientSession() as http, http.get(f"{emu.base_url}/_emulator/calls") as r:
            assert [c["body"]["expires_in"] for c in await r.json()] == [66, 67, 68, 69]
    finally:
        await emu.stop()


async def test_drop_route_closes_one_or_every_websocket_so_clients_reconnect() -> None:
    """`POST /_emulator/ws/drop` lets another process (a soak, a test) cut the pipeline's WebSocket: there was
    no way but `drop_after` or closing the socket from inside the emulator's own process."""
    import aiohttp

    emu = Emulator(speed=0, autostart=False)
    await emu.start()
    try:
        conn = videodb.connect(api_key="k", base_url=emu.base_url)
        first, second = [await (await call(conn.connect_websocket)).connect() for _ in range(2)]
        url = f"{emu.base_url}/_emulator/ws/drop"
        async with aiohttp.ClientSession() as http:
            async def drop(**kw: Any) -> tuple[int, Any]:
                async with http.post(url, **kw) as r:
                    return r.status, await r.json()

            assert await drop(json={"connection_id": "ws-nobody"}) == \
                (404, {"success": False, "message": "no open WebSocket connection ws-nobody"})
            assert (await drop(data=b"[1]"))[0] == 400 and (await drop(json={"connection_id": 7}))[0] == 400
            assert emu.hub.drops == 0 and len(emu.hub.live) == 2
            assert await drop(json={"connection_id": first.connection_id}) == \
                (200, {"success": True, "data": {"dropped": [first.connection_id]}})
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(first._connection.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012  # abnormal: reconnect
            assert list(emu.hub.live) == [second.connection_id]
            third = await (await call(conn.connect_websocket)).connect()  # a client reconnects
            status, body = await drop()  # no body: every open connection
            assert status == 200 and sorted(body["data"]["dropped"]) == sorted(
                [second.connection_id, third.connection_id])
            for ws in (second, third):
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(ws._connection.recv(), 5)
            assert emu.hub.live == {} and emu.hub.drops == 3
            assert await drop() == (200, {"success": True, "data": {"dropped": []}})
    finally:
        await emu.stop()
