"""`pipeline top` and `pipeline tap` against servers that are not a pipeline, stall, or send hostile event text."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from pipeline import cli
from pipeline.ops import tap
from tests.test_ops_cli import ENV, PIPELINE, http_run

JSON = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {n}\r\n\r\n{body}"
SSE = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n{body}"


@contextlib.contextmanager
def fake_server(answer: str | None) -> Iterator[str]:
    """A loopback TCP server that answers every request with `answer` and then holds the connection open
    (None: never answers at all); yields its address."""
    srv = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            held.append(conn)
            conn.recv(65536)
            if answer is not None:
                conn.sendall(answer.encode())

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"127.0.0.1:{srv.getsockname()[1]}"
    finally:
        srv.close()
        for c in held:
            c.close()


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("answer", [
    JSON.format(n=5, body="hello"),  # not JSON
    JSON.format(n=2, body="[]"),  # JSON, not an object
    JSON.format(n=15, body='{"status":"ok"}'),  # another service's JSON
    JSON.format(n=89, body='{"pipeline":1,"ready":{},"stages":[1],"sinks":[],"alerts":[],"uptime":0,'
                           '"alerts_fired":0,"dead_lettered":0}'),  # the keys, not their values
], ids=["not-json", "array", "other-service", "bad-values"])
def test_top_against_a_server_that_is_not_a_pipeline_is_one_line(answer: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with fake_server(answer) as addr:
        code, err = run_cli(["top", addr, "--once", "--interval", "0.1"], capsys)
    assert code == 2 and err.count("\n") == 1 and "is not a pipeline's status" in err, err


@pytest.mark.parametrize("answer", [
    JSON.format(n=15, body='{"status":"ok"}'),  # not an event stream at all
    SSE.format(body="event: hello\ndata: [1]\n\n"),  # a hello that is not an object
    SSE.format(body="data: {not json\n\n"),
    SSE.format(body="data: 5\n\n"),  # a message that is not an array of events
], ids=["json", "hello-array", "not-json", "number"])
def test_tap_against_a_server_that_is_not_a_pipeline_is_one_line(answer: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with fake_server(answer) as addr:
        code, err = run_cli(["tap", addr], capsys)
    assert code == 2 and err.count("\n") == 1 and "is not a pipeline's tap stream" in err, err


def test_tap_gives_up_on_a_server_that_never_answers(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tap, "ANSWER_TIMEOUT", 0.5)
    with fake_server(None) as addr:
        t0 = time.monotonic()
        code, err = run_cli(["tap", addr], capsys)
    assert code == 2 and "timed out" in err and time.monotonic() - t0 < 5, err


def test_tap_gives_up_on_a_stream_that_stalls(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipeline that stopped (SIGSTOP, a host gone) sends not even its keep-alive: the tap says so and ends."""
    monkeypatch.setattr(tap, "STALL_TIMEOUT", 0.5)
    hello = 'event: hello\ndata: {"at": "source:replay", "points": [], "pipeline": "p"}\n\n'
    with fake_server(SSE.format(body=hello)) as addr:
        code, err = run_cli(["tap", addr], capsys)
    assert code == 0 and "following source:replay" in err and "stopped answering" in err, err


HOSTILE = "password [/bold] [link=http://evil.example]x[/link] \x1b]0;PWNED\x07\x1b[2J\x9b31m end"


def test_hostile_event_text_reaches_the_terminal_as_text(tmp_path: Path) -> None:
    """Event text with rich markup and terminal escapes: `top` does not crash on it, neither viewer lets an
    escape sequence through to the operator's terminal."""
    events = tmp_path / "in.jsonl"
    t0 = 1_700_000_000.0
    with events.open("wb") as fh:
        for i in range(2400):
            ev = {"channel": "visual_index", "rtstream_id": "rts-1", "rtstream_name": "display:1\x1b[5m",
                  "unix_ts": t0 + i * 0.025, "data": {"text": HOSTILE if i % 40 == 0 else f"line {i}"}}
            fh.write(orjson.dumps(ev) + b"\n")
    with http_run(tmp_path, events) as (url, _):
        top = subprocess.run([*PIPELINE, "top", url, "--once", "--interval", "0.2"], env=ENV, capture_output=True,
                             text=True, timeout=30)
        seen = subprocess.run([*PIPELINE, "tap", url, "--at", "rules", "--channel", "alert", "--limit", "2"],
                              env=ENV, capture_output=True, text=True, timeout=30)
    assert top.returncode == 0 and "Traceback" not in top.stderr, top.stderr
    assert seen.returncode == 0 and seen.stdout.count("\n") == 2, seen.stderr
    for out in (top.stdout, seen.stdout):
        assert "\x1b" not in out and "\x9b" not in out and "\x07" not in out, out
        assert "[/bold]" in out and "\\x1b]0;PWNED\\x07" in out, out


async def status_after_run(tmp_path: Path, events: Path) -> bytes:
    """The body of /api/status once a pipeline with the operator endpoint has replayed `events`."""
    import aiohttp

    from tests.operator_harness import config, served

    async with served(config(tmp_path, events)) as (rt, base), aiohttp.ClientSession() as http:
        assert await rt.run() == 0
        async with http.get(base + "/api/status") as r:
            return await r.read()


