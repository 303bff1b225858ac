"""A reload re-creates a sink whose start() never returns (a broker that does not answer the connect, a plugin):
ingest waited for it for ever. Now the start is bounded by the sink's `start_timeout`: the reload is rejected for
that sink, one log line says so, the sink runs on with its previous options and the metric counts the rejection.

Real parts: `pipeline run` in a subprocess, SIGHUP, a scrape of /metrics, the summary on stderr.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.broker import free_port
from tests.operator_harness import http_get
from tests.procs import stop_process

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

pytestmark = pytest.mark.timeout(40)


def write_config(tmp_path: Path, extra: str = "") -> None:
    (tmp_path / "p.yaml").write_text(f"""
name: reload-start
source: {{type: "tests.slow_sink:TickSource", every: 0.01}}
runtime: {{status_interval: 0}}
sinks:
  - {{type: "tests.slow_sink:HangingStartSink", path: {tmp_path}/seen.txt, delay: 0{extra}}}
dead_letter: {tmp_path}/dead.jsonl
state_dir: {tmp_path}/state
""")


def scrape(port: int) -> dict[str, float]:
    """`outcome` -> value of videodb_pipeline_config_reloads_total (empty while the server is not up)."""
    try:
        _, text = http_get(f"http://127.0.0.1:{port}/metrics")
    except OSError:
        return {}
    return {s.labels["outcome"]: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == "videodb_pipeline_config_reloads_total"}


def seen(tmp_path: Path) -> int:
    path = tmp_path / "seen.txt"
    return sum(map(int, path.read_text().split())) if path.exists() else 0


def wait_for(what: str, cond: Callable[[], object], proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the run ended while waiting for {what}"
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


@pytest.mark.parametrize(("change", "why"), [
    ("hang_start: true, start_timeout: 0.5", "start() did not finish within 0.5s"),  # ingest waited for ever
    ("fail_start: true", "broker refused the connection"),  # counted as applied, and the file taken as running
])
def test_a_reloaded_sink_that_does_not_start_is_rejected_and_the_old_options_keep_writing(
        tmp_path: Path, change: str, why: str) -> None:
    write_config(tmp_path)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(tmp_path / "p.yaml"), "--http",
                             f"127.0.0.1:{port}"], cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        wait_for("events written", lambda: seen(tmp_path) > 0 and scrape(port), proc)
        write_config(tmp_path, ", " + change)
        proc.send_signal(signal.SIGHUP)
        # before: a hanging start held ingest for ever (never counted), a failing one was counted as applied
        wait_for("the reload counted as rejected", lambda: scrape(port).get("rejected") == 1, proc)
        assert scrape(port) == {"applied": 0, "rejected": 1}
        after = seen(tmp_path)
        wait_for("events written after the reload", lambda: seen(tmp_path) > after + 20, proc, 5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        stop_process(proc)
    stderr = err.decode()
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if "reload (SIGHUP)" in ln]
    assert len(lines) == 1 and f"rejected for sinks[0]:tests.slow_sink:HangingStartSink ({why}): the new options " \
        "did not start, the previous ones run on" in lines[0], stderr
    assert "  reloads: 0 applied, 1 rejected" in stderr, stderr
    written = next(ln.split() for ln in stderr.splitlines() if ln.startswith("  sinks[0]:"))
    read = next(ln.split() for ln in stderr.splitlines() if ln.startswith("  source:"))
    assert int(written[2]) == seen(tmp_path) == int(read[2]), stderr  # every event read was written once


def test_sigterm_while_a_reload_waits_on_a_sink_start_ends_within_the_stop_bound(tmp_path: Path) -> None:
    """SIGTERM while a reload waited for a re-created sink whose start() hangs: the stop waited for the whole
    `start_timeout` (30 s here) before the run could drain and end, past `drain_timeout` + `shutdown_timeout`.
    Now the start gives way to the stop: the previous options take the rest, nothing read is lost."""
    write_config(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(tmp_path / "p.yaml")], cwd=tmp_path,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for("events written", lambda: seen(tmp_path) > 0, proc)
        write_config(tmp_path, ", hang_start: true, start_timeout: 30")
        proc.send_signal(signal.SIGHUP)
        wait_for("the new sink's start to hang", (tmp_path / "seen.txt.hanging").exists, proc)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=8)  # nothing is left to drain: it ends at once
        except subprocess.TimeoutExpired:
            raise AssertionError("the run did not end within 8 s of SIGTERM (it waited for start_timeout)") from None
        took = time.monotonic() - t0
    finally:
        stop_process(proc)
    stderr = err.decode()
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    assert took < 5, f"{took:.1f}s: {stderr}"
    assert "rejected for sinks[0]:tests.slow_sink:HangingStartSink (stopped while starting)" in stderr, stderr
    written = next(ln.split() for ln in stderr.splitlines() if ln.startswith("  sinks[0]:"))
    read = next(ln.split() for ln in stderr.splitlines() if ln.startswith("  source:"))
    assert int(written[2]) == seen(tmp_path) == int(read[2]), stderr  # every event read was written once
