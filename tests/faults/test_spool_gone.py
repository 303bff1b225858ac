"""A disk buffer's spool removed while its sink is stalled and nothing more is appended: the events it held
are gone, and the run must say so. Real `pipeline run` processes, real files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from tests.procs import stop_process

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = [sys.executable, "-m", "pipeline.cli"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

pytestmark = pytest.mark.timeout(60)


def test_a_spool_removed_behind_a_stalled_sink_is_counted_lost_not_left_spooled(tmp_path: Path) -> None:
    """Before: the run ended with exit 0, "left spooled 1000" and a warning that they "stay in the spool for
    the next run"; the next run found no spool and delivered nothing: 1,000 events gone without a word."""
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps({"channel": "transcript", "id": i, "data": {"text": "t", "start": i}})
                             + b"\n" for i in range(1000)))
    (tmp_path / "p.yaml").write_text(f"""
name: gone
source: {{type: replay, path: {src}, batch_size: 100}}
runtime: {{queue_size: 1, drain_timeout: 2s}}
sinks:
  - {{type: "tests.slow_sink:GatedSink", path: {tmp_path}/counts.txt, delay: 0, buffer: {{type: disk}}}}
dead_letter: {tmp_path}/dead.jsonl
state_dir: {tmp_path}/state
""")
    (tmp_path / "counts.txt.hold").touch()  # the sink takes nothing: every batch stays spooled
    spool = tmp_path / "state/spool/sinks-0-tests_slow_sink_GatedSink"
    proc = subprocess.Popen([*PIPELINE, "run", "p.yaml"], cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while sum(p.read_bytes().count(b'"channel"') for p in spool.glob("*.seg")) < 1000:
            assert time.monotonic() < deadline and proc.poll() is None, "the run never spooled 1,000 events"
            time.sleep(0.02)
        shutil.rmtree(spool)  # the source is done: nothing more is appended, so no append notices
        _, err = proc.communicate(timeout=30)
    finally:
        stop_process(proc)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("pipeline:")]
    assert len(errors) == 1 and "the spool was removed or replaced while running" in errors[0], err
    assert "1000 undelivered event(s)" in errors[0], err
    assert "left spooled" not in err and "stay in the spool for the next run" not in err, err
    assert "LOST with its spool 1000" in err, err
