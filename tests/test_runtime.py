"""End-to-end runs of the local runtime with real files, sockets, subprocesses and signals."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from pipeline.build import build
from pipeline.config import load_config
from pipeline.runtime.local import LocalRuntime

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "config/samples/meeting-session.jsonl"
PIPELINE = [sys.executable, "-m", "pipeline.cli"]


def lines(path: Path) -> list[dict]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


def run_cli(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run([*PIPELINE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_demo_config_end_to_end(tmp_path: Path) -> None:
    cfg = (ROOT / "config/replay.yaml").read_text().replace("out/replay", str(tmp_path / "demo"))
    (tmp_path / "demo.yaml").write_text(cfg.replace("samples/", str(ROOT / "config/samples") + "/"))
    res = run_cli("run", str(tmp_path / "demo.yaml"))
    assert res.returncode == 0, res.stderr
    assert "[ALERT critical secret-exposed display:1]" in res.stdout
    events, alerts = lines(tmp_path / "demo/events.jsonl"), lines(tmp_path / "demo/alerts.jsonl")
    sample = lines(SAMPLE)
    assert all("ts" in e and "unix_ts" in e for e in events)
    assert not any(e.get("data", {}).get("is_final") is False for e in events)
    rule_alerts = [a for a in alerts if a.get("origin") == "rules"]
    assert {a["data"]["event_label"] for a in rule_alerts} == {"code-on-screen", "secret-exposed", "chat-distraction"}
    assert len(alerts) == len(rule_alerts) + sum(1 for e in sample if e.get("channel") == "alert")
    assert f"alerts fired by rules: {len(rule_alerts)}" in res.stderr
    assert oct((tmp_path / "demo/events.jsonl").stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "demo").stat().st_mode & 0o777) == "0o700"


def write_config(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(body)
    return p


def make_events(path: Path, n: int, *, start: int = 0) -> None:
    with path.open("wb") as fh:
        for i in range(start, start + n):
            fh.write(orjson.dumps({"channel": "transcript", "rtstream_id": "rts-1", "id": i,
                                   "data": {"text": f"line {i}", "is_final": True, "start": i}}) + b"\n")


async def test_slow_sink_backpressure_drops_nothing(tmp_path: Path) -> None:
    make_events(tmp_path / "in.jsonl", 5000)
    cfg = load_config(write_config(tmp_path, f"""
name: bp
source: {{type: replay, path: {tmp_path}/in.jsonl, batch_size: 100}}
runtime: {{queue_size: 2}}
sinks:
  - {{type: "tests.slow_sink:SlowSink", path: {tmp_path}/counts.txt, delay: 0.01}}
  - {{type: jsonl, path: {tmp_path}/out.jsonl}}
"""))
    rt = LocalRuntime(build(cfg), install_signals=False)
    assert await rt.run() == 0
    counts = [int(x) for x in (tmp_path / "counts.txt").read_text().split()]
    assert sum(counts) == 5000 and len(counts) == 50
    assert [e["id"] for e in lines(tmp_path / "out.jsonl")] == list(range(5000))


async def test_replay_dead_letters_bad_lines_and_goes_on(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"channel": "transcript", "data": {"text": "a"}}\nnot json\n[1, 2]\n\n'
                    b'{"channel": "transcript", "data": {"text": "b"}}\n{"channel": "transc')
    cfg = load_config(write_config(tmp_path, f"""
name: dl
source: {{type: replay, path: {src}}}
sinks: [{{type: jsonl, path: {tmp_path}/out.jsonl}}]
dead_letter: {tmp_path}/dead.jsonl
"""))
    rt = LocalRuntime(build(cfg), install_signals=False)
    assert await rt.run() == 0
    assert [e["data"]["text"] for e in lines(tmp_path / "out.jsonl")] == ["a", "b"]
    dead = lines(tmp_path / "dead.jsonl")
    assert [(d["origin"]["line"], d["reason"].split(":")[0]) for d in dead] == [
        (2, "not JSON"), (3, "JSON list, not an object"), (6, "truncated last line")]
    assert all(d["origin"]["file"] == str(src) for d in dead)
    assert "dead-lettered: 3" in rt.summary()


async def test_replay_speed_paces_by_unix_ts(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps({"channel": "x", "unix_ts": 1000 + i * 0.5, "ts": "keep"}) + b"\n"
                             for i in range(5)))
    cfg = load_config(write_config(tmp_path, f"""
