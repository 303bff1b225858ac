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


async def test_a_spool_directory_removed_mid_run_stops_the_run_with_one_line(tmp_path: Path) -> None:
    """`rm -rf` of the state_dir while a disk-buffered sink is a few batches behind (served from memory):
    appends went on into the deleted segment, the run stopped with exit 0 and "left spooled N", and the
    next run had nothing to deliver: N events gone without a word."""
    import asyncio
    import shutil

    from pipeline.build import build
    from pipeline.config import load_config
    from pipeline.runtime.local import LocalRuntime

    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps({"channel": "transcript", "id": i, "data": {"text": "t", "start": i}})
                             + b"\n" for i in range(3000)))
    cfg = config(tmp_path, src)
    cfg.write_text(cfg.read_text().replace("delay: 0", "delay: 0.2").replace("queue_size: 1",
                                                                             "queue_size: 8, drain_timeout: 0.1s"))
    rt = LocalRuntime(build(load_config(cfg)), install_signals=False)
    buf = rt.buffers[0]
    real_put = buf.put
    seen = 0

    async def put(index: int, batch: list, nbytes: int) -> None:  # the state_dir goes after the 3rd batch
        nonlocal seen
        seen += 1
        if seen == 4:
            shutil.rmtree(tmp_path / "state")
        await real_put(index, batch, nbytes)
        if seen == 6:
            asyncio.get_running_loop().create_task(rt.stop())

    buf.put = put  # type: ignore[method-assign]
    code = await asyncio.wait_for(rt.run(), 20)
    assert code == 1, rt.summary()
    assert rt.error is not None and "the spool was removed or replaced while running" in str(rt.error)
