"""The session API under hostile clients, races and damaged state: real SDK, emulator, HTTP and files.

Most tests reproduce a defect found by attacking the API (each failed before its fix); a few guard
the edges of those fixes. The flows they must not break are in test_session_api.py and
test_session_api_contract.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.api import Context
from pipeline.emulator import Emulator
from stages.controller.session_api import REFUSED_BURST, REFUSED_RATE
from tests.test_session_api import TOKEN, Live, cues, hook, running, session_calls
from tests.test_session_api import emulator as emulator  # the shared fixture
from tests.videodb_harness import API_KEY, scenario_file


async def raw_request(live: Live, head: bytes, body: bytes = b"") -> bytes:
    """One HTTP/1.1 exchange written byte for byte (what aiohttp's client would refuse to send)."""
    host, port = live.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        async with asyncio.timeout(10):  # the answer, not EOF (the server may linger over an unread body)
            top = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in top.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            return top + await reader.readexactly(length)
    finally:
        writer.close()


async def status_of(live: Live, sid: str, want: str, timeout: float = 20.0) -> dict[str, Any]:
    """Poll GET /v1/sessions/{sid} until its status is `want`; the last view otherwise (the assert shows it)."""
    deadline = time.monotonic() + timeout
    while True:
        status, view = await live.call("GET", f"/v1/sessions/{sid}")
        if (status == 200 and view["status"] == want) or time.monotonic() > deadline:
            return view
        await asyncio.sleep(0.05)


async def test_concurrent_creates_never_pass_max_sessions(emulator: Emulator,
                                                          make_context: Callable[..., Context]) -> None:
    """Six POSTs at once with max_sessions 2: two sessions, four 429s (before: all six created, since each
    request counted the live sessions before any of the others had returned)."""
    async with running(make_context, emulator, api={"max_sessions": 2}) as live:
        answers = await asyncio.gather(*(live.call("POST", "/v1/sessions", json={"end_user_id": f"u{i}"})
                                         for i in range(6)))
        assert sorted(status for status, _ in answers) == [201, 201, 429, 429, 429, 429]
        assert len(session_calls(emulator)) == 2
        assert (await live.call("GET", "/v1/sessions"))[1]["count"] == 2


async def test_hostile_headers_and_bodies_get_a_json_4xx(emulator: Emulator,
                                                         make_context: Callable[..., Context]) -> None:
    """Bytes that are not UTF-8 in Authorization, and JSON nested too deeply to store, are refused in one line
    (before: 500 'Server got itself in trouble' and a traceback in the log, or a session whose listing failed)."""
    async with running(make_context, emulator) as live:
        answer = await raw_request(live, b"GET /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe")
        assert answer.startswith(b"HTTP/1.1 401") and b'"status":401' in answer, answer

        for depth in (300, 251):  # 300: orjson cannot even hash it; 251: storable, but a listing nests deeper
            body = b'{"end_user_id": "x", "metadata": {"a": ' + b"[" * depth + b"]" * depth + b"}}"
            status, err = await live.call("POST", "/v1/sessions", data=body)
            assert status == 400 and "nested" in err["error"], err
        status, err = await live.call("POST", "/v1/sessions", data=b'{"end_user_id": "x", "on_active": '
                                      + b"[" * 300 + b"]" * 300 + b"}")
        assert status == 400, err
        assert session_calls(emulator) == []
        assert (await live.call("GET", "/v1/sessions"))[0] == 200


async def test_an_end_user_id_no_one_can_see_is_refused(emulator: Emulator,
                                                        make_context: Callable[..., Context]) -> None:
    """A zero-width space, a line break or a NUL made an end user id (201) that no listing or log shows as sent."""
    async with running(make_context, emulator) as live:
        for user in ("\u200b", "alice\nbob", "a\x00", "a\u2028b", "\u200bx\u200d"):
            status, err = await live.call("POST", "/v1/sessions", json={"end_user_id": user})
            assert status == 400 and "printable" in err["error"], (user, err)
        assert session_calls(emulator) == []
        for user in ("élodie", "user 42", "鈴木"):
            status, view = await live.call("POST", "/v1/sessions", json={"end_user_id": user})
            assert status == 201 and view["end_user_id"] == user, view


async def test_damaged_session_files_are_skipped_not_fatal(emulator: Emulator, make_context: Callable[..., Context],
                                                           tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Records of the wrong shape, a FIFO and a truncated file in state_dir/sessions: each is skipped with a
    warning and the API serves the rest (before: AttributeError at start, or a start that never returned)."""
    d = tmp_path / "sessions"
    d.mkdir()
    good = {"session_id": "cap-good", "status": "exported", "end_user_id": "u", "created_at": "2026-01-01T00:00:00Z"}
    damaged = {
        "cap-strs": {"session_id": "cap-strs", "status": "active", "rtstreams": ["mic", 5],
                     "created_at": "2026-01-01T00:00:00Z"},
        "cap-text": {"session_id": "cap-text", "status": "active", "rtstreams": "mic",
                     "created_at": "2026-01-01T00:00:00Z"},
        "cap-types": {"session_id": "cap-types", "status": "active", "created_at": "2026-01-01T00:00:00Z",
                      "rtstreams": [{"rtstream_id": "rts-1", "media_types": 5}]},
    }
    for sid, record in {"cap-good": good, **damaged}.items():
        (d / f"{sid}.json").write_bytes(orjson.dumps(record))
    (d / "cap-torn.json").write_bytes(b'{"session_id": "cap-to')
    os.mkfifo(d / "cap-fifo.json")
    caplog.set_level(logging.WARNING, "pipeline.controller.sessions")
    async with asyncio.timeout(15):
        async with running(make_context, emulator) as live:
            status, listing = await live.call("GET", "/v1/sessions")
            assert status == 200 and [s["session_id"] for s in listing["sessions"]] == ["cap-good"]
    skipped = {r.getMessage().split()[2].rsplit("/", 1)[-1] for r in caplog.records if "skipping" in r.getMessage()}
    assert skipped == {f"{sid}.json:" for sid in (*damaged, "cap-torn", "cap-fifo")}


async def test_a_bulky_metadata_record_survives_a_restart(emulator: Emulator, make_context: Callable[..., Context],
                                                          tmp_path: Path) -> None:
    """A body under max_body_bytes whose metadata is a deep list of small lists was saved indented, 20 times
    its size, past the 1 MiB a record could have when read back: the restart skipped the session (lost, and
    its Idempotency-Key made a second one)."""
    inner: Any = [[] for _ in range(20_000)]
    for _ in range(28):
        inner = [inner]
    body = {"end_user_id": "u", "metadata": {"layout": inner}}
    data = orjson.dumps(body)
    assert len(data) < 65536
    hdr = {"Idempotency-Key": "bulky-1"}
    async with running(make_context, emulator) as live:
        status, made = await live.call("POST", "/v1/sessions", data=data, headers=hdr)
        assert status == 201, made
    async with running(make_context, emulator) as live:
        status, again = await live.call("POST", "/v1/sessions", data=data, headers=hdr)
        assert (status, again["session_id"]) == (201, made["session_id"])
        assert len(session_calls(emulator)) == 1
    assert (tmp_path / "sessions" / f"{made['session_id']}.json").stat().st_size < 2 * 65536


async def test_a_session_stopped_before_a_restart_is_followed_to_its_end(make_context: Callable[..., Context],
                                                                        tmp_path: Path) -> None:
    """Stopped through the API, then the pipeline restarted while VideoDB was still exporting it: its lifecycle
    events go to the old connection, so only polling can tell (before: `stopping` forever, no video id)."""
    emu = Emulator(scenario_file(tmp_path, cues(), end=1000), speed=1, api_key=API_KEY, autostart=False)
    await emu.start()
    try:
        async with running(make_context, emu) as live:
            sid = (await live.call("POST", "/v1/sessions", json={"end_user_id": "u"}))[1]["session_id"]
            await hook(live, emu, f"sessions/{sid}/start")
            assert (await status_of(live, sid, "active"))["status"] == "active"
            assert (await live.call("POST", f"/v1/sessions/{sid}/stop"))[0] == 202
            assert (await status_of(live, sid, "stopping"))["status"] == "stopping"
        async with running(make_context, emu) as live:  # a new process: a new connection id
            view = await status_of(live, sid, "exported")
            assert view["status"] == "exported" and view["stop_requested"] is True
            assert view.get("exported_video_id", "").startswith("v_"), view
    finally:
        await emu.stop()


async def test_a_failed_call_while_reattaching_is_retried(make_context: Callable[..., Context], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """VideoDB answers the restart's first get_capture_session with an error: the session is re-bound on a
    later poll (before: left active but bound to nothing, so its events never came again)."""
    from videodb.client import Connection

    emu = Emulator(scenario_file(tmp_path, cues(400), end=1000), speed=10, api_key=API_KEY, autostart=False)
    await emu.start()
    try:
        async with running(make_context, emu) as live:
            sid = (await live.call("POST", "/v1/sessions", json={"end_user_id": "u"}))[1]["session_id"]
            await hook(live, emu, f"sessions/{sid}/start")
            await live.wait_for(lambda: len(live.of(sid, "transcript")) >= 2)
        failures: list[str] = []

        def flaky(name: str) -> Any:  # the first call of each fails (the restart lists first, then asks one)
            real = getattr(Connection, name)

            def call(self: Any, *args: Any, **kwargs: Any) -> Any:
                if name not in failures:
                    failures.append(name)
                    raise ConnectionError("VideoDB briefly unreachable")
                return real(self, *args, **kwargs)
            return call

        for name in ("get_capture_session", "list_capture_sessions"):
            monkeypatch.setattr(Connection, name, flaky(name))
        async with running(make_context, emu) as live:
            link = live.ctl.context.session
            await live.wait_for(lambda: link.connection_id is not None and any(
                c["path"].endswith("/transcription") and (c["body"] or {}).get("ws_connection_id") == link.connection_id
                for c in emu.calls), timeout=15)
            await live.wait_for(lambda: len(live.of(sid, "transcript")) >= 2, timeout=15)
            assert "get_capture_session" in failures and live.ctl.manager.get(sid).lifecycle.state == "active"
    finally:
        await emu.stop()


async def test_shutdown_is_not_held_up_by_a_waiting_create(emulator: Emulator,
                                                          make_context: Callable[..., Context]) -> None:
    """A create waiting for the WebSocket connection answered 503 at shutdown, at once (before: the server
    waited up to 60 s for it, so SIGTERM took a minute)."""
    async with running(make_context, emulator, ingest=False, connect_timeout=60) as live:
        waiting = asyncio.create_task(live.call("POST", "/v1/sessions", json={"end_user_id": "a"}))
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        await asyncio.wait_for(live.ctl.close(), 10)
        assert time.monotonic() - t0 < 5
        status, err = await asyncio.wait_for(waiting, 5)
        assert status == 503 and "shutting down" in err["error"]
        assert session_calls(emulator) == []


async def test_a_slow_body_is_cut_off(emulator: Emulator, make_context: Callable[..., Context],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that announces a body and sends it a byte at a time no longer holds its connection (and the
    shutdown) forever: 408 once the body took longer than the limit."""
    from stages.controller import session_api

    monkeypatch.setattr(session_api, "BODY_TIMEOUT", 0.5, raising=False)
    async with running(make_context, emulator) as live:
        t0 = time.monotonic()
        answer = await raw_request(live, b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                   + TOKEN.encode() + b"\r\nContent-Length: 100", b'{"end_user_id"')
        assert answer.startswith(b"HTTP/1.1 408") and b'"status":408' in answer, answer
        assert time.monotonic() - t0 < 5


def test_a_fifo_where_a_saved_session_should_be_does_not_hang_the_start(tmp_path: Path) -> None:
    """capture_session.json as a FIFO (a foreign file): the single-session restart logs it and creates a new
    session (before: reading it blocked the start for ever)."""
    os.mkfifo(tmp_path / "capture_session.json")
    code = ("import sys; from pathlib import Path; from stages.controller.resume import read_record; "
            "print(read_record(Path(sys.argv[1]), {}, 'ctl'))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "capture_session.json")], timeout=20,
                          capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr
    assert "not a regular file" in done.stderr


async def test_a_create_at_videodb_during_shutdown_keeps_its_record(emulator: Emulator, tmp_path: Path,
                                                                   make_context: Callable[..., Context],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Shutdown stops waiting for requests after a few seconds, but a create whose session VideoDB is making
    still saves its record (a restart re-attaches it; a retry of its Idempotency-Key finds it)."""
    from videodb.client import Connection

    from stages.controller import session_api

    monkeypatch.setattr(session_api, "SHUTDOWN_WAIT", 0.2)
    real = Connection.create_capture_session

    def slow(self: Any, *args: Any, **kwargs: Any) -> Any:
        time.sleep(1.0)  # VideoDB is slow to answer; the server stops waiting for the request meanwhile
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Connection, "create_capture_session", slow)
    async with running(make_context, emulator) as live:
        await asyncio.wait_for(live.ctl.context.session.wait_connection(), 10)
        waiting = asyncio.create_task(live.call("POST", "/v1/sessions", json={"end_user_id": "a"},
                                                headers={"Idempotency-Key": "at-shutdown"}))
        await asyncio.sleep(0.3)
        await asyncio.wait_for(live.ctl.close(), 10)
        with pytest.raises(Exception):  # noqa: B017 - the server dropped the request; how depends on timing
            await asyncio.wait_for(waiting, 5)
    (sid,) = emulator.registry.sessions  # VideoDB made it
    record = orjson.loads((tmp_path / "sessions" / f"{sid}.json").read_bytes())
    assert record["idempotency_key"] == "at-shutdown"


async def test_connections_that_never_finish_a_request_are_bounded(emulator: Emulator,
                                                                   make_context: Callable[..., Context],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients that open connections and trickle their headers: those over the bound get a 503 at once, the
    others are closed after the header time limit, and the API answers again (before: every such connection
    was kept for an hour, each one a file descriptor of the pipeline)."""
    from stages.controller import session_api

    monkeypatch.setattr(session_api, "HEADER_TIMEOUT", 1.0, raising=False)
    monkeypatch.setattr(session_api, "MAX_CONNECTIONS", 20, raising=False)
    async with running(make_context, emulator) as live:
        host, port = live.url.removeprefix("http://").rsplit(":", 1)
        conns = []
        for _ in range(30):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            conns.append((reader, writer))
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(10):
                answers = await asyncio.gather(*(reader.read() for reader, _ in conns))
        finally:
            for _, writer in conns:
                writer.close()
        busy = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        assert len(busy) == 10 and all(b'"status": 503' in a for a in busy)
        assert time.monotonic() - t0 < 5
        assert (await live.call("GET", "/v1/sessions"))[0] == 200


async def test_a_stopped_session_is_not_forgotten_before_it_ends(make_context: Callable[..., Context],
                                                                 tmp_path: Path) -> None:
    """max_sessions 1: a session stopped through the API frees its place, but stays in memory until it has
    ended (before: the next create dropped it at once: 404, and its file said `stopping` for ever)."""
    emu = Emulator(scenario_file(tmp_path, cues(), end=1000), speed=1, api_key=API_KEY, autostart=False)
    await emu.start()
    try:
        async with running(make_context, emu, api={"max_sessions": 1}) as live:
            a = (await live.call("POST", "/v1/sessions", json={"end_user_id": "a"}))[1]["session_id"]
            await hook(live, emu, f"sessions/{a}/start")
            assert (await status_of(live, a, "active"))["status"] == "active"
            assert (await live.call("POST", f"/v1/sessions/{a}/stop"))[0] == 202
            assert (await live.call("POST", "/v1/sessions", json={"end_user_id": "b"}))[0] == 201
            view = await status_of(live, a, "exported")
            assert view["status"] == "exported" and view["player_url"], view
        assert orjson.loads((tmp_path / "sessions" / f"{a}.json").read_bytes())["status"] == "exported"
    finally:
        await emu.stop()


async def test_a_session_stopped_before_it_started_leaves_memory(emulator: Emulator,
                                                                 make_context: Callable[..., Context]) -> None:
    """Its desktop client may never start it, so nothing may ever end it: beyond max_sessions it is forgotten
    like an ended one (memory stays bounded when users cancel before recording)."""
    async with running(make_context, emulator, api={"max_sessions": 1}) as live:
        a = (await live.call("POST", "/v1/sessions", json={"end_user_id": "a"}))[1]["session_id"]
        assert (await live.call("POST", f"/v1/sessions/{a}/stop"))[0] == 202
        assert (await live.call("POST", "/v1/sessions", json={"end_user_id": "b"}))[0] == 201
        assert a not in live.ctl.manager.sessions and len(live.ctl.manager.sessions) == 1


async def test_jsonl_gives_every_storable_session_id_its_own_file(make_context: Callable[..., Context],
                                                                 tmp_path: Path) -> None:
    """Ids the session API stores (up to 128 characters) get their own file; traversal, separators, unicode,
    a final newline and longer ids go to `unknown` (before: ids of 65 to 128 characters were mixed into
    `unknown`, and a session id or channel ending in a newline made a file name with a newline in it)."""
    from stages.sinks.jsonl import JsonlOptions, JsonlSink

    sink = JsonlSink(JsonlOptions(path=str(tmp_path / "s" / "{capture_session_id}.jsonl")), make_context())
    await sink.start()
    long_id, too_long = "cap-" + "a" * 124, "cap-" + "b" * 125
    odd = ["..", "../x", "a/b", "/etc/passwd", ".hidden", "cap-\u00e9t\u00e9", "cap-1\n", "", too_long, "a\\b"]
    await sink.write([{"capture_session_id": sid, "n": i} for i, sid in enumerate([long_id, *odd])])
    await sink.close()
    files = {p.name: len(p.read_text().splitlines()) for p in (tmp_path / "s").iterdir()}
    assert files == {f"{long_id}.jsonl": 1, "unknown.jsonl": len(odd)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]

    sink = JsonlSink(JsonlOptions(path=str(tmp_path / "c" / "{channel}.jsonl")), make_context())
    await sink.start()
    await sink.write([{"channel": "transcript\n", "n": 1}, {"channel": "transcript", "n": 2}])
    await sink.close()
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["transcript.jsonl", "unknown.jsonl"]
    from stages.controller.session_store import safe_id

    assert safe_id(long_id) and not safe_id("cap-1\n") and not safe_id(too_long)


async def test_an_index_made_by_a_bind_cut_short_is_stopped_after_the_restart(
        make_context: Callable[..., Context], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The process dies after a bind created a scene index but before the bind ended: the record already
    names that index, so the restart stops it once replaced (before: the record was saved only at the end
    of the bind, and the index kept running at VideoDB for a connection that was gone)."""
    from videodb.rtstream import RTStreamSceneIndex

    real, blocking, entered = RTStreamSceneIndex.create_alert, [True], []

    def slow_alert(self: Any, *args: Any, **kwargs: Any) -> Any:
        if blocking:  # the process "dies" while VideoDB handles this call
            entered.append(1)
            time.sleep(1.0)
            raise ConnectionError("the process died here")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RTStreamSceneIndex, "create_alert", slow_alert)
    on_active = {"index_visuals": {"prompt": "Describe the screen"},
                 "alerts": [{"label": "code", "prompt": "Code is visible", "index": "visuals"}]}
    emu = Emulator(scenario_file(tmp_path, cues(400), end=1000), speed=10, api_key=API_KEY, autostart=False)
    await emu.start()

    def running_indexes() -> list[str]:
        return [p.rtstream_id for p in emu.registry.indexes.values() if p.running]

    try:
        async with running(make_context, emu, on_active=on_active) as live:
            sid = (await live.call("POST", "/v1/sessions", json={"end_user_id": "u"}))[1]["session_id"]
            await hook(live, emu, f"sessions/{sid}/start")
            # inside create_alert: the index is made (and recorded); the "crash" comes now. Waiting only for the
            # index to run at VideoDB could stop the run before the SDK call that made it had returned
            await live.wait_for(lambda: bool(entered) and len(running_indexes()) == 1)
        blocking.clear()
        assert len(running_indexes()) == 1  # made by the run that "died"
        async with running(make_context, emu, on_active=on_active) as live:
            link = live.ctl.context.session
            await live.wait_for(lambda: any(c["path"].endswith("/alert") and (c["body"] or {}).get(
                "ws_connection_id") == link.connection_id for c in emu.calls), timeout=15)
            await live.wait_for(lambda: len(running_indexes()) == 1, timeout=5)
            assert [p.conn for p in emu.registry.indexes.values() if p.running] == [link.connection_id]
    finally:
        await emu.stop()


async def test_a_retry_after_a_lost_create_answer_keeps_the_session_videodb_made(
        emulator: Emulator, make_context: Callable[..., Context], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """create_capture_session reached VideoDB but its answer never came back (a timeout, or the pipeline was
    killed): the retry with the same Idempotency-Key, here after a restart, gets that session instead of a
    second one (before: two sessions at VideoDB, the first one unknown to the pipeline for ever)."""
    from videodb.client import Connection

    real, lost = Connection.create_capture_session, [True]

    def answer_lost(self: Any, *args: Any, **kwargs: Any) -> Any:
        made = real(self, *args, **kwargs)
        if lost:
            raise ConnectionError("read timed out")
        return made

    monkeypatch.setattr(Connection, "create_capture_session", answer_lost)
    body, hdr = {"end_user_id": "u", "metadata": {"plan": "pro"}}, {"Idempotency-Key": "lost-answer"}
    async with running(make_context, emulator) as live:
        status, err = await live.call("POST", "/v1/sessions", json=body, headers=hdr)
        assert status == 502 and "create_capture_session" in err["error"]
        (made,) = emulator.registry.sessions
    lost.clear()
    async with running(make_context, emulator) as live:
        async with live.http.post(live.url + "/v1/sessions", json=body,
                                  headers={**hdr, "Authorization": f"Bearer {TOKEN}"}) as r:
            kept = await r.json()
            assert len(emulator.registry.sessions) == 1 and kept["session_id"] == made, kept
            assert r.status == 201 and r.headers.get("Idempotent-Replayed") == "true", kept
        assert kept["client_token"].startswith("ct-") and kept["metadata"] == {"plan": "pro"}
        status, err = await live.call("POST", "/v1/sessions", json={"end_user_id": "v"}, headers=hdr)
        assert status == 409, err
        await hook(live, emulator, f"sessions/{made}/start")  # its desktop client starts it: it is followed
        assert (await status_of(live, made, "active"))["status"] == "active"
        await live.wait_for(lambda: len(live.of(made, "transcript")) >= 1)
        status, again = await live.call("POST", "/v1/sessions", json=body, headers=hdr)
        assert (status, again["session_id"]) == (201, made)
    assert not list(tmp_path.glob("sessions/*.creating"))


async def test_a_create_videodb_never_made_is_made_on_retry(emulator: Emulator,
                                                            make_context: Callable[..., Context],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The call failed before it reached VideoDB: the retry with the key finds nothing to keep and creates."""
    from videodb.client import Connection

    real, down = Connection.create_capture_session, [True]

    def unreachable(self: Any, *args: Any, **kwargs: Any) -> Any:
        if down:
            raise ConnectionError("connection refused")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Connection, "create_capture_session", unreachable)
    async with running(make_context, emulator) as live:
        hdr = {"Idempotency-Key": "never-made"}
        assert (await live.call("POST", "/v1/sessions", json={"end_user_id": "u"}, headers=hdr))[0] == 502
        down.clear()
        status, made = await live.call("POST", "/v1/sessions", json={"end_user_id": "u"}, headers=hdr)
        assert status == 201 and list(emulator.registry.sessions) == [made["session_id"]]


async def test_a_stop_that_did_not_reach_videodb_can_be_sent_again(emulator: Emulator,
                                                                  make_context: Callable[..., Context],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """One rtstream's stop call fails: the answer says so (502, naming the call), and the next POST /stop
    tries again (before: 202, the session ran on at VideoDB, and every later POST /stop did nothing)."""
    from videodb.rtstream import RTStream

    real, fail = RTStream.stop, [True]

    def flaky_stop(self: Any, *args: Any, **kwargs: Any) -> Any:
        if fail:
            fail.clear()
            raise ConnectionError("connection reset")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RTStream, "stop", flaky_stop)
    async with running(make_context, emulator) as live:
        sid = (await live.call("POST", "/v1/sessions", json={"end_user_id": "u"}))[1]["session_id"]
        await hook(live, emulator, f"sessions/{sid}/start")
        assert (await status_of(live, sid, "active"))["status"] == "active"
        status, err = await live.call("POST", f"/v1/sessions/{sid}/stop")
        assert status == 502 and "stop rtstream" in err["error"] and "again" in err["error"], err
        await asyncio.sleep(0.3)
        assert emulator.registry.sessions[sid].status == "active"  # one stream still runs: not stopped
        status, view = await live.call("POST", f"/v1/sessions/{sid}/stop")
        assert status == 202 and view["stop_requested"] is True
        assert (await status_of(live, sid, "exported"))["status"] == "exported"
        assert (await live.call("POST", f"/v1/sessions/{sid}/stop"))[0] == 202


async def test_single_session_an_index_made_by_a_bind_cut_short_is_stopped_after_the_restart(
        make_context: Callable[..., Context], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for the single-session controller's capture_session.json (its README promises a restart
    stops the indexes the crashed run had started)."""
    from videodb.rtstream import RTStreamSceneIndex

    from tests.videodb_harness import make_stages

    real, blocking, entered = RTStreamSceneIndex.create_alert, [True], []

    def slow_alert(self: Any, *args: Any, **kwargs: Any) -> Any:
        if blocking:
            entered.append(1)
            time.sleep(1.0)
            raise ConnectionError("the process died here")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RTStreamSceneIndex, "create_alert", slow_alert)
    controller = {"end_user_id": "u", "exit_on": "none", "on_active": {
        "index_visuals": {"prompt": "Describe the screen"},
        "alerts": [{"label": "code", "prompt": "Code is visible", "index": "visuals"}]}}
    emu = Emulator(scenario_file(tmp_path, cues(400), end=1000), speed=10, api_key=API_KEY)
    await emu.start()

    def running_indexes() -> list[Any]:
        return [p for p in emu.registry.indexes.values() if p.running]

    async def run(until: Callable[[], bool]) -> str | None:
        src, ctl = make_stages(make_context, emu, controller=controller)
        assert ctl is not None

        async def ingest() -> None:
            async for batch in src.batches():
                ctl.observe(batch)

        task = asyncio.create_task(ingest())
        try:
            await ctl.start()
            async with asyncio.timeout(15):
                while not until():
                    await asyncio.sleep(0.02)
            return ctl.context.session.connection_id
        finally:
            await src.stop()
            await asyncio.wait_for(task, 5)
            await src.close()
            await ctl.close()

    try:
        # the bind blocks in create_alert (the index is made and recorded): the "crash" comes now
        await run(lambda: bool(entered) and len(running_indexes()) == 1)
        (first,) = running_indexes()  # made by the run that "died" inside create_alert
        first_conn = first.conn
        blocking.clear()
        conn = await run(lambda: any(c["path"].endswith("/alert") for c in emu.calls)
                         and len(running_indexes()) == 1 and running_indexes()[0].conn != first_conn)
        assert [p.conn for p in running_indexes()] == [conn]
    finally:
        await emu.stop()


async def test_a_stop_cut_short_by_a_crash_is_finished_by_the_restart(emulator: Emulator,
                                                                     make_context: Callable[..., Context],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline dies while its stop calls are under way: the restart sends them again by itself (before:
    the file said stop_requested, so nothing re-bound or stopped it, and the session ran on at VideoDB)."""
    from videodb.rtstream import RTStream

    from stages.controller import session_api

    real, crashing = RTStream.stop, [True]

    def dies_here(self: Any, *args: Any, **kwargs: Any) -> Any:
        if crashing:
            time.sleep(1.0)
            raise ConnectionError("the process died here")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RTStream, "stop", dies_here)
    monkeypatch.setattr(session_api, "SHUTDOWN_WAIT", 0.2)
    async with running(make_context, emulator) as live:
        sid = (await live.call("POST", "/v1/sessions", json={"end_user_id": "u"}))[1]["session_id"]
        await hook(live, emulator, f"sessions/{sid}/start")
        assert (await status_of(live, sid, "active"))["status"] == "active"
        stopping = asyncio.create_task(live.call("POST", f"/v1/sessions/{sid}/stop"))
        await asyncio.sleep(0.3)  # inside the first rtstream's stop
        await live.ctl.close()  # the "crash": the handler is cancelled there
        stopping.cancel()
    crashing.clear()
    assert emulator.registry.sessions[sid].status == "active"
    async with running(make_context, emulator) as live:
        view = await status_of(live, sid, "exported")
        assert view["status"] == "exported" and view["stop_requested"] is True, view


async def test_guessing_the_api_token_is_slowed_to_ten_tries_a_minute_per_address(
        emulator: Emulator, make_context: Callable[..., Context]) -> None:
    """The API answered wrong bearer tokens as fast as a client sent them. An address now gets 10 wrong tokens
    a minute, then 429 with Retry-After (the right token too, from there: a right guess tells nothing); a
    backend on another address with the right token is not affected, and a request with no token costs none."""
    import aiohttp

    async with running(make_context, emulator, ingest=False) as live, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as guesser:
        async def guess(token: str) -> tuple[int, str | None]:
            async with guesser.get(live.url + "/v1/sessions", headers={"Authorization": f"Bearer {token}"}) as r:
                return r.status, r.headers.get("Retry-After")

        for _ in range(12):
            assert (await live.call("GET", "/v1/sessions", token=None))[0] == 401
        assert [(await guess(f"guess-{i:016}"))[0] for i in range(10)] == [401] * 10
        for token in ("guess-x", TOKEN):
            status, retry = await guess(token)
            assert status == 429 and retry is not None and 1 <= int(retry) <= 60, (status, retry)
        assert (await live.call("GET", "/v1/sessions"))[0] == 200


async def test_an_integer_beyond_64_bits_is_refused_not_rounded(emulator: Emulator,
                                                                make_context: Callable[..., Context]) -> None:
    """A metadata integer that does not fit 64 bits is refused in one line naming it (before: 201, and the
    session kept 1.2345678901234568e+29 for 123456789012345678901234567890, silently); 64-bit ones, a genuine
    float as large, and long digit runs in strings are kept as sent."""
    big = b"123456789012345678901234567890"
    async with running(make_context, emulator) as live:
        for literal in (big, b"-9223372036854775809", b"18446744073709551616", b"2" + b"0" * 300):
            body = b'{"end_user_id": "u", "metadata": {"order": {"ids": [1, ' + literal + b"]}}}"
            status, err = await live.call("POST", "/v1/sessions", data=body)
            assert status == 400, (literal[:40], status, err)
            assert "64 bits" in err["error"] and literal[:20].decode() in err["error"], err
            assert len(err["error"]) < 300, err
        kept = (b'{"end_user_id": "u", "metadata": {"u64": 18446744073709551615, "i64": -9223372036854775808, '
                b'"f": 1.2345678901234568e+29, "s": "' + big + b'"}}')
        status, view = await live.call("POST", "/v1/sessions", data=kept)
        assert status == 201, view
        assert view["metadata"] == {"u64": 18446744073709551615, "i64": -9223372036854775808,
                                    "f": 1.2345678901234568e+29, "s": big.decode()}
        assert len(session_calls(emulator)) == 1


async def test_requests_without_the_token_wait_their_turn(emulator: Emulator,
                                                          make_context: Callable[..., Context]) -> None:
    """Requests refused for the token (none sent, or a guess past the guard's allowance) were answered as fast
    as they came, and each costs the event loop the pipeline's events run on as much as any request: 8 clients
    asking back to back took most of it. They now wait their turn (100 a second for all of them, after 100 at
    once); requests with the token are not slowed."""
    n, clients = 320, 8
    async with running(make_context, emulator) as live:
        async def flood() -> None:
            for _ in range(n // clients):
                assert (await live.call("GET", "/v1/sessions", token=None))[0] == 401

        began = time.monotonic()
        flooding = asyncio.gather(*(flood() for _ in range(clients)))
        await asyncio.sleep(0.1)
        asked = time.monotonic()
        status, _ = await live.call("GET", "/v1/sessions")
        answered = time.monotonic() - asked
        await flooding
        took = time.monotonic() - began
    assert status == 200 and answered < 0.5, answered
    assert took >= 0.95 * (n - REFUSED_BURST) / REFUSED_RATE, took  # before: 0.15 s