name: sp
source: {{type: replay, path: {src}, speed: 4}}
sinks: [{{type: jsonl, path: {tmp_path}/out.jsonl}}]
"""))
    t0 = time.monotonic()
    assert await LocalRuntime(build(cfg), install_signals=False).run() == 0
    assert time.monotonic() - t0 >= 0.45  # 2 s of event time at 4x
    assert [e["ts"] for e in lines(tmp_path / "out.jsonl")] == ["keep"] * 5


async def test_failing_sink_is_one_clear_error_and_loses_nothing(tmp_path: Path) -> None:
    """One sink dies: the run stops with its error; the other sink still gets everything read; the dead
    sink's events are all in the dead-letter file."""
    make_events(tmp_path / "in.jsonl", 3000)
    cfg = load_config(write_config(tmp_path, f"""
name: fail
source: {{type: replay, path: {tmp_path}/in.jsonl, batch_size: 10}}
runtime: {{queue_size: 1}}
sinks:
  - {{type: "tests.slow_sink:FailingSink"}}
  - {{type: jsonl, path: {tmp_path}/out.jsonl}}
dead_letter: {tmp_path}/dead.jsonl
"""))
    rt = LocalRuntime(build(cfg), install_signals=False)
    assert await rt.run() == 1
    assert "No space left on device" in str(rt.error)
    read = rt.b.source.context.stats.received
    assert [e["id"] for e in lines(tmp_path / "out.jsonl")] == list(range(read))
    assert sorted(d["event"]["id"] for d in lines(tmp_path / "dead.jsonl")) == list(range(read))
    assert read < 3000  # the failure stopped the source early


def test_unwritable_path_one_line_nonzero_exit(tmp_path: Path) -> None:
    make_events(tmp_path / "in.jsonl", 3)
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    p = write_config(tmp_path, f"""
name: ro
source: {{type: replay, path: {tmp_path}/in.jsonl}}
sinks: [{{type: jsonl, path: {ro}/sub/out.jsonl}}]
""")
    res = run_cli("run", str(p), cwd=tmp_path)
    if os.geteuid() == 0:  # root ignores directory modes; use a file where a directory should be
        (tmp_path / "file").write_text("")
        p.write_text(p.read_text().replace(f"{ro}/sub", f"{tmp_path}/file/sub"))
        res = run_cli("run", str(p), cwd=tmp_path)
    assert res.returncode == 1
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("pipeline:")]
    assert len(err) == 1 and "/sub" in err[0], res.stderr
    assert "Traceback" not in res.stderr


def test_config_error_is_one_line_exit_2(tmp_path: Path) -> None:
    p = write_config(tmp_path, "name: x\nsource: {type: replai, path: a}\nsinks: [{type: jsonl, path: b}]\n")
    res = run_cli("run", str(p))
    assert res.returncode == 2
    expected = f"pipeline: {p}:2:10: source.type: unknown source type 'replai' (did you mean 'replay'?)"
    assert res.stderr.strip() == expected


def test_validate_masks_secrets(tmp_path: Path) -> None:
    p = write_config(tmp_path, """
name: v
videodb: {api_key: "${KEY}"}
source: {type: replay, path: a.jsonl}
sinks: [{type: jsonl, path: b.jsonl}]
""")
    (p.parent / "a.jsonl").write_text("")  # validate checks that input files exist
    res = run_cli("validate", str(p), env={"KEY": "sk-very-secret-123"})
    assert res.returncode == 0 and "sk-very-secret-123" not in res.stdout + res.stderr


async def _ws_server(frames: list[str | bytes], hold: asyncio.Event):
    import websockets

    async def handler(ws) -> None:  # type: ignore[no-untyped-def]
        await ws.send('{"connection_id": "conn-1"}')
        for f in frames:
            await ws.send(f)
        await hold.wait()

    return await websockets.serve(handler, "127.0.0.1", 0)


async def test_websocket_source_stamps_and_dead_letters(tmp_path: Path) -> None:
    hold = asyncio.Event()
    good = [orjson.dumps({"channel": "transcript", "data": {"text": f"t{i}"}}).decode() for i in range(50)]
    frames = [*good[:25], "garbage{", "[1]", "x" * 3000, *good[25:]]
    server = await _ws_server(frames, hold)
    port = server.sockets[0].getsockname()[1]
    cfg = load_config(write_config(tmp_path, f"""
name: ws
source: {{type: websocket, url: "ws://127.0.0.1:{port}/", max_message_bytes: 2048}}
sinks: [{{type: jsonl, path: {tmp_path}/out.jsonl, flush_interval: 0.05s}}]
dead_letter: {tmp_path}/dead.jsonl
"""))
    built = build(cfg)
    rt = LocalRuntime(built, install_signals=False)
    task = asyncio.create_task(rt.run())
    for _ in range(200):
        if (tmp_path / "out.jsonl").exists() and len(lines(tmp_path / "out.jsonl")) == 50:
            break
        await asyncio.sleep(0.02)
    assert built.session.connection_id == "conn-1"
    await rt.stop()
    assert await task == 0
    hold.set()
    server.close()
    out = lines(tmp_path / "out.jsonl")
    assert [e["data"]["text"] for e in out] == [f"t{i}" for i in range(50)]
    assert all(e["ts"].endswith("Z") and isinstance(e["unix_ts"], float) for e in out)
    reasons = [d["reason"] for d in lines(tmp_path / "dead.jsonl")]
    assert reasons[0].startswith("not JSON") and reasons[1] == "JSON list, not an object"
    assert "exceeds max_message_bytes=2048" in reasons[2]


