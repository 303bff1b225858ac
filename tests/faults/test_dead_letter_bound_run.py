"""A flood of junk against a small `dead_letter_max_bytes`: a real `pipeline run` process goes on reading, writes
every good event, keeps the dead-letter file within its bound, counts the rejects left out, and exits 1."""

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
from pipeline.ops.top import render
from pipeline.runtime.local import LocalRuntime
from pipeline.statusline import format_status, status_fields
from pipeline.summary import summary_dict
from tests.operator_harness import config, get_json, scrape, served

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
BOUND = 1 << 20
JUNK = 600  # ~4 KiB dead-letter lines: about 250 fit in 1 MiB

pytestmark = pytest.mark.timeout(30)


def replay_with_junk(path: Path, n: int) -> None:
    """`n` good events, each followed by a junk line of 4000 bytes."""
    with path.open("wb") as fh:
        for i in range(n):
            fh.write(orjson.dumps({"channel": "transcript", "rtstream_id": "r", "id": i,
                                   "data": {"text": f"line {i}", "start": 1_700_000_000_000 + i}}) + b"\n")
            fh.write(b"junk %04d " % i + b"x" * 3990 + b"\n")


def run(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    replay_with_junk(tmp_path / "in.jsonl", JUNK)
    (tmp_path / "p.yaml").write_text(f"""
name: flood
source: {{type: replay, path: in.jsonl}}
sinks: [{{type: jsonl, path: {tmp_path}/out.jsonl}}]
dead_letter: {tmp_path}/dead.jsonl
dead_letter_max_bytes: 1MiB
state_dir: {tmp_path}/state
""")
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "p.yaml", "--summary-json", "s.json"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=25)


def test_a_junk_flood_past_the_bound_is_counted_and_the_run_goes_on(tmp_path: Path) -> None:
    """Before: the file took all 600 rejects (2.5 MiB; a peer's flood filled the disk, and a full disk stopped
    the run). Now it stops at 1 MiB; every good event is still written, and the rest is counted, exit 1."""
    r = run(tmp_path)
    dead = (tmp_path / "dead.jsonl").read_bytes()
    assert r.returncode == 1, r.stderr
    assert [orjson.loads(x)["id"] for x in (tmp_path / "out.jsonl").read_bytes().splitlines()] == list(range(JUNK))
    assert len(dead) <= BOUND and dead.endswith(b"\n")
    written = [orjson.loads(x) for x in dead.splitlines()]
    assert all(d["reason"].startswith("not JSON") for d in written) and 200 < len(written) < JUNK
    s = orjson.loads((tmp_path / "s.json").read_bytes())
    unwritten = JUNK - len(written)
    assert (s["dead_lettered"], s["dead_letter_full"], s["lost"]) == (len(written), unwritten, 0)
    assert s["dead_letter_full_by_reason"] == {"not JSON": unwritten}
    assert s["stages"][0]["rejected"] == JUNK  # each reject counted once: written or left out
    why = f"{tmp_path}/dead.jsonl reached dead_letter_max_bytes (1 MiB)"
    assert s["dead_letter_full_reason"] == why and s["exit_code"] == 1
    assert s["error"] == f"{unwritten} reject(s) not dead-lettered: {why}"
    assert f"pipeline: {unwritten} reject(s) not dead-lettered: {why}" in r.stderr
    assert f"  NOT DEAD-LETTERED {unwritten} reject(s): {why}; rotate or remove it to make room" in r.stderr
    assert r.stderr.count("reject(s) not written so far") == 1, r.stderr  # one warning, not one per reject
    assert "Traceback" not in r.stderr


