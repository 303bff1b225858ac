"""A `pipeline run` killed (-9) after a window closed, before its jsonl sink wrote the `metrics` line: the next
run writes it. Before, the window had left the saved state and its line died with the process."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.procs import finish, pipeline_run

T0 = 1_700_000_040_000  # ms, on the minute

#: The start of a test source plugin reading a JSONL file (its options), and its stop(): shared with other tests
LINES_HEAD = '''
import asyncio, json
from pipeline.api import Options, Source


class LinesOptions(Options):
    path: str
    hold: bool = False
'''
LINES_STOP = '''
    async def stop(self):
        if getattr(self, "_stopped", None) is not None:
            self._stopped.set()
'''
SOURCE = LINES_HEAD + '''

class Lines(Source):
    """The events of a JSONL file as one batch; with `hold`, then waits for the stop (a live source)."""

    name = "lines"
    Options = LinesOptions

    async def batches(self):
        with open(self.options.path) as f:
            yield [json.loads(x) for x in f]
        self._stopped = asyncio.Event()
        if self.options.hold:
            await self._stopped.wait()
''' + LINES_STOP


def event(s: int) -> dict[str, Any]:
    return {"channel": "transcript", "capture_session_id": "c", "data": {"text": "a b", "start": T0 + s * 1000}}


def write_config(tmp_path: Path, part: range, hold: bool, size: str = "60s", *,
                 stage: str | None = None, out: str = "metrics", event_of: Callable[[int], Any] = event) -> Path:
    """A config reading `event_of(s)` for s in `part` through a window stage (or `stage`) into a jsonl sink of
    channel `out`, flushed once a minute (what a kill takes: its buffer)."""
    src = tmp_path / f"in-{part.start}.jsonl"
    src.write_text("".join(json.dumps(event_of(s)) + "\n" for s in part))
    cfg = tmp_path / "w.yaml"
    cfg.write_text(f"""
name: w
state_dir: {tmp_path}/state
source: {{type: "lines_src:Lines", path: {src}, hold: {str(hold).lower()}}}
stages:
  - {stage or f"{{type: window, size: {size}}}"}
sinks:
  - {{type: jsonl, path: {tmp_path}/{out}.jsonl, channels: [{out}], flush_interval: 60s}}
dead_letter: {tmp_path}/dead.jsonl
""")
    return cfg


def run(tmp_path: Path, part: range, hold: bool, size: str = "60s") -> subprocess.Popen[str]:
    cfg = write_config(tmp_path, part, hold, size)
    return pipeline_run(cfg, cwd=tmp_path, plugins=True)


def saved_watermark(state_db: Path) -> int | None:
    try:
        db = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT value FROM state WHERE key = '\"~watermark\"'").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    return int(row[0]) if row else None


def wait_for_batch(proc: subprocess.Popen[str], tmp_path: Path, last: int) -> None:
    """Until the state saved after the batch whose newest event is second `last` is on disk."""
    deadline = time.monotonic() + 30
    while saved_watermark(tmp_path / "state" / "state.db") != T0 + last * 1000:
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.02)


def metrics(tmp_path: Path) -> list[tuple[int, int, int]]:
    """(start s, end s, transcripts) of each distinct `metrics` line, sorted."""
    ms = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return sorted({((m["window"]["start"] - T0) // 1000, (m["window"]["end"] - T0) // 1000,
                    m["data"]["events"]["transcript"]) for m in ms})


def test_a_window_closed_just_before_a_kill_9_is_written_by_the_next_run(tmp_path: Path) -> None:
    (tmp_path / "lines_src.py").write_text(SOURCE)
    first = run(tmp_path, range(0, 100), hold=True)  # closes [0, 60 s); [60 s, 120 s) stays open
    try:
        wait_for_batch(first, tmp_path, 99)
        first.send_signal(signal.SIGKILL)  # the [0, 60 s) line is in the sink's memory (flushed once a minute)
    finally:
        finish(first, 10)
    second = run(tmp_path, range(100, 150), hold=False)
    _, err = finish(second, 60)
    assert second.returncode == 0, err
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    got = sorted({((m["window"]["start"] - T0) // 1000, m["data"]["events"]["transcript"]) for m in metrics})
    assert got == [(0, 60), (60, 60), (120, 30)], got
    assert len(metrics) <= 4  # at least once: a kill right after the line was written may write it again


def test_windows_a_reload_closed_just_before_a_kill_9_are_written_by_the_next_run(tmp_path: Path) -> None:
    """A reload that changes the size closes the open window; the run is killed before any later batch."""
    (tmp_path / "lines_src.py").write_text(SOURCE)
    first = run(tmp_path, range(0, 90), hold=True)
    try:
        wait_for_batch(first, tmp_path, 89)
        write_config(tmp_path, range(0, 90), True, "120s")
        first.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        db = tmp_path / "state" / "state.db"
        while saved_watermark(db) is not None:  # the reload deleted the changed stage's state (with its time)
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
    finally:
        finish(first, 10)
    second = run(tmp_path, range(90, 150), hold=False, size="120s")
    _, err = finish(second, 60)
    assert second.returncode == 0, err
    assert metrics(tmp_path) == [(0, 60, 60), (0, 120, 30), (60, 120, 30), (120, 240, 30)]