async def test_the_status_snapshot_stays_small_whatever_the_alerts_carry(tmp_path: Path) -> None:
    """The status page and `pipeline top` poll /api/status every second; its last alerts carry their events'
    text and `ts`, which a peer makes as large as it likes."""
    events = tmp_path / "in.jsonl"
    with events.open("wb") as fh:
        for i in range(30):
            fh.write(orjson.dumps({"channel": "visual_index", "rtstream_id": "rts-1", "unix_ts": 1_700_000_000 + i,
                                   "ts": "t" * 100_000, "data": {"text": "password " + "x" * 200_000}}) + b"\n")
    body = await status_after_run(tmp_path, events)
    snap = orjson.loads(body)
    assert len(snap["alerts"]) == 20 and len(body) < 100_000, len(body)
    assert all(a["data"]["text"].startswith("password x") for a in snap["alerts"])


async def test_the_status_snapshot_stays_small_when_alerts_carry_nested_stamps(tmp_path: Path) -> None:
    """A peer that sends its own `unix_ts` keeps its own `ts` too, of any shape, and every alert its event
    fires copies it: a `ts` of 40 x 40 strings (400 KB) was kept whole (each string under 1,000 characters),
    so each poll of /api/status was 8 MB. Now each alert keeps at most 8,000 characters, its text first."""
    nested = {f"k{i}": {f"j{j}": "y" * 250 for j in range(40)} for i in range(40)}
    events = tmp_path / "in.jsonl"
    with events.open("wb") as fh:
        for i in range(22):
            fh.write(orjson.dumps({"channel": "visual_index", "rtstream_id": "rts-1", "unix_ts": 1_700_000_000 + i,
                                   "ts": nested, "data": {"text": f"password {i}"}}) + b"\n")
    body = await status_after_run(tmp_path, events)
    snap = orjson.loads(body)
    assert len(snap["alerts"]) == 20 and len(body) < 250_000, len(body)
    assert sorted(a["data"]["text"] for a in snap["alerts"]) == sorted(f"password {i}" for i in range(2, 22))


async def test_idle_and_unfinished_connections_are_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that connects and sends nothing, or never finishes its request headers, holds one of the
    pipeline's file descriptors: it is closed after the idle timeout (was: aiohttp's hour). A tap stream is
    not idle and stays."""
    import asyncio

    import pipeline.http.server as server
    from tests.operator_harness import config, replay_file, served

    monkeypatch.setattr(server, "IDLE_TIMEOUT", 0.5, raising=False)
    events = replay_file(tmp_path / "in.jsonl", 10)
    async with served(config(tmp_path, events)) as (rt, base):
        host, port = base.removeprefix("http://").split(":")
        idle_r, _idle_w = await asyncio.open_connection(host, int(port))
        slow_r, slow_w = await asyncio.open_connection(host, int(port))
        slow_w.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
        _tap_r, tap_w = await asyncio.open_connection(host, int(port))
        tap_w.write(b"GET /tap HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert await asyncio.wait_for(idle_r.read(), 5) == b""  # EOF: the server closed it
        assert await asyncio.wait_for(slow_r.read(), 5) == b""
        await asyncio.sleep(0.6)
        assert rt.tap_hub.client_count == 1  # the tap stream is still attached
        for w in (slow_w, tap_w):
            w.close()


def test_top_shows_alerts_whose_events_carried_odd_stamps(capsys: pytest.CaptureFixture[str]) -> None:
    """An alert's `ts`/`unix_ts` come with its event: a time no clock shows is left blank, not a traceback."""
    alerts = [{"channel": "alert", "unix_ts": v, "data": {"event_label": "r", "text": f"t{i}", "severity": "info"}}
              for i, v in enumerate([1e300, -1e20])] + [{"ts": 5, "data": {"text": "t2"}}]
    body = orjson.dumps({"pipeline": "p", "ready": {}, "stages": [], "sinks": [], "alerts": alerts, "uptime": 1,
                         "alerts_fired": 3, "dead_lettered": 0, "lag": None}).decode()
    with fake_server(JSON.format(n=len(body), body=body)) as addr:
        code, err = run_cli(["top", addr, "--once", "--interval", "0.1"], capsys)
    assert code == 0, err


async def test_the_status_snapshot_survives_alerts_with_odd_unix_ts(tmp_path: Path) -> None:
    """The last alerts are sorted by `unix_ts`, which comes with the event: a string beside numbers made
    /api/status answer 500 (the status page and `pipeline top` with it)."""
    import aiohttp

    from tests.operator_harness import config, served

    events = tmp_path / "in.jsonl"
    stamps: list[object] = [1_700_000_000.5, "soon", None, {"a": 1}, 1_700_000_001]
    events.write_bytes(b"".join(orjson.dumps({"channel": "visual_index", "rtstream_id": "rts-1", "unix_ts": u,
                                              "data": {"text": f"password {i}"}}) + b"\n"
                                for i, u in enumerate(stamps)))
    async with served(config(tmp_path, events)) as (rt, base), aiohttp.ClientSession() as http:
        assert await rt.run() == 0
        async with http.get(base + "/api/status") as r:
            assert r.status == 200, await r.text()
            snap = await r.json()
    assert sorted(a["data"]["text"] for a in snap["alerts"]) == [f"password {i}" for i in range(5)]


