"""An alert storm still being sent when drain_timeout runs out: the alert forwarder delivers the batch it was
writing in its close() (within shutdown_timeout), and the exit summary must count that batch as written.
Real `pipeline run` processes, a real HTTP receiver that answers slowly, real files."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import pytest

from tests.procs import finish, pipeline_run

pytestmark = pytest.mark.timeout(30)

ALERTS = 12
DELAY = 0.1  # per request, one at a time: the batch takes ~1.2 s, drain_timeout is 0.3 s


class _Slow(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    keys: list[str] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        time.sleep(DELAY)
        self.keys.append(self.headers.get("Idempotency-Key", ""))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[str]]]:
    keys: list[str] = []
    handler = type("Handler", (_Slow,), {"keys": keys})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", keys
    finally:
        server.shutdown()
        server.server_close()


def test_a_spooled_write_close_finishes_after_drain_timeout_is_counted_as_written(
        tmp_path: Path, receiver: tuple[str, list[str]]) -> None:
    """Before: with a disk buffer the sink's write counts only once its flush returns (every alert delivered or
    dead-lettered); the batch whose flush drain_timeout cancelled was delivered by close() and taken out of the
    spool, but the summary said `written 0   delivered 12`: 12 alerts neither written, dead-lettered nor spooled."""
    url, keys = receiver
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps({"channel": "alert", "rtstream_id": "rts-1", "data": {
        "event_label": "code", "text": f"def f{i}(): ...", "timestamp": 1_700_000_000_000 + i}}) + b"\n"
        for i in range(ALERTS)))
    (tmp_path / "p.yaml").write_text(
        "name: storm\n"
        "source: {type: replay, path: in.jsonl}\n"
        f"sinks:\n  - {{type: alert_forwarder, url: '{url}', concurrency: 1, shutdown_timeout: 20s,"
        " buffer: {type: disk}}\n"
        "runtime: {drain_timeout: 0.3s}\nstate_dir: state\ndead_letter: dead.jsonl\n")
    proc = pipeline_run("p.yaml", "--summary-json", "summary.json", cwd=tmp_path)
    _, err = finish(proc, 20)
    assert "did not drain within drain_timeout" in err, err  # the write was still going on at drain_timeout
    summary = orjson.loads((tmp_path / "summary.json").read_bytes())
    sink = summary["sinks"][0]
    assert len(set(keys)) == ALERTS and sink["delivered"] == ALERTS, (keys, sink)
    assert sink["written"] == ALERTS, sink
    assert not (tmp_path / "dead.jsonl").exists()
