"""A sink whose start() never returns at run start (a broker that never answers the connect, a plugin): the run
waited for ever before reading anything, said nothing, and ignored SIGTERM (only a second signal ended it).
Now the start is bounded by the sink's `start_timeout` (30 s without one): the run fails with one line, and a
signal while a sink starts ends the run at once.

Real parts: `pipeline run` in a subprocess, real signals, the summary on stderr.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procs import stop_process

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

pytestmark = pytest.mark.timeout(40)


def start(tmp_path: Path, hanging: str = "", second: str = "hang_start: true") -> subprocess.Popen[bytes]:
    (tmp_path / "p.yaml").write_text(f"""
name: start-hangs
source: {{type: "tests.slow_sink:TickSource", every: 0.01}}
runtime: {{status_interval: 0}}
sinks:
  - {{type: "tests.slow_sink:SlowSink", path: {tmp_path}/first.txt, delay: 0}}
  - {{type: "tests.slow_sink:HangingStartSink", path: {tmp_path}/seen.txt, delay: 0, {second}{hanging}}}
dead_letter: {tmp_path}/dead.jsonl
""")
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(tmp_path / "p.yaml")], cwd=tmp_path,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_a_sink_that_never_starts_fails_the_run_with_one_line(tmp_path: Path) -> None:
    proc = start(tmp_path, ", start_timeout: 0.5")
    try:
        _, err = proc.communicate(timeout=15)  # before: still waiting after 10 minutes
    finally:
        stop_process(proc)
    stderr = err.decode()
    assert proc.returncode != 0 and "Traceback" not in stderr, stderr
    assert "sinks[1]:tests.slow_sink:HangingStartSink: start() did not finish within 0.5s; nothing was read" \
        in stderr, stderr
    assert not (tmp_path / "first.txt").exists()  # no event was read, so none was written


def test_a_signal_while_a_sink_starts_ends_the_run_at_once(tmp_path: Path) -> None:
    proc = start(tmp_path, "")  # the default start timeout, 30 s: the signal must not wait for it
    try:
        deadline = time.monotonic() + 15
        while not (tmp_path / "first.txt.started").exists():  # the first sink is up; the second now hangs
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.2)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)  # before: SIGTERM was logged and the run waited on for ever
        took = time.monotonic() - t0
    finally:
        stop_process(proc)
    stderr = err.decode()
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    assert took < 5, took


def test_a_sink_whose_start_raises_is_named_in_the_error(tmp_path: Path) -> None:
    proc = start(tmp_path, second="refuse_start: true")
    try:
        _, err = proc.communicate(timeout=15)
    finally:
        stop_process(proc)
    stderr = err.decode()
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr
    # before: "pipeline: cannot write its output: [Errno 111] ...", as if a file could not be written
    assert "pipeline: sinks[1]:tests.slow_sink:HangingStartSink: start() failed: [Errno 111] Connect call failed" \
        in stderr, stderr


def test_a_kafka_sink_stopped_while_its_broker_never_answers_leaves_no_unclosed_producer(tmp_path: Path) -> None:
    """A broker that accepts the connection and never answers (a host gone behind a load balancer): SIGTERM while
    the kafka sink starts cancelled the idempotent producer's start() and nobody stopped it; the exit printed
    `ERROR asyncio: Unclosed AIOKafkaProducer` and an object address after the run's own lines."""
    import socket

    hole = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    (tmp_path / "p.yaml").write_text(f"""
name: black-hole
source: {{type: "tests.slow_sink:TickSource", every: 0.05}}
sinks: [{{type: kafka, bootstrap_servers: "127.0.0.1:{hole.getsockname()[1]}", topic: t}}]
dead_letter: {tmp_path}/dead.jsonl
""")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "p.yaml"], cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        hole.settimeout(20)
        held.append(hole.accept()[0])  # the producer connected: its start now waits for an answer
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=20)[1]
    finally:
        stop_process(proc)
        for s in (*held, hole):
            s.close()
    assert proc.returncode == 0, err
    assert "Unclosed" not in err and "object at 0x" not in err, err
