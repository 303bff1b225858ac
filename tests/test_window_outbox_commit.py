"""A committing source (kafka) with a window stage: the metrics kept in state.db are forgotten only once the
sinks flushed the batch they went out with. The commit loop flushed the sinks, awaited the offset commit, then
forgot the kept metrics up to where the sinks had got *after* that commit: a window closed during a slow commit
was forgotten with its line still in a jsonl sink's buffer, and a kill -9 then lost it."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path

from tests.procs import finish
from tests.test_window_kill import LINES_HEAD, LINES_STOP, T0, run

SOURCE = LINES_HEAD + '''

class Lines(Source):
    """The events of a JSONL file in two batches (the second once a commit began), committing slowly."""

    name = "lines"
    Options = LinesOptions

    async def batches(self):
        self._entered = asyncio.Event()
        self._stopped = asyncio.Event()
        with open(self.options.path) as f:
            events = [json.loads(x) for x in f]
        yield events[:60]
        if self.options.hold:
            await self._entered.wait()
        yield events[60:]
        if self.options.hold:
            await self._stopped.wait()

    async def commit(self, upto):
        if not self._entered.is_set():
            self._entered.set()
            await asyncio.sleep(3)  # a slow broker: the second batch reaches the sinks meanwhile
''' + LINES_STOP


def outbox_rows(db: Path) -> int | None:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return int(con.execute("SELECT count(*) FROM state WHERE map = '~outbox'").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return None


def test_a_window_closed_during_a_slow_commit_survives_a_kill_9(tmp_path: Path) -> None:
    (tmp_path / "lines_src.py").write_text(SOURCE)
    first = run(tmp_path, range(0, 100), hold=True)  # the second batch (60..99 s) closes [0, 60 s)
    db = tmp_path / "state" / "state.db"
    try:
        deadline = time.monotonic() + 30
        while outbox_rows(db) != 1:  # the closed window's metrics are kept
            assert time.monotonic() < deadline and first.poll() is None, first.stderr.read() if first.stderr else ""
            time.sleep(0.02)
        while outbox_rows(db) != 0:  # ... and forgotten: the sinks have them for good
            assert time.monotonic() < deadline and first.poll() is None, first.stderr.read() if first.stderr else ""
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
    finally:
        finish(first, 10)
    second = run(tmp_path, range(100, 150), hold=False)
    _, err = finish(second, 60)
    assert second.returncode == 0, err
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    got = sorted({((m["window"]["start"] - T0) // 1000, m["data"]["events"]["transcript"]) for m in lines})
    assert got == [(0, 60), (60, 60), (120, 30)], got
