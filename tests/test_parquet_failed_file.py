"""Sink `parquet` when a file cannot be finished: the rows it held go to the dead letter, and no broken file is
given a final `*.parquet` name."""

from __future__ import annotations

import json
import random
import re
import resource
import string
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.api import Context
from stages.sinks import parquet

MakeCtx = Callable[..., Context]

ROOT = Path(__file__).resolve().parents[1]


def _limit_file_size() -> None:  # in the child: a write past 160 kB fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (160_000, 160_000))


def test_a_file_that_fails_mid_way_is_not_completed_and_its_earlier_rows_are_dead_lettered(tmp_path: Path) -> None:
    """Before: the first row group (50 rows) was written, the second failed; the 50 rows were counted as written,
    and at shutdown the file, without its footer, was renamed to `part-….parquet`: unreadable, and a reader
    globbing the directory (DuckDB, pyarrow) failed on it."""
    rnd = random.Random(1)
    with open(tmp_path / "in.jsonl", "w") as fh:
        for i in range(120):  # 1 kB of incompressible text each: the second row group crosses 160 kB
            text = "".join(rnd.choice(string.ascii_letters) for _ in range(1000))
            fh.write(json.dumps({"channel": "transcript", "rtstream_id": "r", "capture_session_id": "c",
                                 "unix_ts": 1772446500.0 + i, "data": {"text": text, "n": i,
                                                                       "start": 1772446500000 + i}}) + "\n")
    (tmp_path / "p.yaml").write_text("""
name: p
source: {type: replay, path: in.jsonl, speed: 0, batch_size: 10}
sinks:
  - {type: parquet, path: out, row_group_rows: 50, compression: none, roll_interval: 1h}
dead_letter: dead.jsonl
""")
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "p.yaml"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, preexec_fn=_limit_file_size)
    assert res.returncode == 1 and "File too large" in res.stderr, res.stderr
    written: list[int] = []
    for f in (tmp_path / "out").glob("*.parquet"):
        written += [json.loads(r)["data"]["n"] for r in pq.read_table(f).column("raw").to_pylist()]
    dead = [json.loads(line)["event"]["data"]["n"] for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert sorted(written + dead) == list(range(120)), (len(written), len(dead))  # each once, none lost
    assert re.search(rf"sinks\[0\]:parquet +written +{len(written)} +failed {len(dead)} ", res.stderr), res.stderr


async def test_the_rows_kept_for_the_open_files_are_bounded(tmp_path: Path, make_context: MakeCtx,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows of an open file are kept until it is complete; past the bound the open files are completed."""
    monkeypatch.setattr(parquet, "MAX_KEPT_BYTES", 20_000)
    sink = parquet.ParquetSink(parquet.ParquetOptions(path=str(tmp_path / "{channel}"), row_group_rows=10,
                                                      roll_interval="1h"), make_context("sinks[0]:parquet"))
    await sink.start()
    for i in range(10):
        await sink.write([{"channel": ch, "unix_ts": 1.0, "data": {"text": "x" * 500, "n": i}}
                          for ch in ("transcript", "alert") for _ in range(10)])
        assert sum(d.kept_bytes for d in sink._dirs.values()) < 20_000 + 2 * 10 * 600
    assert sink.report()["files"] >= 4  # 10 x 2 x 10 rows of 550 bytes, completed about every 20 kB
    await sink.close()
    assert sum(pq.read_table(f).num_rows for f in tmp_path.rglob("*.parquet")) == 200
