"""SIGTERM during an alert storm with a webhook that never answers, `when_full: block` (the default): the batch
the source was waiting to hand out when drain_timeout ran out is dead-lettered, and the summary must not call it
`buffer-full dead-lettered` (that names `when_full: dead_letter` drops; no buffer dropped anything for being full).
A real `pipeline run` process, a real signal, a real socket that accepts and never answers."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.broker import free_port
from tests.operator_harness import http_get
from tests.procs import finish, pipeline_run

pytestmark = pytest.mark.timeout(30)


def _buffer_full(port: int) -> bool:
    try:
        _, text = http_get(f"http://127.0.0.1:{port}/metrics")
    except OSError:  # not listening yet
        return False
    return any(s.name == "videodb_pipeline_sink_queue_events" and s.value > 0
               for fam in text_string_to_metric_families(text) for s in fam.samples)


@pytest.fixture
def silent() -> Iterator[socket.socket]:
    """A listening socket that takes connections (the kernel's backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    try:
        yield s
    finally:
        s.close()


def test_events_dropped_at_drain_timeout_are_not_called_buffer_full(tmp_path: Path, silent: socket.socket) -> None:
    """Before: `buffer-full dead-lettered N` (and `buffer_full_dead_lettered` in --summary-json) for a sink whose
    buffer blocks when full: an operator read it as an overflow and would raise `max_bytes`, which changes nothing."""
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps({"channel": "alert", "rtstream_id": "rts-1", "data": {
        "event_label": "code", "text": f"def f{i}(): ...", "timestamp": 1_700_000_000_000 + i}}) + b"\n"
        for i in range(20_000)))
    port = silent.getsockname()[1]
    (tmp_path / "p.yaml").write_text(
        "name: storm\n"
        "source: {type: replay, path: in.jsonl}\n"
        f"sinks:\n  - {{type: alert_forwarder, url: 'http://127.0.0.1:{port}/hook', concurrency: 1,"
        " queue_size: 1, timeout: 20s, shutdown_timeout: 0.5s}\n"
        "runtime: {drain_timeout: 0.3s, queue_size: 1}\ndead_letter: dead.jsonl\n")
    http = free_port()
    proc = pipeline_run("p.yaml", "--summary-json", "summary.json", "--http", f"127.0.0.1:{http}", cwd=tmp_path)
    conn, _ = silent.accept()  # the first alert is on its way and will never be answered: ingest is blocked
    try:
        # the buffer holds a batch the stuck sink cannot take: the source's next one waits for room (within the
        # 0.3 s drain_timeout after SIGTERM at the latest)
        deadline = time.monotonic() + 15
        while not _buffer_full(http) and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        finish(proc, 20)
    finally:
        conn.close()
    reasons = [orjson.loads(x)["reason"] for x in (tmp_path / "dead.jsonl").read_bytes().splitlines()]
    late = reasons.count("not accepted before drain_timeout at shutdown")
    assert late, set(reasons)  # the source's batch did wait for room when drain_timeout ran out
    sink = orjson.loads((tmp_path / "summary.json").read_bytes())["sinks"][0]
    assert "buffer_full_dead_lettered" not in sink, sink
    assert sink["dead_lettered_after_drain_timeout"] == late, sink
    assert sink["failed"] == len(reasons), (sink, len(reasons))
