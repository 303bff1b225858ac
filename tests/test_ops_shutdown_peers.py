"""Peers of the operator endpoint that stop reading cannot hold up a stop: a real `pipeline run`, a real
socket that never reads (a tap stream, or requests sent back to back), SIGTERM."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from tests.broker import free_port
from tests.operator_harness import config
from tests.procs import stop_process
from tests.test_ops_cli import ENV, PIPELINE


def big_events(path: Path, n: int = 3000, size: int = 20_000) -> Path:
    with path.open("wb") as fh:
        for i in range(n):
            fh.write(orjson.dumps({"channel": "transcript", "id": i, "unix_ts": 1_700_000_000 + i / 1000,
                                   "data": {"text": f"{i} " + "x" * size}}) + b"\n")
    return path


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def metric(base: str, name: str) -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        found = re.search(rf"^{name}{{[^}}]*}} (\S+)$", r.read().decode(), re.M)
    assert found, name
    return float(found[1])


def stalled_tap(base: str, port: int) -> socket.socket:
    """A tap client that never reads, once the pipeline has dropped events for it (its buffer is full: the
    server's write to it waits)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /tap?at=source HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    wait_for(lambda: metric(base, "videodb_pipeline_tap_dropped_events_total") > 0, "the tap to fall behind")
    return s


def stalled_requests(base: str, port: int) -> socket.socket:
    """Requests for /metrics sent back to back, no answer read, until the server stops taking more."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.setblocking(False)
    chunk = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 1000
    full_since = None
    while full_since is None or time.monotonic() - full_since < 0.5:  # full, and stays full
        try:
            s.send(chunk)
            full_since = None
        except BlockingIOError:
            full_since = full_since or time.monotonic()
            time.sleep(0.01)
    return s


@pytest.mark.parametrize("peer", [stalled_tap, stalled_requests])
def test_a_peer_that_stops_reading_does_not_hold_up_sigterm(tmp_path: Path,
                                                            peer: Callable[[str, int], socket.socket]) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cfg = config(tmp_path, big_events(tmp_path / "ev.jsonl"), speed=1)
    proc = subprocess.Popen([*PIPELINE, "run", str(cfg), "--http", f"127.0.0.1:{port}", "-q",
                             "--summary-json", str(tmp_path / "summary.json")], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        def ready() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                with urllib.request.urlopen(base + "/ready", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(ready, "the pipeline to be ready")
        sock = peer(base, port)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        took = time.monotonic() - t0
        sock.close()
    finally:
        stop_process(proc)
    assert code == 0
    # the run alone stops in a tenth of a second; the server waited 2 s for the peer, then 2 s more
    assert took < 1.5, f"SIGTERM took {took:.1f}s"
    summary = json.loads((tmp_path / "summary.json").read_text())
    read = summary["stages"][0]["read"]
    assert 0 < read < 3000
    assert summary["sinks"][0]["written"] == read and summary["dead_lettered"] == 0
