"""The dead-letter file becomes unwritable mid-run: what it should have held is counted as lost, and the run
fails with one line, instead of ending 0 with a summary that counts those events as dead-lettered."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from pipeline.build import build
from pipeline.config import load_config
from pipeline.runtime.local import LocalRuntime
from tests.procs import communicate

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = [sys.executable, "-m", "pipeline.cli"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

pytestmark = pytest.mark.timeout(30)


def events(n: int) -> bytes:
    return b"".join(orjson.dumps({"channel": "transcript", "id": i, "rtstream_id": "r",
                                  "data": {"text": "x", "start": 1710000000000 + i}}) + b"\n" for i in range(n))


@pytest.mark.parametrize("kind", ["memory", "disk"])
async def test_a_full_buffer_with_the_dead_letter_gone_counts_the_loss_and_fails(tmp_path: Path, kind: str) -> None:
    (tmp_path / "in.jsonl").write_bytes(events(2000))
    (tmp_path / "dl").mkdir()
    out = tmp_path / "out.txt"
    (tmp_path / "out.txt.hold").touch()  # the sink stalls: the buffer fills and dead-letters the rest
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""
name: dl-gone
source: {{type: replay, path: {tmp_path}/in.jsonl, batch_size: 100}}
runtime: {{queue_size: 1, drain_timeout: 2s}}
sinks:
  - type: tests.slow_sink:DeadLetterGoneSink
    path: {out}
    delay: 0
    buffer: {{type: {kind}, max_bytes: 30000, when_full: dead_letter}}
dead_letter: {tmp_path}/dl/dead.jsonl
state_dir: {tmp_path}/state
""")
    rt = LocalRuntime(build(load_config(cfg)), install_signals=False)
    run = asyncio.create_task(rt.run())
    await asyncio.sleep(0.3)
    (tmp_path / "out.txt.hold").unlink()
    code = await asyncio.wait_for(run, 20)
    written = sum(int(x) for x in out.read_text().split())
    summary = rt.summary()
    assert code == 1, summary  # it was 0: "buffer-full dead-lettered 1800", and nothing in any file
    assert rt.b.dead_letter.count == 0  # nothing could be written there
    lost = rt.b.dead_letter.lost
    read = rt.b.source.context.stats.received
    assert written + lost == read, summary  # every event read is written or counted as lost
    assert read < 2000  # the run stopped reading: every later reject would have been lost too
    assert lost > 0 and f"LOST {lost}" in summary and "dead.jsonl" in summary, summary
    assert rt.error is not None and "dead-letter" in str(rt.error) and "\n" not in str(rt.error)


def test_a_full_disk_under_both_a_sink_and_the_dead_letter_keeps_whole_lines_and_counts_the_loss(
        tmp_path: Path) -> None:
    """The jsonl sink writes to a full device (/dev/full) and the dead-letter file hits a file-size limit
    (RLIMIT_FSIZE, as a full disk). Every event read is in the dead-letter file (whole lines only) or
    counted as lost in the summary, and the run ends with exit 1 and one line, without a traceback."""
    import resource

    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    (tmp_path / "in.jsonl").write_bytes(events(2000))
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""
name: both-full
source: {{type: replay, path: {tmp_path}/in.jsonl, batch_size: 100}}
sinks:
  - {{type: jsonl, path: /dev/full, flush_interval: 0}}
dead_letter: {tmp_path}/dead.jsonl
""")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))

    res = subprocess.run([*PIPELINE, "run", str(cfg)], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                         timeout=30, preexec_fn=limit)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    dead = (tmp_path / "dead.jsonl").read_bytes().splitlines()
    ids = [orjson.loads(x)["event"]["id"] for x in dead]  # a torn line would not parse
    read = int(next(ln for ln in res.stderr.splitlines() if "source:replay" in ln).split()[2])
    lost = next((ln for ln in res.stderr.splitlines() if "LOST" in ln), "")
    assert lost, res.stderr
    assert ids == list(range(len(ids))) and len(ids) + int(lost.split()[1]) == read, res.stderr


def _transcript(i: int) -> str:
    return orjson.dumps({"channel": "transcript", "id": i, "rtstream_id": "r",
                         "data": {"text": "x", "start": 1710000000000 + i}}).decode()


def _written_ids(kind: str, out: Path) -> list[int]:
    if kind == "jsonl":
        return [orjson.loads(x)["id"] for x in out.read_bytes().splitlines()]
    import pyarrow.parquet as pq

    rows = [raw for f in sorted(out.glob("*.parquet")) for raw in pq.read_table(f)["raw"].to_pylist()]
    return [orjson.loads(raw)["id"] for raw in rows]


async def _run_until_seen(tmp_path: Path, seen: Path, n: int) -> asyncio.subprocess.Process:
    """`pipeline run p.yaml` (stderr piped), returned once `n` events reached the counting sink."""
    proc = await asyncio.create_subprocess_exec(*PIPELINE, "run", str(tmp_path / "p.yaml"), cwd=tmp_path, env=ENV,
                                                stderr=subprocess.PIPE)
    for _ in range(500):
        if seen.exists() and sum(map(int, seen.read_text().split())) == n:
            break
        await asyncio.sleep(0.02)
    return proc


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
async def test_an_event_a_sink_cannot_encode_with_the_dead_letter_gone_is_counted_once(
        tmp_path: Path, kind: str) -> None:
    """The dead-letter file's directory is replaced by a file while the run goes on, then a batch arrives with
    one event JSON cannot hold (a plugin gave it an integer key). The sink's per-event path raised, so the
    runtime dead-lettered the whole batch again: its encodable events were written at close *and* counted
    as lost, the bad one lost twice (jsonl: "written 3 failed 5", "LOST 6" for 8 events, 7 of them in the
    file). Now each event is counted once: written, or lost."""
    import shutil

    import websockets

    second = asyncio.Event()

    async def handler(ws: websockets.ServerConnection) -> None:
        await ws.send(orjson.dumps({"connection_id": "conn-1"}).decode())
        for i in range(3):
            await ws.send(_transcript(i))
        await second.wait()
        for i in range(3, 8):
            await ws.send(_transcript(i))
        await ws.wait_closed()  # only the loss may end the run

    server = await websockets.serve(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    out, seen, dl = tmp_path / "out", tmp_path / "seen.txt", tmp_path / "dl"
    dl.mkdir()
    sink = f"{{type: jsonl, path: {out}, flush_interval: 0}}" if kind == "jsonl" else f"{{type: parquet, path: {out}}}"
    (tmp_path / "p.yaml").write_text(f"""
