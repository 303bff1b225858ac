"""A worker whose broker is gone still stops on SIGTERM, within its bound. Real broker (killed), worker, signal."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.broker import Broker, own_broker  # noqa: F401
from tests.faults.test_faust_attacks import ROOT, gated_config, produce
from tests.test_faust_runtime import Workers

pytestmark = pytest.mark.timeout(60)


async def test_sigterm_stops_a_worker_whose_broker_is_gone_with_one_line_and_exit_1(
        own_broker: Broker, tmp_path: Path) -> None:  # noqa: F811
    """Before: the worker never stopped (still running 60 s after SIGTERM): aiokafka retried its last
    offset commit without end, and then re-raised a fetch's cancellation as the consumer closed, so
    faust waited for a consumer thread that never said it had stopped."""
    own_broker.start()
    name = f"gone{os.getpid()}"
    lines = tmp_path / "out/lines.jsonl"
    cfg = gated_config(tmp_path, own_broker, name, lines)  # drain_timeout 1s: commits at stop get 2 s
    await produce(own_broker, name, [{"channel": "transcript", "capture_session_id": f"cap-{i}",
                                      "data": {"text": f"hello {i}"}} for i in range(3)])
    workers = Workers(cfg, tmp_path, {**os.environ, "PYTHONPATH": str(ROOT), "PIPELINE_LOG_LEVEL": "info"})
    worker = workers.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not lines.exists() or lines.read_bytes().count(b"\n") < 3):
            assert worker.poll() is None, workers.procs[0][1].read_text()[-3000:]
            await asyncio.sleep(0.1)
        assert lines.exists() and lines.read_bytes().count(b"\n") == 3, "the worker did not take the events"
        own_broker.stop()  # SIGKILL
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(worker.wait, 15)
        except subprocess.TimeoutExpired:
            raise AssertionError("the worker did not stop within 15 s of SIGTERM") from None
        took = time.monotonic() - started
    finally:
        workers.stop_all()
    log = workers.procs[0][1].read_text()
    assert code == 1 and took < 1 + 2 + 2 + 2 + 3, (code, took, log[-3000:])  # drain, commit, close, changelog
    assert "Traceback" not in log, log[-3000:]
    assert log.strip().splitlines()[-1] == (
        "pipeline: worker: the broker did not take this worker's offsets within 2s at stop; the next worker "
        "processes again what it handled since its last commit")
