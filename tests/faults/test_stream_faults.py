"""Faults on the ingest side: drops, garbage, kill -9, signals under load. Real sockets and processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = [sys.executable, "-m", "pipeline.cli"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def read_jsonl(path: Path) -> list[dict]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


@pytest.fixture
def flood(request: pytest.FixtureRequest) -> Iterator[int]:
    total, drop_every, garbage_every = request.param
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("flood_server.py")),
                             str(total), str(drop_every), str(garbage_every), "7"], stdout=subprocess.PIPE, text=True)
    try:
        yield int(proc.stdout.readline())  # type: ignore[union-attr]
    finally:
        proc.kill()
        proc.wait()


def config(tmp: Path, port: int, extra_sink: str = "") -> Path:
    p = tmp / "p.yaml"
    p.write_text(f"""
name: soak
source: {{type: websocket, url: "ws://127.0.0.1:{port}/", backoff_initial: 0.01s, backoff_max: 0.05s}}
stages:
  - type: rules
    rules: [{{name: hit, keywords: ["event"], match: substring, cooldown: 1m}}]
sinks:
  - {{type: jsonl, path: {tmp}/out.jsonl, channels: [transcript]}}
  {extra_sink}
dead_letter: {tmp}/dead.jsonl
""")
    return p


def wait_for_lines(path: Path, n: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        time.sleep(0.05)


@pytest.mark.parametrize("flood", [(100_000, 5_000, 997)], indirect=True)
def test_soak_drops_and_garbage_account_for_every_event(tmp_path: Path, flood: int) -> None:
    """100k events, random drops, garbage: every id arrives exactly once; garbage counted in dead letter."""
    proc = subprocess.Popen([*PIPELINE, "run", str(config(tmp_path, flood))], cwd=tmp_path, env=ENV,
                            stderr=subprocess.PIPE, text=True)
    wait_for_lines(tmp_path / "out.jsonl", 100_000, 120)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    ids = [e["id"] for e in read_jsonl(tmp_path / "out.jsonl")]
    assert sorted(ids) == list(range(100_000)), "missing or duplicated ids"
    dead = read_jsonl(tmp_path / "dead.jsonl")
    garbage = sum(1 for i in range(100_000) if i % 997 == 0)
    assert len(dead) == garbage and all(d["reason"] for d in dead)
    read = int(next(ln for ln in err.splitlines() if "source:websocket" in ln).split()[2])
    assert read == 100_000  # events in == events out + dead-lettered (garbage never counts as read)
    assert "connection dropped" in err and "reconnecting" in err


def test_refused_connections_keep_retrying_then_give_up(tmp_path: Path) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here
    p = tmp_path / "p.yaml"
    p.write_text(f"""
name: refused
source: {{type: websocket, url: "ws://127.0.0.1:{port}/", backoff_initial: 0.01s, max_retries: 4}}
sinks: [{{type: jsonl, path: {tmp_path}/out.jsonl}}]
""")
    res = subprocess.run([*PIPELINE, "run", str(p)], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 1
    assert res.stderr.count("connect failed") == 4
    assert "gave up after 4 reconnect attempts" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("flood", [(10_000_000, 0, 0)], indirect=True)
def test_kill_9_leaves_whole_lines_and_restart_appends(tmp_path: Path, flood: int) -> None:
    p = config(tmp_path, flood).read_text().replace("out.jsonl,", "out.jsonl, flush_interval: 0.01s,")
    (tmp_path / "p.yaml").write_text(p)
    out = tmp_path / "out.jsonl"
    for _round in range(2):
        before = len(read_jsonl(out)) if out.exists() else 0
        proc = subprocess.Popen([*PIPELINE, "run", str(tmp_path / "p.yaml")], cwd=tmp_path, env=ENV,
                                stderr=subprocess.DEVNULL)
        wait_for_lines(out, before + 20_000, 60)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        raw = out.read_bytes()
        body = raw if raw.endswith(b"\n") else raw[: raw.rfind(b"\n") + 1]
        for line in body.splitlines():
            orjson.loads(line)  # every complete line parses
        assert len(body.splitlines()) >= before + 20_000
    # the replay source reads such a file: whole lines through, a torn last line dead-lettered
    (tmp_path / "r.yaml").write_text(f"""
name: reread
source: {{type: replay, path: {out}}}
sinks: [{{type: jsonl, path: {tmp_path}/again.jsonl}}]
dead_letter: {tmp_path}/dead2.jsonl
""")
    res = subprocess.run([*PIPELINE, "run", str(tmp_path / "r.yaml")], cwd=tmp_path, env=ENV, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert len(read_jsonl(tmp_path / "dead2.jsonl")) <= 2  # at most one torn line per killed run


@pytest.mark.parametrize("flood", [(10_000_000, 0, 0)], indirect=True)
def test_sigterm_under_full_load_every_event_in_every_sink(tmp_path: Path, flood: int) -> None:
    second = f"- {{type: jsonl, path: {tmp_path}/all.jsonl}}"
    proc = subprocess.Popen([*PIPELINE, "run", str(config(tmp_path, flood, second))], cwd=tmp_path, env=ENV,
                            stderr=subprocess.PIPE, text=True)
    wait_for_lines(tmp_path / "all.jsonl", 50_000, 60)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    a = read_jsonl(tmp_path / "out.jsonl")
    b = [e for e in read_jsonl(tmp_path / "all.jsonl") if e.get("channel") == "transcript"]
    read = int(next(ln for ln in err.splitlines() if "source:websocket" in ln).split()[2])
    assert [e["id"] for e in a] == [e["id"] for e in b] == list(range(read))
    assert (tmp_path / "out.jsonl").read_bytes().endswith(b"\n")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_disk_full_is_one_clear_line(tmp_path: Path) -> None:
    """A real ENOSPC (/dev/full): one line naming the sink and the path (before, only the path: which of several
    sinks?), exit 1, no traceback, events dead-lettered."""
    mode = Path("/dev/full").stat().st_mode
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps({"channel": "transcript", "id": i}) + b"\n" for i in range(20_000)))
    (tmp_path / "p.yaml").write_text(f"""
name: full
source: {{type: replay, path: {src}, batch_size: 100}}
sinks:
  - {{type: jsonl, path: /dev/full}}
  - {{type: jsonl, path: {tmp_path}/ok.jsonl}}
dead_letter: {tmp_path}/dead.jsonl
""")
    res = subprocess.run([*PIPELINE, "run", str(tmp_path / "p.yaml")], cwd=tmp_path, env=ENV, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 1
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("pipeline:")]
    assert errors == ["pipeline: sinks[0]:jsonl: /dev/full: cannot write: No space left on device"], res.stderr
    assert "Traceback" not in res.stderr
    # every event read: in the healthy sink, and (the /dev/full sink's share, buffered ones included) dead-lettered
    ok = [e["id"] for e in read_jsonl(tmp_path / "ok.jsonl")]
    dead = sorted(d["event"]["id"] for d in read_jsonl(tmp_path / "dead.jsonl"))
    assert ok == dead == list(range(len(ok))) and len(ok) > 100
    assert Path("/dev/full").stat().st_mode == mode  # we never chmod what is not a regular file