name: dl-gone-encode
state_dir: {tmp_path}/st
source: {{type: websocket, url: "ws://127.0.0.1:{port}/"}}
stages:
  - {{type: "tests.slow_sink:Spoil", ids: [5]}}
sinks:
  - {sink}
  - {{type: "tests.slow_sink:SlowSink", path: {seen}, delay: 0}}
dead_letter: {dl}/dead.jsonl
""")
    proc = await _run_until_seen(tmp_path, seen, 3)  # the first three events reached the sinks: under way
    try:
        shutil.rmtree(dl)
        dl.write_text("not a directory any more")  # every later dead-letter write fails
        second.set()
        _, err = await communicate(proc, 20)
    finally:
        server.close()
    stderr = err.decode()
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr
    assert _written_ids(kind, out) == [0, 1, 2, 3, 4, 6, 7], stderr
    line = next(ln.split() for ln in stderr.splitlines() if ln.startswith(f"  sinks[0]:{kind} "))
    assert line[1:5] == ["written", "7", "failed", "1"], stderr
    assert "  LOST 1 event(s) that could not be dead-lettered" in stderr, stderr
    assert [ln for ln in stderr.splitlines() if ln.startswith("pipeline: ")] == [
        f"pipeline: {dl}/dead.jsonl: cannot write the dead-letter file: {dl}: cannot create directory: "
        "Not a directory; events are being lost: stopping"], stderr


async def test_a_parquet_row_group_lost_with_the_dead_letter_is_counted_whole(tmp_path: Path) -> None:
    """The parquet sink cannot write its rows at the end (its directory replaced by a file) and the dead-letter
    file cannot take them either: the first row was counted as lost and the rest nowhere, and all five
    still as written ("written 5", "LOST 1" for 5 events, none written). Now each is counted once: failed and
    lost."""
    import shutil
    import signal

    import websockets

    async def handler(ws: websockets.ServerConnection) -> None:
        await ws.send(orjson.dumps({"connection_id": "conn-1"}).decode())
        for i in range(5):
            await ws.send(_transcript(i))
        await ws.wait_closed()

    server = await websockets.serve(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    out, seen, dl = tmp_path / "out", tmp_path / "seen.txt", tmp_path / "dl"
    dl.mkdir()
    (tmp_path / "p.yaml").write_text(f"""
name: parquet-gone
state_dir: {tmp_path}/st
source: {{type: websocket, url: "ws://127.0.0.1:{port}/"}}
sinks:
  - {{type: parquet, path: {out}}}
  - {{type: "tests.slow_sink:SlowSink", path: {seen}, delay: 0}}
dead_letter: {dl}/dead.jsonl
""")
    proc = await _run_until_seen(tmp_path, seen, 5)  # every event reached the sinks (rows wait for a row group)
    try:
        for d in (out, dl):
            shutil.rmtree(d)
            d.write_text("not a directory any more")
        proc.send_signal(signal.SIGTERM)
        _, err = await communicate(proc, 20)
    finally:
        server.close()
    stderr = err.decode()
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr
    assert "  LOST 5 event(s) that could not be dead-lettered" in stderr, stderr
    line = next(ln.split() for ln in stderr.splitlines() if ln.startswith("  sinks[0]:parquet "))
    assert line[1:5] == ["written", "0", "failed", "5"], stderr  # it said "written 5 failed 5"
    assert not list(tmp_path.glob("out*/*.parquet"))


def test_an_unusable_dead_letter_path_at_start_says_it_is_the_dead_letter_file(tmp_path: Path) -> None:
    """README: the dead-letter path is checked when the run starts. Its failure said only
    `pipeline: afile: cannot create directory: Not a directory`, not which file of the config it was about."""
    (tmp_path / "afile").write_text("")
    (tmp_path / "in.jsonl").write_text("")
    cfg = tmp_path / "p.yaml"
    cfg.write_text("name: d\nsource: {type: replay, path: in.jsonl}\nsinks: [{type: console}]\n"
                   "dead_letter: afile/dl.jsonl\n")
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "-q", str(cfg)], capture_output=True,
                         text=True, env=ENV, timeout=20, cwd=tmp_path)
    assert (res.returncode, res.stderr) == (1, "pipeline: afile/dl.jsonl: cannot write the dead-letter file: "
                                               "afile: cannot create directory: Not a directory\n")
