"""A window stage in front of a parquet sink: a closed window's `metrics` are kept in state.db until the sinks
have them. The runtime flushed every sink within a second of a window closing for that, so a parquet sink
(`complete_on_flush: true`) completed its open file once per window `slide` whatever its `roll_interval`: many
small files. A parquet sink says what it holds (`holding_since`), so it is no longer flushed for that; the
metrics stay kept until the file holding them is complete, and a `kill -9` meanwhile loses neither."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.procs import finish, pipeline_run
from tests.test_window_kill import SOURCE, T0, wait_for_batch, write_config
from tests.test_window_outbox_commit import outbox_rows


def start(tmp_path: Path, part: range, hold: bool, roll: str, complete: bool = True) -> subprocess.Popen[str]:
    """`pipeline run`: 60 s windows into a jsonl sink and a parquet sink rolling every `roll`."""
    (tmp_path / "lines_src.py").write_text(SOURCE)
    cfg = write_config(tmp_path, part, hold)
    cfg.write_text(cfg.read_text().replace(
        "dead_letter:", f"  - {{type: parquet, path: {tmp_path}/pq, channels: [metrics], roll_interval: {roll}, "
                        f"complete_on_flush: {str(complete).lower()}}}\n"
                        "dead_letter:"))
    return pipeline_run(cfg, cwd=tmp_path, plugins=True)


def kept(tmp_path: Path) -> int | None:
    return outbox_rows(tmp_path / "state" / "state.db")


def files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "pq").glob("part-*.parquet"))


def windows(tmp_path: Path) -> list[tuple[int, int]]:
    """(window start, events counted) of every metrics row in the complete parquet files."""
    out = []
    for f in files(tmp_path):
        for raw in pq.read_table(f).column("raw").to_pylist():
            m = json.loads(raw)
            out.append((m["window"]["start"], m["data"]["events"]["transcript"]))
    return sorted(out)


@pytest.mark.parametrize("complete", [True, False])
def test_a_window_closing_no_longer_completes_the_parquet_file_and_a_kill_loses_nothing(
        tmp_path: Path, complete: bool) -> None:
    """complete_on_flush: true completed the file; false lost the window (flushed, not complete, forgotten)."""
    proc = start(tmp_path, range(0, 100), hold=True, roll="1h", complete=complete)  # window [0, 60 s) closes
    try:
        wait_for_batch(proc, tmp_path, 99)
        time.sleep(3.0)  # three of the runtime's once-a-second checks
        assert files(tmp_path) == []  # (before: complete within a second, though roll_interval is 1h)
        assert kept(tmp_path) == 1  # the window's metrics, until its file is complete
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    second = start(tmp_path, range(200, 201), hold=False, roll="1h")
    _, err = finish(second, 60)
    assert second.returncode == 0, err
    got = windows(tmp_path)
    assert got == [(T0, 60), (T0 + 60_000, 40), (T0 + 180_000, 1)], got  # none lost, none twice
    assert kept(tmp_path) == 0


def test_the_kept_metrics_are_forgotten_once_their_parquet_file_is_complete(tmp_path: Path) -> None:
    proc = start(tmp_path, range(0, 100), hold=True, roll="2s")
    try:
        wait_for_batch(proc, tmp_path, 99)
        deadline = time.monotonic() + 20
        while not (files(tmp_path) and kept(tmp_path) == 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert windows(tmp_path) == [(T0, 60)] and kept(tmp_path) == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = finish(proc, 30)
    assert proc.returncode == 0, err