async def test_websocket_source_stamps_every_event_itself(tmp_path: Path) -> None:
    """A peer's own `ts`/`unix_ts` were kept: it picked its events' receipt time, so the `{date}` directory a
    sink filed them under (one per day it claimed) and the shape of `ts` (any JSON). Every event is now stamped
    on receipt, as the README and the seed listener say."""
    import time

    hold = asyncio.Event()
    frames = [orjson.dumps({"channel": "transcript", "ts": {"deep": ["x"] * 50}, "unix_ts": 4_102_444_800.0 + i,
                            "data": {"text": f"t{i}"}}).decode() for i in range(20)]
    server = await _ws_server(frames, hold)
    port = server.sockets[0].getsockname()[1]
    began = time.time()
    cfg = load_config(write_config(tmp_path, f"""
name: ws
source: {{type: websocket, url: "ws://127.0.0.1:{port}/"}}
sinks: [{{type: jsonl, path: "{tmp_path}/{{date}}.jsonl", flush_interval: 0.05s}}]
dead_letter: {tmp_path}/dead.jsonl
"""))
    rt = LocalRuntime(build(cfg), install_signals=False)
    task = asyncio.create_task(rt.run())
    for _ in range(200):
        if sum(len(lines(p)) for p in tmp_path.glob("*-*-*.jsonl")) == 20:
            break
        await asyncio.sleep(0.02)
    await rt.stop()
    assert await task == 0
    hold.set()
    server.close()
    files = list(tmp_path.glob("*-*-*.jsonl"))
    today = {time.strftime("%Y-%m-%d.jsonl", time.gmtime(t)) for t in (began, time.time())}  # (midnight)
    assert len(files) == 1 and files[0].name in today, files  # not 2100-01-01
    out = lines(files[0])
    assert [e["data"]["text"] for e in out] == [f"t{i}" for i in range(20)]
    assert all(isinstance(e["ts"], str) and e["ts"].endswith("Z") and began <= e["unix_ts"] <= time.time()
               for e in out), out[0]


