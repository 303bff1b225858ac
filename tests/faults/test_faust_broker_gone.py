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
from tests.faults.test_faust_attacks import ROOT, gated_config, produce, wait_for_file
from tests.test_faust_runtime import Workers

pytestmark = pytest.mark.timeout(60)


def gone(broker: Broker, how: str) -> None:
    """Kill the broker (SIGKILL), or pause it (SIGSTOP: its connections stay open, nothing answers on them)."""
    if how.startswith("paused"):
        os.kill(broker.pid or 0, signal.SIGSTOP)
    else:
        broker.stop()


@pytest.mark.parametrize("dies", ["after_the_batch", "during_the_batch", "paused_after_the_batch"])
async def test_sigterm_stops_a_worker_whose_broker_is_gone_with_one_line_and_exit_1(
        own_broker: Broker, tmp_path: Path, dies: str) -> None:  # noqa: F811
    """Before: the worker never stopped (still running 60 s after SIGTERM): aiokafka retried its last
    offset commit without end, then re-raised a fetch's cancellation as the consumer closed, so faust
    waited for a consumer thread that never said it had stopped; and (the broker killed while a sink held
    the batch, so its alerts' cooldowns were still to send) its producer waited for them, for 20 minutes.
    A paused broker (SIGSTOP: connections open, no answers) stopped it in 3 s with exit 1, but the commit
    given up at stop failed later inside aiokafka and asyncio logged it with a 15-line traceback."""
    own_broker.start()
    name = f"gone{dies[0]}{os.getpid()}"
    lines = tmp_path / "out/lines.jsonl"
    cfg = gated_config(tmp_path, own_broker, name, lines)  # drain_timeout 1s: the Kafka waits get 2 s each
    await produce(own_broker, name, [{"channel": "visual_index", "capture_session_id": f"cap-{i}",
                                      "rtstream_id": f"rts-{i}", "data": {"text": "code", "start": 1000 + i}}
                                     for i in range(3)])
    hold = Path(f"{lines}.hold")
    if dies.endswith("during_the_batch"):
        hold.touch()
    workers = Workers(cfg, tmp_path, {**os.environ, "PYTHONPATH": str(ROOT), "PIPELINE_LOG_LEVEL": "info"})
    worker = workers.start()
    try:
        if dies.endswith("during_the_batch"):
            await wait_for_file(Path(f"{lines}.waiting"), worker, workers)
            gone(own_broker, dies)
            hold.unlink()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not lines.exists() or lines.read_bytes().count(b"\n") < 6):
            assert worker.poll() is None, workers.procs[0][1].read_text()[-3000:]
            await asyncio.sleep(0.1)
        assert lines.exists() and lines.read_bytes().count(b"\n") == 6, "no 3 events and their 3 alerts"
        if dies.endswith("after_the_batch"):
            gone(own_broker, dies)
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(worker.wait, 20)
        except subprocess.TimeoutExpired:
            raise AssertionError("the worker did not stop within 20 s of SIGTERM") from None
        took = time.monotonic() - started
    finally:
        if dies.startswith("paused") and own_broker.running:
            os.kill(own_broker.pid or 0, signal.SIGCONT)
        workers.stop_all()
    log = workers.procs[0][1].read_text()
    # drain_timeout 1 s; then commit, state changes, producer flush, consumer close, producer close: 2 s each
    assert code == 1 and took < 1 + 5 * 2 + 3, (code, took, log[-3000:])
    assert "Traceback" not in log, log[-3000:]
    assert log.strip().splitlines()[-1] == (
        "pipeline: worker: the broker did not take this worker's offsets within 2s at stop; the next worker "
        "processes again what it handled since its last commit")
