"""Disk-buffered sinks under faults: exits, a full disk, a spool file swapped mid-run. Real files and processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from pipeline.build import build
from pipeline.config import load_config
from pipeline.runtime.local import LocalRuntime
from tests.broker import free_port

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = [sys.executable, "-m", "pipeline.cli"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

pytestmark = pytest.mark.timeout(60)


def event(i: int) -> dict:
    return {"channel": "transcript", "id": i, "rtstream_id": "rts-1", "capture_session_id": "cap-1",
            "data": {"text": f"event {i}", "is_final": True, "start": 1710000000000 + i}}


def unreachable_kafka(src: Path, tmp: Path, *, drain: str, shutdown: str) -> str:
    """A config replaying `src` in batches of 100 into a disk-buffered kafka sink whose broker is a port nobody
    listens on (it retries quickly), with the given drain_timeout and shutdown_timeout."""
    return f"""
name: unreachable
source: {{type: replay, path: {src}, batch_size: 100}}
runtime: {{drain_timeout: {drain}}}
sinks:
  - type: kafka
    bootstrap_servers: 127.0.0.1:{free_port()}
    topic: t
    shutdown_timeout: {shutdown}
    request_timeout: 0.5s
    retry_backoff: 0.05s
    max_retry_backoff: 0.1s
    buffer: {{type: disk}}
dead_letter: {tmp}/dead.jsonl
state_dir: {tmp}/state
"""


def dead_ids(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [orjson.loads(x)["event"]["id"] for x in path.read_bytes().splitlines()]


async def test_session_exit_with_the_broker_down_leaves_the_disk_backlog_spooled(tmp_path: Path) -> None:
    """The capture session ends (exit_on) while the broker is away: the kafka sink used to start its own
    shutdown_timeout at once and, past it, dead-letter every batch the drain read back from the spool,
    emptying a disk buffer into the dead-letter file. Only the batch being written may be dead-lettered."""
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps(event(i)) + b"\n" for i in range(2000)))
    cfg = tmp_path / "p.yaml"
    cfg.write_text(unreachable_kafka(src, tmp_path, drain="2s", shutdown="0.3s"))
    rt = LocalRuntime(build(load_config(cfg)), install_signals=False)
    run = asyncio.create_task(rt.run())
    await asyncio.sleep(0.3)
    rt.b.session.request_exit(0, "capture session exported")  # what the capture_session controller does
    started = time.monotonic()
    await asyncio.wait_for(run, 20)
    assert time.monotonic() - started < 2 + 0.3 + 2 + 1  # still bounded: drain_timeout + shutdown_timeout
    dead = dead_ids(tmp_path / "dead.jsonl")
    assert dead == list(range(100)), f"{len(dead)} events dead-lettered: only the batch in flight may be"
    assert "left spooled 1900" in rt.summary()


def test_a_full_disk_under_the_spool_dead_letters_the_batch_and_leaves_no_torn_record(tmp_path: Path) -> None:
    """A real write error on the spool (RLIMIT_FSIZE: the kernel cuts the append short, then EFBIG, as a full
    disk does with ENOSPC). The batch being spooled was neither spooled nor dead-lettered (lost), the error
    named no file, and the partial record was left for the next run to report as a torn tail. Now: that batch
    is dead-lettered, the run stops with one line naming the segment, and the next run delivers the rest."""
    import resource

    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps(event(i)) + b"\n" for i in range(2000)))
    counts = tmp_path / "counts.txt"
    cfg = tmp_path / "p.yaml"

    def config(delay: float) -> Path:
        cfg.write_text(f"""
name: full
source: {{type: replay, path: {src}, batch_size: 100}}
runtime: {{drain_timeout: 0.5s}}
sinks:
  - {{type: "tests.slow_sink:SlowSink", path: {counts}, delay: {delay}, buffer: {{type: disk}}}}
dead_letter: {tmp_path}/dead.jsonl
state_dir: {tmp_path}/state
""")
        return cfg

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))

    res = subprocess.run([*PIPELINE, "run", str(config(0.05))], cwd=tmp_path, env=ENV, capture_output=True,
                         text=True, timeout=30, preexec_fn=limit)
    assert res.returncode == 1, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("pipeline:")]
    assert len(errors) == 1 and ".seg: cannot write: File too large" in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    read = int(next(ln for ln in res.stderr.splitlines() if "source:replay" in ln).split()[2])
    dead = dead_ids(tmp_path / "dead.jsonl")
    assert len(dead) == 100 and all("cannot spool" in orjson.loads(x)["reason"]
                                    for x in (tmp_path / "dead.jsonl").read_bytes().splitlines())

    src.write_bytes(b"")  # the restart reads nothing new: it only delivers what the spool kept
    res = subprocess.run([*PIPELINE, "run", str(config(0))], cwd=tmp_path, env=ENV, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert "torn" not in res.stderr
    delivered = sum(int(x) for x in counts.read_text().split())
    assert delivered + len(dead) == read, (delivered, len(dead), read)


async def test_a_spool_segment_swapped_for_a_symlink_mid_run_stops_the_run_with_one_line(tmp_path: Path) -> None:
    """The sink's feeding task died on the refused segment (ELOOP) and nobody looked: the run went on and
    ended with exit 0 while the sink was fed nothing more (a live source would spool until max_bytes, then
    stall). Now a failed feed stops the run with the error; what was not delivered stays spooled."""
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps(event(i)) + b"\n" for i in range(2000)))
    counts, target = tmp_path / "counts.txt", tmp_path / "elsewhere"
    target.write_bytes(b"not yours")
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""
name: swapped
source: {{type: replay, path: {src}, batch_size: 100}}
runtime: {{drain_timeout: 3s, queue_size: 2}}
sinks:
  - {{type: "tests.slow_sink:SlowSink", path: {counts}, delay: 0.05, buffer: {{type: disk}}}}
dead_letter: {tmp_path}/dead.jsonl
state_dir: {tmp_path}/state
""")
    rt = LocalRuntime(build(load_config(cfg)), install_signals=False)
    run = asyncio.create_task(rt.run())
    seg_dir = tmp_path / "state/spool/sinks-0-tests_slow_sink_SlowSink"
    for _ in range(500):
        if list(seg_dir.glob("*.seg")):
            break
        await asyncio.sleep(0.005)
    seg = next(seg_dir.glob("*.seg"))
    await asyncio.sleep(0.05)  # the two batches kept in memory are being written; the rest is read from disk
    seg.unlink()
    seg.symlink_to(target)
    assert await asyncio.wait_for(run, 20) == 1
    assert rt.error is not None and "refusing to open a spool segment through a symlink" in str(rt.error)
    assert str(seg) in str(rt.error)
    assert target.read_bytes() == b"not yours"
    # the segment that held them was unlinked (a symlink took its name): the summary does not promise them
    assert "LOST with its spool" in rt.summary() and "left spooled" not in rt.summary()