@pytest.mark.parametrize("path", ["/tap?limit=1", "/api/status", "/"])
async def test_a_page_rebound_to_loopback_cannot_read_meeting_content(tmp_path: Path, path: str) -> None:
    """Without a token, loopback is the only guard: a web page whose own name an attacker re-points at
    127.0.0.1 (DNS rebinding) is same-origin with the endpoint in the victim's browser. Its requests carry
    its own name as Host: refused. The pipeline's own addresses, and /metrics, still answer."""
    import aiohttp

    from tests.operator_harness import config, replay_file, served

    events = replay_file(tmp_path / "in.jsonl", 10)
    async with served(config(tmp_path, events)) as (_rt, base), aiohttp.ClientSession() as http:
        port = base.rsplit(":", 1)[1]
        async with http.get(base + path, headers={"Host": f"attacker.example:{port}"}) as r:
            assert r.status == 403 and "not a loopback name" in (await r.json())["error"]
        async with http.get(base + "/metrics", headers={"Host": f"attacker.example:{port}"}) as r:
            assert r.status == 200
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
            async with http.get(base + path, headers={"Host": host}) as r:
                assert r.status == 200, host
                await r.content.readline()


async def test_a_sign_in_whose_body_never_arrives_is_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request under way is not idle, so the idle timeout never closed a POST /login whose body was never
    sent in full: 64 of them held every connection the endpoint takes, for good (/healthz and /metrics answered
    503 to everyone). Its body now has as long as an idle connection."""
    import asyncio

    import pipeline.http.server as server
    from tests.operator_harness import config, replay_file, served

    monkeypatch.setattr(server, "IDLE_TIMEOUT", 0.5, raising=False)
    events = replay_file(tmp_path / "in.jsonl", 10)
    async with served(config(tmp_path, events)) as (_rt, base):
        host, port = base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: 4000\r\n\r\ntoken=")  # and never the rest
        answer = await asyncio.wait_for(reader.read(), 5)  # then EOF: the server closed it
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
        writer.close()


HALF_EMOJI = '''
from pipeline.api import Processor


class Cut(Processor):
    """Cuts an emoji in half (one UTF-16 surrogate left: JSON text from a UTF-16 world can hold it)."""

    def process(self, batch):
        for e in batch:
            if isinstance(e.get("data"), dict):
                e["data"]["text"] = str(e["data"].get("text", "")) + " \\ud83d"
        return batch
'''


async def test_alerts_holding_half_an_emoji_do_not_break_the_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """An event text with a lone UTF-16 surrogate cannot be written as JSON (sinks dead-letter such events), and
    its alert, among the last 20, made /api/status answer 500 with a traceback in the log at every poll: the
    status page said the pipeline was unreachable and `pipeline top` ended as if it had stopped."""
    import asyncio

    import aiohttp

    from tests.operator_harness import RULES, config, replay_file, served

    (tmp_path / "half_emoji.py").write_text(HALF_EMOJI)
    monkeypatch.syspath_prepend(str(tmp_path))
    stages = 'stages:\n  - {type: "half_emoji:Cut"}\n' + RULES.split("stages:\n", 1)[1]
    async with served(config(tmp_path, replay_file(tmp_path / "in.jsonl", 100), stages=stages)) as (rt, base):
        assert await rt.run() == 0
        async with aiohttp.ClientSession() as http, http.get(base + "/api/status") as r:
            assert r.status == 200
            snap = await r.json()
        assert len(snap["alerts"]) == 5
        texts = [a["data"]["text"] for a in snap["alerts"]]
        assert "password on screen 0 ?" in texts and all(t.endswith(" ?") for t in texts), texts
        top = await asyncio.create_subprocess_exec(*PIPELINE, "top", base, "--once", "--interval", "0.1", env=ENV,
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(top.communicate(), 30)
    assert top.returncode == 0, err
    assert b"password on screen 0" in out
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


@pytest.mark.parametrize("interval", ["inf", "1e300", "nan", "-1"])
def test_top_refuses_an_interval_no_clock_can_wait(interval: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--interval inf` (or 1e300) ended in an OverflowError traceback from time.sleep, after the first fetch."""
    body = ('{"pipeline":"p","ready":{},"stages":[],"sinks":[],"alerts":[],"uptime":1,"alerts_fired":0,'
            '"dead_lettered":0}')
    with fake_server(JSON.format(n=len(body), body=body)) as address, pytest.raises(SystemExit) as stop:
        cli.main(["top", address, "--once", "--interval", interval])  # argparse's exit: usage and one line
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err, err
    assert f"error: argument --interval: expected seconds between 0 and 86400 (1 day), got {interval!r}" in err