def test_a_file_already_past_the_bound_is_said_once_and_the_run_goes_on(tmp_path: Path) -> None:
    """Left by an earlier run: the run starts and writes every good event; one line at start says why no reject
    will be written (not one more at the first reject)."""
    old = b'{"old": "reject"}\n' * (BOUND // 18 + 1)
    (tmp_path / "dead.jsonl").write_bytes(old)
    r = run(tmp_path)
    assert r.returncode == 1, r.stderr
    assert len((tmp_path / "out.jsonl").read_bytes().splitlines()) == JUNK
    assert (tmp_path / "dead.jsonl").read_bytes() == old
    assert r.stderr.count(f"already {len(old)} bytes, dead_letter_max_bytes is 1 MiB: rejects will not be written "
                          "until it is rotated or removed") == 1
    assert "not written so far" not in r.stderr
    assert f"NOT DEAD-LETTERED {JUNK} reject(s)" in r.stderr


async def test_metrics_count_the_rejects_left_out_by_reason(tmp_path: Path) -> None:
    replay_with_junk(tmp_path / "in.jsonl", JUNK)
    cfg = config(tmp_path, tmp_path / "in.jsonl", stages="")
    cfg.write_text(cfg.read_text() + "dead_letter_max_bytes: 1MiB\n")
    async with served(cfg) as (rt, base):
        assert await rt.run() == 1
        after = await scrape(base)
        code, status = await get_json(base, "/api/status")
        line = format_status(status_fields(rt.http_server.view, 0.0))
    s = summary_dict(rt)
    # the status page, `pipeline top` and the status line show them too (before: LOST only, these not at all)
    assert code == 200 and status["dead_letter_full"] == s["dead_letter_full"] > 0, status
    assert f"NOT DEAD-LETTERED {s['dead_letter_full']} (file full)" in line, line
    assert f"NOT DEAD-LETTERED {s['dead_letter_full']} (file full)" in str(render(status, {}).renderables[0])
    assert after["videodb_pipeline_dead_letters_unwritten_total"] == {(("reason", "not JSON"),): s["dead_letter_full"]}
    assert after["videodb_pipeline_dead_letters_total"] == {(("reason", "not JSON"),): s["dead_lettered"]}
    assert s["dead_letter_full"] + s["dead_lettered"] == JUNK and s["dead_letter_full"] > 0


async def test_a_full_buffer_past_the_bound_counts_each_event_once(tmp_path: Path) -> None:
    """A stalled sink's buffer dead-letters what does not fit (`when_full: dead_letter`) into a file that reaches
    its bound. Before, `buffer-full dead-lettered` also counted the events the file left out: they were counted
    twice (there and as NOT DEAD-LETTERED). Now each event read is written, in the file, or left out, once."""
    text = "y" * 2000
    with (tmp_path / "in.jsonl").open("wb") as fh:
        for i in range(1000):
            fh.write(orjson.dumps({"channel": "transcript", "id": i, "rtstream_id": "r",
                                   "data": {"text": text, "start": 1710000000000 + i}}) + b"\n")
    (tmp_path / "out.txt.hold").touch()  # the sink stalls: the buffer fills and dead-letters the rest
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""
name: full-buffer
source: {{type: replay, path: {tmp_path}/in.jsonl, batch_size: 50}}
runtime: {{queue_size: 1, drain_timeout: 5s}}
sinks:
  - type: tests.slow_sink:GatedSink
    path: {tmp_path}/out.txt
    delay: 0
    buffer: {{type: memory, max_bytes: 30000, when_full: dead_letter}}
dead_letter: {tmp_path}/dead.jsonl
dead_letter_max_bytes: 1MiB
state_dir: {tmp_path}/state
""")
    rt = LocalRuntime(build(load_config(cfg)), install_signals=False)
    run = asyncio.create_task(rt.run())
    async with asyncio.timeout(10):
        while rt.b.source.context.stats.received < 1000:
            await asyncio.sleep(0.01)
    (tmp_path / "out.txt.hold").unlink()
    assert await asyncio.wait_for(run, 10) == 1
    dl = rt.b.dead_letter
    written = sum(int(x) for x in (tmp_path / "out.txt").read_text().split())
    rejected = rt.buffer_counts(rt.b.sinks[0].stats.name)["buffer-full dead-lettered"]
    assert (tmp_path / "dead.jsonl").stat().st_size <= BOUND and dl.full > 0 and dl.lost == 0
    assert rejected == dl.count == len((tmp_path / "dead.jsonl").read_bytes().splitlines())
    assert written + dl.count + dl.full == 1000, rt.summary()
