"""Events that could be neither delivered nor dead-lettered are on /metrics (and the status JSON) while the run
stops, not only in the exit summary after it: before, a scrape had no counter for them at all."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.broker import free_port
from tests.operator_harness import http_get
from tests.procs import stop_process

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

pytestmark = pytest.mark.timeout(40)


def lost_in(text: str) -> float | None:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "videodb_pipeline_events_lost_total" and s.labels == {"pipeline": "dl-lost"}:
                return s.value
    return None


def test_events_lost_with_the_dead_letter_file_are_counted_on_metrics_while_the_run_stops(tmp_path: Path) -> None:
    """The sink stalls (a hold file), its buffer fills and dead-letters the rest, but the dead-letter file's
    directory was replaced by a file: those events are lost and the run stops. While it waits for the stalled
    sink, /metrics and /api/status already count them, and the count is the exit summary's `LOST N`."""
    (tmp_path / "in.jsonl").write_bytes(b"".join(
        orjson.dumps({"channel": "transcript", "id": i, "rtstream_id": "r",
                      "data": {"text": "x", "start": 1710000000000 + i}}) + b"\n" for i in range(2000)))
    (tmp_path / "dl").mkdir()
    out = tmp_path / "out.txt"
    hold = tmp_path / "out.txt.hold"
    hold.touch()
    port = free_port()
    (tmp_path / "p.yaml").write_text(f"""
name: dl-lost
source: {{type: replay, path: {tmp_path}/in.jsonl, batch_size: 100}}
runtime: {{queue_size: 1, drain_timeout: 30s, status_interval: 0}}
sinks:
  - type: tests.slow_sink:DeadLetterGoneSink
    path: {out}
    delay: 0
    buffer: {{type: memory, max_bytes: 30000, when_full: dead_letter}}
dead_letter: {tmp_path}/dl/dead.jsonl
state_dir: {tmp_path}/state
""")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(tmp_path / "p.yaml"), "--http",
                             f"127.0.0.1:{port}"], cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        lost, status = None, None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                _, text = http_get(f"http://127.0.0.1:{port}/metrics")
                lost = lost_in(text)
                if lost:
                    _, body = http_get(f"http://127.0.0.1:{port}/api/status")
                    status = orjson.loads(body)
                    break
            except OSError:
                pass
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the stalled sink was let go"
        assert lost, f"no lost events on /metrics: {lost}"  # None before: the metric did not exist
        assert status is not None and status["lost"] == lost, status
        hold.unlink()
        _, err = proc.communicate(timeout=30)
    finally:
        stop_process(proc)
    stderr = err.decode()
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr
    assert f"  LOST {int(lost)} event(s) that could not be dead-lettered" in stderr, stderr