def test_sigterm_drains_everything_received(tmp_path: Path) -> None:
    """A websocket server floods events; SIGTERM mid-stream; every event the pipeline read is on disk."""
    server = tmp_path / "server.py"
    server.write_text("""
import asyncio, sys, orjson, websockets
async def handler(ws):
    await ws.send('{"connection_id": "c"}')
    i = 0
    while True:
        await ws.send(orjson.dumps({"channel": "transcript", "id": i, "data": {"text": "x"}}))
        i += 1
        if i % 100 == 0:
            await asyncio.sleep(0)
async def main():
    s = await websockets.serve(handler, "127.0.0.1", 0)
    print(s.sockets[0].getsockname()[1], flush=True)
    await asyncio.Future()
asyncio.run(main())
""")
    srv = subprocess.Popen([sys.executable, str(server)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(srv.stdout.readline())  # type: ignore[union-attr]
        p = write_config(tmp_path, f"""
name: term
state_dir: {tmp_path}/state
source: {{type: websocket, url: "ws://127.0.0.1:{port}/"}}
sinks:
  - {{type: jsonl, path: {tmp_path}/a.jsonl}}
  - {{type: "tests.slow_sink:SlowSink", path: {tmp_path}/counts.txt, delay: 0.001}}
""")
        proc = subprocess.Popen([*PIPELINE, "run", str(p)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.time() + 20
        while time.time() < deadline and (not (tmp_path / "a.jsonl").exists()
                                           or (tmp_path / "a.jsonl").stat().st_size < 200_000):
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        srv.kill()
    raw = (tmp_path / "a.jsonl").read_bytes()
    assert raw.endswith(b"\n")
    ids = [e["id"] for e in lines(tmp_path / "a.jsonl")]
    assert ids == list(range(len(ids))) and len(ids) > 1000
    assert sum(int(x) for x in (tmp_path / "counts.txt").read_text().split()) == len(ids)
    read = int(next(ln for ln in err.splitlines() if "source:websocket" in ln).split()[2])
    assert read == len(ids)


def test_second_signal_forces_exit(tmp_path: Path) -> None:
    make_events(tmp_path / "in.jsonl", 2000)
    p = write_config(tmp_path, f"""
name: force
source: {{type: replay, path: {tmp_path}/in.jsonl, batch_size: 1}}
runtime: {{queue_size: 1}}
sinks: [{{type: "tests.slow_sink:SlowSink", path: {tmp_path}/c.txt, delay: 5}}]
""")
    proc = subprocess.Popen([*PIPELINE, "run", str(p)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    started = tmp_path / "c.txt.started"
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 130 and "second signal" in err


@pytest.mark.parametrize("name", ["events.jsonl"])
async def test_jsonl_refuses_symlink(tmp_path: Path, name: str) -> None:
    (tmp_path / "real").write_text("")
    (tmp_path / name).symlink_to(tmp_path / "real")
    make_events(tmp_path / "in.jsonl", 1)
    cfg = load_config(write_config(tmp_path, f"""
name: sym
source: {{type: replay, path: {tmp_path}/in.jsonl}}
sinks: [{{type: jsonl, path: {tmp_path}/{name}}}]
"""))
    rt = LocalRuntime(build(cfg), install_signals=False)
    assert await rt.run() == 1 and "symlink" in str(rt.error)


def test_delegated_commands_get_their_options() -> None:
    res = run_cli("emulate", "--speed", "-1")
    assert res.returncode != 0 and "speed must be >= 0" in res.stderr


async def test_stop_interrupts_a_reconnect_backoff_and_a_paced_replay(tmp_path: Path) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens: the source sits in a 30 s backoff
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"channel": "x", "unix_ts": 1000}\n{"channel": "x", "unix_ts": 2000}\n')
    for source in (f'{{type: websocket, url: "ws://127.0.0.1:{port}/", backoff_initial: 30s}}',
                   f"{{type: replay, path: {src}, speed: 1}}"):
        cfg = load_config(write_config(tmp_path, f"""
name: stop
source: {source}
sinks: [{{type: jsonl, path: {tmp_path}/out.jsonl}}]
"""))
        rt = LocalRuntime(build(cfg), install_signals=False)
        task = asyncio.create_task(rt.run())
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        await rt.stop()
        assert await asyncio.wait_for(task, 5) == 0
        assert time.monotonic() - t0 < 2


async def test_paced_replay_dead_letters_a_line_without_a_numeric_unix_ts(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"id": 1, "unix_ts": 1.0}\n{"id": 2, "unix_ts": null}\n{"id": 3, "unix_ts": 1.01}\n')
    cfg = load_config(write_config(tmp_path, f"""
name: paced
source: {{type: replay, path: {src}, speed: 1}}
sinks: [{{type: jsonl, path: {tmp_path}/out.jsonl}}]
dead_letter: {tmp_path}/dead.jsonl
"""))
    assert await LocalRuntime(build(cfg), install_signals=False).run() == 0
    assert [e["id"] for e in lines(tmp_path / "out.jsonl")] == [1, 3]
    assert "unix_ts is not a number" in lines(tmp_path / "dead.jsonl")[0]["reason"]


async def test_websocket_reader_is_bounded_when_the_pipeline_is_slow(tmp_path: Path, make_context) -> None:  # type: ignore[no-untyped-def]
    """A slow consumer stops the reader at 4 x batch_max pending events instead of growing memory."""
    from stages.sources.websocket import WebSocketOptions, WebSocketSource

    hold = asyncio.Event()
    frames = [orjson.dumps({"channel": "transcript", "id": i}).decode() for i in range(2000)]
    server = await _ws_server(frames, hold)
    port = server.sockets[0].getsockname()[1]
    src = WebSocketSource(WebSocketOptions(url=f"ws://127.0.0.1:{port}/", batch_max=10), make_context())
    it = src.batches()
    first = await it.__anext__()
    await asyncio.sleep(0.5)  # the server has sent everything; we took one batch
    assert len(src._pending) <= 40
    got = len(first)
    while got < 2000:
        got += len(await it.__anext__())
    assert got == 2000
    await src.stop()
    await it.aclose()
    hold.set()
    server.close()


def test_a_replay_at_any_speed_fires_the_same_alerts_and_windows(tmp_path: Path) -> None:
    """Guarantees, Time: cooldowns, windows and alert times follow event time. Flat out, the events come in
    one batch; paced (speed 4), one by one over half a second of wall time: the outputs are the same."""
    src = tmp_path / "in.jsonl"
    t0 = 1_772_446_500.0
    words = ["the password is", "weather", "password again", "nothing", "a password"]
    with open(src, "wb") as f:
        for i in range(40):  # 2 s of event time, one event every 50 ms, a hit in three of five
            at = t0 + i * 0.05
            f.write(orjson.dumps({"channel": "transcript", "rtstream_id": f"rts-{i % 2}", "unix_ts": at,
                                  "data": {"text": words[i % 5], "start": int(at * 1000), "is_final": True}})
                    + b"\n")
    outputs = []
    for speed in (0, 4):
        out = tmp_path / f"speed-{speed}"
        cfg = write_config(tmp_path, f"""
name: speed
source: {{type: replay, path: {src}, speed: {speed}}}
stages:
  - type: rules
    rules: [{{name: secret, keywords: [password], cooldown: 300ms}}]
  - {{type: window, size: 500ms, key: [rtstream_id]}}
sinks:
  - {{type: jsonl, path: {out}/alerts.jsonl, channels: [alert]}}
  - {{type: jsonl, path: {out}/metrics.jsonl, channels: [metrics]}}
dead_letter: {out}/dead.jsonl
""")
        res = run_cli("run", str(cfg), cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        outputs.append(((out / "alerts.jsonl").read_bytes(), (out / "metrics.jsonl").read_bytes()))
    (alerts, metrics), paced = outputs
    assert alerts.count(b"\n") >= 4 and metrics.count(b"\n") == 8  # 2 streams x 4 windows of 500 ms
    assert paced == (alerts, metrics)


async def test_a_wss_source_refuses_a_certificate_it_cannot_verify(tmp_path: Path) -> None:
    """Guarantees, Security: certificates are verified for wss://. A server with a self-signed certificate
    is never read from: each connect fails on verification, and the source gives up after max_retries."""
    import ssl

    import websockets

    from tests.webhook_server import self_signed

    cert, key = self_signed(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    hold = asyncio.Event()

    async def handler(ws) -> None:  # type: ignore[no-untyped-def]
        await ws.send(orjson.dumps({"channel": "transcript", "data": {"text": "must not be read"}}).decode())
        await hold.wait()

    server = await websockets.serve(handler, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    cfg = load_config(write_config(tmp_path, f"""
name: tls
source: {{type: websocket, url: "wss://127.0.0.1:{port}/", max_retries: 1, backoff_initial: 10ms}}
sinks: [{{type: jsonl, path: {tmp_path}/out.jsonl, flush_interval: 0}}]
dead_letter: {tmp_path}/dead.jsonl
"""))
    rt = LocalRuntime(build(cfg), install_signals=False)
    try:
        code = await asyncio.wait_for(rt.run(), 10)
    finally:
        hold.set()
        server.close()
    assert code == 1
    assert "CERTIFICATE_VERIFY_FAILED" in str(rt.error) or "certificate verify failed" in str(rt.error), rt.error
    assert not (tmp_path / "out.jsonl").exists() or not (tmp_path / "out.jsonl").read_bytes()


async def test_websocket_reader_stops_at_its_byte_bound_too(tmp_path: Path, make_context,  # type: ignore[no-untyped-def]
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Guarantees, Backpressure: the source reads ahead 4 x batch_max events *or* PENDING_BYTES (32 MiB) of
    frames, whichever comes first; large frames stop it on bytes long before the event count (bound
    lowered to 1 MiB here, frames of 200 KB)."""
    from stages.sources import websocket
    from stages.sources.websocket import WebSocketOptions, WebSocketSource

    monkeypatch.setattr(websocket, "PENDING_BYTES", 1 << 20)
    hold = asyncio.Event()
    pad = "x" * 200_000
    frames = [orjson.dumps({"channel": "transcript", "id": i, "data": {"text": pad}}).decode() for i in range(60)]
    server = await _ws_server(frames, hold)
    port = server.sockets[0].getsockname()[1]
    src = WebSocketSource(WebSocketOptions(url=f"ws://127.0.0.1:{port}/", batch_max=1024), make_context())
    it = src.batches()
    try:
        got = len(await it.__anext__())
        for _ in range(200):  # until the reader waits for room (the server has sent all 12 MB by then)
            if not src._room.is_set():
                break
            await asyncio.sleep(0.01)
        assert not src._room.is_set(), "the reader never stopped"
        assert src._pending_bytes < (1 << 20) + 250_000 and len(src._pending) < 10
        while got < 60:
            got += len(await it.__anext__())
        assert got == 60
    finally:
        await src.stop()
        hold.set()
        server.close()
