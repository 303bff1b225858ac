"""Sink `parquet` when files go wrong: a file that cannot be finished has its rows dead-lettered and never gets a
final `*.parquet` name; processes sharing a directory never write the same file."""

from __future__ import annotations

import asyncio
import json
import random
import re
import resource
import shutil
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


def _written_and_dead(tmp_path: Path) -> tuple[list[int], list[int]]:
    """`data.n` of the rows in the completed files, and of the events in the dead letter."""
    written: list[int] = []
    for f in (tmp_path / "out").rglob("*.parquet"):
        written += [json.loads(r)["data"]["n"] for r in pq.read_table(f).column("raw").to_pylist()]
    lines = (tmp_path / "dead.jsonl").read_text().splitlines() if (tmp_path / "dead.jsonl").exists() else []
    return written, [json.loads(line)["event"]["data"]["n"] for line in lines]


def test_a_file_that_fails_at_shutdown_does_not_keep_the_other_directories_from_completing(tmp_path: Path) -> None:
    """Before: at shutdown the transcript directory's rows (200 kB) could not be written, and the alert
    directory, next in line, was never written at all: its 5 rows were counted as written and lost."""
    rnd = random.Random(2)
    with open(tmp_path / "in.jsonl", "w") as fh:
        for i in range(105):
            if i % 21 == 20:
                ev = {"channel": "alert", "data": {"event_label": "x", "n": i, "timestamp": 1772446500000 + i}}
            else:
                ev = {"channel": "transcript", "data": {"text": "".join(rnd.choice(string.ascii_letters)
                                                                        for _ in range(1000)), "n": i}}
            fh.write(json.dumps({**ev, "rtstream_id": "r", "unix_ts": 1772446500.0 + i}) + "\n")
    (tmp_path / "p.yaml").write_text("""
name: p
source: {type: replay, path: in.jsonl, speed: 0}
sinks:
  - {type: parquet, path: "out/{channel}", compression: none, roll_interval: 1h}
dead_letter: dead.jsonl
""")
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "p.yaml"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, preexec_fn=_limit_file_size)
    assert res.returncode == 1 and "File too large" in res.stderr, res.stderr
    written, dead = _written_and_dead(tmp_path)
    assert sorted(written) == [20, 41, 62, 83, 104] and len(dead) == 100, res.stderr
    assert re.search(r"sinks\[0\]:parquet +written +5 +failed 100 +files 1\n", res.stderr), res.stderr


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
    written, dead = _written_and_dead(tmp_path)
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


async def test_after_the_roll_timer_failed_close_still_completes_the_other_directories(
        tmp_path: Path, make_context: MakeCtx) -> None:
    """Before, close() re-raised the timer's failure at once: the alert directory's rows, waiting in memory,
    were never written, though counted as written."""
    ctx = make_context("sinks[0]:parquet")
    sink = parquet.ParquetSink(parquet.ParquetOptions(path=str(tmp_path / "{channel}"), roll_interval="200ms"), ctx)
    await sink.start()
    await sink.write([{"channel": "transcript", "unix_ts": 1.0, "data": {"text": "t", "n": 0}}])
    (tmp_path / "transcript").write_text("a file where the directory should be")  # the timer fails on it
    await sink.write([{"channel": "alert", "unix_ts": 1.0, "data": {"event_label": "x", "n": 1}}])
    for _ in range(100):
        if sink._failed is not None:
            break
        await asyncio.sleep(0.05)
    assert sink._failed is not None and ctx.dead_letter.count == 1
    with pytest.raises(parquet.SinkFailed):
        await sink.close()
    (done,) = tmp_path.rglob("*.parquet")
    assert done.parent.name == "alert" and pq.read_table(done).column("text").to_pylist() == [None]


def test_a_file_whose_footer_cannot_be_written_has_its_rows_dead_lettered(tmp_path: Path) -> None:
    """Every row group is written, the footer is not (the file-size limit falls just past the row data).
    Before: `cannot complete`, the rows counted as written, and only an unreadable `.tmp` left of them."""
    rnd = random.Random(3)
    with open(tmp_path / "in.jsonl", "w") as fh:
        for i in range(60):
            text = "".join(rnd.choice(string.ascii_letters) for _ in range(1000))
            fh.write(json.dumps({"channel": "transcript", "rtstream_id": "r", "unix_ts": 1772446500.0 + i,
                                 "data": {"text": text, "n": i}}) + "\n")
    (tmp_path / "p.yaml").write_text("""
name: p
source: {type: replay, path: in.jsonl, speed: 0}
sinks:
  - {type: parquet, path: out, compression: none, roll_interval: 1h}
dead_letter: dead.jsonl
""")
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "p.yaml"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    (done,) = (tmp_path / "out").glob("*.parquet")
    body = done.read_bytes()
    data_end = len(body) - 8 - int.from_bytes(body[-8:-4], "little")  # ... row groups | footer | len | PAR1
    shutil.rmtree(tmp_path / "out")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (data_end + 16, data_end + 16))

    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60, preexec_fn=limit)
    assert res.returncode == 1 and "cannot complete" in res.stderr, res.stderr
    written, dead = _written_and_dead(tmp_path)
    assert written == [] and sorted(dead) == list(range(60))
    assert not list((tmp_path / "out").iterdir())  # the unfinished file is removed: its rows are in the dead letter
    assert re.search(r"written +0 +failed 60 ", res.stderr), res.stderr


def test_a_disk_buffered_file_that_fails_counts_the_rows_written_before_it(tmp_path: Path) -> None:
    """With `buffer: {type: disk}` each batch is written and then flushed (completed) before the runtime counts
    it; a file that failed in that flush had its rows taken off `written` though they had never been counted.
    Before: the first batch's 30 rows were in a file and the summary said `written 0 failed 30`."""
    rnd = random.Random(4)
    with open(tmp_path / "in.jsonl", "w") as fh:
        for i in range(60):  # the spool holds each event once (90 kB); the second file (text and raw) is past 100 kB
            text = "".join(rnd.choice(string.ascii_letters) for _ in range(1000 if i < 30 else 2000))
            fh.write(json.dumps({"channel": "transcript", "rtstream_id": "r", "unix_ts": 1772446500.0 + i,
                                 "data": {"text": text, "n": i}}) + "\n")
    (tmp_path / "p.yaml").write_text("""
name: p
state_dir: state
source: {type: replay, path: in.jsonl, speed: 0, batch_size: 30}
sinks:
  - {type: parquet, path: out, compression: none, roll_interval: 1h, buffer: {type: disk}}
dead_letter: dead.jsonl
""")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "p.yaml"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, preexec_fn=limit)
    assert res.returncode == 1 and "File too large" in res.stderr, res.stderr
    written, dead = _written_and_dead(tmp_path)
    assert sorted(written) == list(range(30)) and sorted(dead) == list(range(30, 60)), res.stderr
    assert re.search(r"sinks\[0\]:parquet +written +30 +failed 30 +files 1\n", res.stderr), res.stderr
