"""Sink `parquet` when files go wrong: a file that cannot be finished has its rows dead-lettered and never gets a
final `*.parquet` name; processes sharing a directory never write the same file."""

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


def test_processes_with_the_same_pid_never_write_the_same_file(tmp_path: Path) -> None:
    """Workers in containers sharing an output volume often have the same pid (each is pid 1 in its own pid
    namespace). Files were named `part-<second>-<pid>-<n>`: two such processes truncated and replaced each
    other's files; one failed, and the other's files lost rows or were left unreadable."""
    if subprocess.run(["unshare", "-p", "-f", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a pid namespace here")
    procs = []
    for w in "ab":
        with open(tmp_path / f"in-{w}.jsonl", "w") as fh:
            for i in range(200):  # 2 s at real time: both write files in the same seconds
                fh.write(json.dumps({"channel": "transcript", "rtstream_id": w, "unix_ts": 1772446500.0 + i / 100,
                                     "data": {"text": f"{w}{i}", "start": 1772446500000 + i * 10}}) + "\n")
        (tmp_path / f"{w}.yaml").write_text(f"""
name: p{w}
source: {{type: replay, path: in-{w}.jsonl, speed: 1}}
sinks:
  - {{type: parquet, path: out, row_group_rows: 10, roll_bytes: 1}}
dead_letter: dead-{w}.jsonl
""")
    for w in "ab":  # each is pid 1 in a namespace of its own
        procs.append(subprocess.Popen(["unshare", "-p", "-f", sys.executable, "-m", "pipeline.cli", "run",
                                       f"{w}.yaml"], cwd=tmp_path, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    texts = [t for f in (tmp_path / "out").glob("*.parquet") for t in pq.read_table(f).column("text").to_pylist()]
    assert sorted(texts) == sorted(f"{w}{i}" for w in "ab" for i in range(200))
