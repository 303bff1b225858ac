"""A spool damaged between two runs (one record corrupted, not at the end) costs that record only.

Real processes and files: a `pipeline run` spools 10 batches behind a stalled sink and is killed (-9); one
byte of the third record is flipped; the next run delivers the other nine and dead-letters the damage once.
"""

from __future__ import annotations

import os
import signal
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


def config(tmp_path: Path, src: Path) -> Path:
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""
name: recover
source: {{type: replay, path: {src}, batch_size: 100}}
runtime: {{queue_size: 1}}
sinks:
  - {{type: "tests.slow_sink:GatedSink", path: {tmp_path}/counts.txt, delay: 0, buffer: {{type: disk}}}}
dead_letter: {tmp_path}/dead.jsonl
state_dir: {tmp_path}/state
""")
    return cfg


def test_a_corrupt_record_inside_the_last_segment_costs_only_itself(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps({"channel": "transcript", "id": i, "data": {"text": "t", "start": i}})
                             + b"\n" for i in range(1000)))
    (tmp_path / "counts.txt.hold").touch()  # the sink takes nothing: every batch stays spooled
    spool = tmp_path / "state" / "spool" / "sinks-0-tests_slow_sink_GatedSink"
    proc = subprocess.Popen([*PIPELINE, "run", str(config(tmp_path, src))], cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            segs = list(spool.glob("*.seg"))
            if segs and segs[0].read_bytes().count(b'"channel"') == 1000:
                break
            time.sleep(0.05)
    finally:
        stop_process(proc, signal.SIGKILL)
    seg = next(spool.glob("*.seg"))
    data = bytearray(seg.read_bytes())
    third = data.index(b'{"channel":"transcript","id":200,')
    data[third + 40] ^= 0x01  # one flipped bit in the third record (a bad sector): it fails its CRC
    seg.write_bytes(bytes(data))

    src.write_bytes(b"")  # the restart reads nothing new: it only delivers what the spool kept
    (tmp_path / "counts.txt.hold").unlink()
    res = subprocess.run([*PIPELINE, "run", str(config(tmp_path, src))], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    delivered = sum(int(x) for x in (tmp_path / "counts.txt").read_text().split())
    dead = [orjson.loads(x) for x in (tmp_path / "dead.jsonl").read_bytes().splitlines()]
    assert len(dead) == 1 and "failed its CRC check" in dead[0]["reason"], dead  # reported once
    assert delivered == 900, (delivered, res.stderr)  # it was 200: the seven good records after it were cut off
