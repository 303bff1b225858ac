"""A Parquet file that cannot be completed (the disk fills while its footer is written): its rows are in no
readable file and in no dead-letter line, so the summary must not count them as written. Real `pipeline run`
processes; RLIMIT_FSIZE makes the kernel refuse the footer as a full disk would."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

pytestmark = pytest.mark.timeout(60)


def run(tmp: Path, limit: int | None) -> subprocess.CompletedProcess[str]:
    (tmp / "in.jsonl").write_bytes(b"".join(
        orjson.dumps({"channel": "transcript", "id": i, "rtstream_id": "r",
                      "data": {"text": f"word {i} " * 5, "start": 1710000000000 + i}}) + b"\n" for i in range(2000)))
    (tmp / "p.yaml").write_text("""
name: pq
source: {type: replay, path: in.jsonl, batch_size: 100}
sinks: [{type: parquet, path: out, compression: none}]
dead_letter: dead.jsonl
state_dir: state
""")

    def cap() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "p.yaml"], cwd=tmp, env=ENV,
                          capture_output=True, text=True, timeout=30, preexec_fn=cap)


def test_rows_of_a_file_that_could_not_be_completed_are_counted_lost_not_written(tmp_path: Path) -> None:
    """Before: exit 1 with the error, but `written 2000` and `dead-lettered: 0`: 2,000 rows in an unreadable
    `.tmp`, counted as written. Now they are `failed` and `LOST` (they were only in that file)."""
    whole = tmp_path / "whole"
    whole.mkdir()
    assert run(whole, None).returncode == 0
    size = next((whole / "out").glob("*.parquet")).stat().st_size
    cut = tmp_path / "cut"
    cut.mkdir()
    res = run(cut, size - 300)  # the row group fits, the footer does not (sizes vary by a few bytes: unix_ts)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert ".parquet.tmp: cannot complete: File too large" in res.stderr
    assert not list((cut / "out").glob("*.parquet"))  # no readable file
    line = next(ln for ln in res.stderr.splitlines() if "sinks[0]:parquet" in ln and "written" in ln)
    assert line.split()[2] == "0" and "failed 2000" in line, res.stderr
    assert "LOST 2000 event(s)" in res.stderr, res.stderr
