"""A webhook that refuses every alert of a storm: the log must not get one line per alert (the receiver would
decide how much the pipeline writes to stderr), while the dead-letter file keeps every alert.
A real `pipeline run` process and a real HTTP server answering 404, as a revoked Slack webhook does."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import pytest

from tests.procs import finish, pipeline_run

pytestmark = pytest.mark.timeout(30)

ALERTS = 300


class _Revoked(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(404)
        self.send_header("Content-Length", "10")
        self.end_headers()
        self.wfile.write(b"no_service")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def revoked() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Revoked)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()


def test_a_refusing_webhook_logs_a_few_lines_not_one_per_alert(tmp_path: Path, revoked: str) -> None:
    """Before: 300 lines `1 alert(s) not delivered, dead-lettered: HTTP 404` (143,484 for a storm of that many)."""
    (tmp_path / "in.jsonl").write_bytes(b"".join(orjson.dumps({"channel": "alert", "rtstream_id": "rts-1", "data": {
        "event_label": "code", "text": f"def f{i}(): ...", "timestamp": 1_700_000_000_000 + i}}) + b"\n"
        for i in range(ALERTS)))
    (tmp_path / "p.yaml").write_text(
        "name: storm\nsource: {type: replay, path: in.jsonl}\n"
        f"sinks:\n  - {{type: alert_forwarder, url: '{revoked}'}}\ndead_letter: dead.jsonl\n")
    _, err = finish(pipeline_run("p.yaml", cwd=tmp_path), 20)
    lines = [x for x in err.splitlines() if "not delivered" in x]
    assert len(lines) <= 3, "\n".join(lines[:5])
    assert "HTTP 404: no_service" in lines[0], lines[0]
    counts = [int(m.group(1)) for x in lines if (m := re.search(r"/\*\*\*: (\d+) (?:more )?alert", x))]
    assert sum(counts) == ALERTS, lines  # the log still says how many
    dead = (tmp_path / "dead.jsonl").read_bytes().splitlines()
    assert len(dead) == ALERTS and all(orjson.loads(x)["status"] == 404 for x in dead)
