"""Sink `parquet`: fixed schema, rolled and atomically completed files, and the README's DuckDB query."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest

from pipeline.api import Context
from pipeline.errors import StageError
from stages.sinks.parquet import COLUMNS, ParquetOptions, ParquetSink, schema

MakeCtx = Callable[..., Context]
ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "config" / "samples" / "meeting-session.jsonl"

# The README's query, verbatim (the test fails if one changes without the other).
TALK_QUERY = """SELECT capture_session_id, rtstream_id, any_value(rtstream_name) AS stream,
       round(sum("end" - start) / 1000, 3) AS talk_seconds
FROM read_parquet('out/meeting/parquet/transcript/*/*.parquet')
WHERE is_final IS NOT false AND "end" > start AND "end" - start <= 86400000
GROUP BY ALL ORDER BY talk_seconds DESC;"""


def test_readme_duckdb_query_matches_the_window_output(tmp_path: Path) -> None:
    assert TALK_QUERY in (ROOT / "README.md").read_text()
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""
name: meeting
source: {{type: replay, path: {SAMPLE}, speed: 0}}
stages:
  - {{type: enrich}}
  - {{type: window, size: 20s, key: [capture_session_id, rtstream_id], allowed_lateness: 1h}}
sinks:
  - {{type: parquet, path: "out/meeting/parquet/{{channel}}/{{date}}", row_group_rows: 7}}
  - {{type: jsonl, path: out/meeting/metrics.jsonl, channels: [metrics]}}
dead_letter: out/dead.jsonl
""")
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(cfg)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    con = duckdb.connect()
    os.chdir(tmp_path)
    try:
        rows = con.execute(TALK_QUERY).fetchall()
    finally:
        os.chdir(ROOT)
    by_duckdb = {(r[0], r[1]): float(r[3]) for r in rows}
    by_window: dict[tuple[str, str], float] = {}
    for line in (tmp_path / "out/meeting/metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if m["data"]["talk_seconds"]:
            k = (m["key"]["capture_session_id"], m["key"]["rtstream_id"])
            by_window[k] = round(by_window.get(k, 0) + m["data"]["talk_seconds"], 3)
    assert by_duckdb == by_window and len(by_duckdb) == 2
    # metrics events went to the parquet sink too, under their own channel
    assert con.execute(f"SELECT count(*) FROM read_parquet('{tmp_path}/out/meeting/parquet/metrics/*/*.parquet')"
                       ).fetchone() == (sum(1 for _ in (tmp_path / "out/meeting/metrics.jsonl").open()),)


def ev(i: int, ch: str = "transcript") -> dict[str, Any]:
    return {"channel": ch, "rtstream_id": "rts-1", "rtstream_name": "mic", "capture_session_id": "cap-1",
            "ts": "2026-03-02T10:15:00.000Z", "unix_ts": 1772446500.0 + i,
            "data": {"text": f"words {i} <b>", "start": 1772446500000 + i, "end": 1772446501000 + i,
                     "is_final": i % 2 == 0}}


async def test_rolled_files_appear_only_when_complete(tmp_path: Path, make_context: MakeCtx) -> None:
    out = tmp_path / "pq"
    sink = ParquetSink(ParquetOptions(path=str(out), roll_bytes=20000, row_group_rows=50, roll_interval="1h"),
                       make_context("sinks[0]:parquet"))
    await sink.start()
    alert = {"channel": "alert", "rtstream_id": "rts-1", "unix_ts": 1.5,
             "data": {"event_label": "x", "severity": "critical", "matched": ["a", "b"], "timestamp": 7}}
    for k in range(6):
        await sink.write([ev(k * 100 + i) for i in range(100)] + ([alert] if k == 0 else []))
        assert all((p.name.startswith("part-") and p.suffix == ".parquet") or p.name.startswith(".")
                   for p in out.iterdir())
    assert [p for p in out.iterdir() if not p.name.startswith(".")]  # roll_bytes completed one before any flush
    await sink.flush()  # completes the open file
    assert not any(p.name.startswith(".") for p in out.iterdir())
    await sink.write([ev(1000 + i) for i in range(50)])  # one row group: a new file, still open
    visible_before_close = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert any(p.name.startswith(".") for p in out.iterdir())  # the open file has a hidden temporary name
    await sink.close()
    files = sorted(out.iterdir())
    assert all(not p.name.startswith(".") for p in files) and len(files) >= 2
    assert visible_before_close == [p.name for p in files][: len(visible_before_close)]
    assert oct(files[0].stat().st_mode & 0o777) == "0o600"
    table = pq.read_table(out)
    assert table.schema.names == list(COLUMNS) and table.schema.equals(schema())
    assert table.num_rows == 651 and sink.report()["files"] == len(files)
    rows = table.to_pylist()
    a = next(r for r in rows if r["channel"] == "alert")
    assert (a["event_label"], a["severity"], a["matched"], a["start"], a["end"], a["text"]) == (
        "x", "critical", ["a", "b"], 7, None, None)
    t = next(r for r in rows if r["channel"] == "transcript")
    assert json.loads(t["raw"]) == ev(0) and t["is_final"] is True and t["text"] == "words 0 <b>"
    assert t["unix_ts"] == 1772446500.0 and t["ts"].isoformat() == "2026-03-02T10:15:00+00:00"


async def test_roll_interval_completes_an_idle_file(tmp_path: Path, make_context: MakeCtx) -> None:
    sink = ParquetSink(ParquetOptions(path=str(tmp_path / "{channel}"), roll_interval="200ms"), make_context())
    await sink.start()
    await sink.write([ev(1), ev(2, ch="../../etc"), {"event": "capture_session.active", "unix_ts": 3.0}])
    await asyncio.sleep(1.5)
    done = sorted(str(p.relative_to(tmp_path)).split("/")[0] for p in tmp_path.rglob("part-*.parquet"))
    assert done == ["capture_session", "transcript", "unknown"]  # a channel from the wire never picks a path
    await sink.close()


async def test_symlinked_directory_is_refused(tmp_path: Path, make_context: MakeCtx) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    sink = ParquetSink(ParquetOptions(path=str(tmp_path / "link")), make_context())
    with pytest.raises(StageError, match="symlink"):
        await sink.start()


async def test_without_pyarrow_the_sink_says_what_to_install(tmp_path: Path, make_context: MakeCtx,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if the [parquet] extra were not installed
    sink = ParquetSink(ParquetOptions(path=str(tmp_path)), make_context("sinks[0]:parquet"))
    with pytest.raises(StageError, match=r"sinks\[0\]:parquet: the parquet sink needs pyarrow: pip install"):
        await sink.start()
    res = subprocess.run([sys.executable, "-c", "import sys, pipeline.cli, stages.sinks.parquet, "
                          "stages.processors.window, pipeline.report.cli; "
                          "sys.exit('pyarrow' in sys.modules or 'duckdb' in sys.modules)"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr  # heavy imports stay lazy


async def test_an_unencodable_event_is_dead_lettered_alone(tmp_path: Path, make_context: MakeCtx) -> None:
    ctx = make_context("sinks[0]:parquet")
    sink = ParquetSink(ParquetOptions(path=str(tmp_path / "pq")), ctx)
    await sink.start()
    bad = {"channel": "transcript", "data": {"text": "x", "n": 1 << 70}}
    await sink.write([ev(1), bad, ev(2)])
    await sink.close()
    assert pq.read_table(tmp_path / "pq").num_rows == 2
    assert ctx.dead_letter.count == 1 and ctx.stats.errors == 1


def test_validate_checks_the_parquet_directory(tmp_path: Path) -> None:
    """`pipeline validate` checks where a parquet sink writes, as it does for jsonl (a file is in the way here)."""
    (tmp_path / "file").write_text("")
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"name: v\nsource: {{type: replay, path: {SAMPLE}}}\n"
                   f"sinks: [{{type: parquet, path: '{tmp_path}/file/parquet/{{channel}}/{{date}}'}}]\n")
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", str(cfg)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and f"sinks[0].path: cannot write {tmp_path}/file/parquet/" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and "is not a directory" in res.stderr


async def test_a_batch_refused_after_a_failed_roll_is_not_kept_to_be_dead_lettered_again(
        tmp_path: Path, make_context: MakeCtx) -> None:
    """The roll timer failed (its rows dead-lettered by the sink); the next write is refused and the runtime
    dead-letters that batch. Its rows must not stay buffered: a later flush wrote or dead-lettered them again."""
    from pipeline.errors import SinkFailed

    ctx = make_context("sinks[0]:parquet")
    target = tmp_path / "pq"
    sink = ParquetSink(ParquetOptions(path=str(target), roll_interval="200ms"), ctx)
    await sink.start()
    await sink.write([ev(1)])
    shutil.rmtree(target)
    target.write_text("a file where the sink's directory should be")  # the timer's write fails
    for _ in range(50):
        if sink._failed is not None:
            break
        await asyncio.sleep(0.05)
    assert sink._failed is not None and ctx.dead_letter.count == 1
    with pytest.raises(StageError):
        await sink.write([ev(2), ev(3)])  # refused: the runtime dead-letters these two
    await sink.flush()
    assert ctx.dead_letter.count == 1  # not 3: the refused batch was not buffered behind the refusal
    with pytest.raises(SinkFailed):
        await sink.close()


async def test_made_up_channel_names_cannot_make_a_directory_each(tmp_path: Path, make_context: MakeCtx) -> None:
    """Channel names come off the wire: 300 events with 300 made-up names made 300 directories of one-row
    files (a flood of them, inodes). Past 64 names besides the built-in channels they now share `unknown`."""
    sink = ParquetSink(ParquetOptions(path=str(tmp_path / "pq" / "{channel}")), make_context("sinks[0]:parquet"))
    await sink.start()
    await sink.write([ev(i, f"made-up-{i}") for i in range(300)] + [ev(300), ev(301, "alert")])
    await sink.close()
    dirs = sorted(p.name for p in (tmp_path / "pq").iterdir())
    assert len(dirs) == 64 + 3 and {"transcript", "alert", "unknown", "made-up-0", "made-up-63"} <= set(dirs)
    assert pq.read_table(tmp_path / "pq" / "unknown").num_rows == 300 - 64
    assert sum(pq.read_table(tmp_path / "pq" / d).num_rows for d in dirs) == 302
