"""jsonl and parquet sinks under many sessions and hostile path parts: real files, real descriptors."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.api import Context
from stages.sinks import jsonl

MakeCtx = Callable[..., Context]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to count descriptors")
async def test_jsonl_many_concurrent_sessions_do_not_reopen_a_file_per_event(
        make_context: MakeCtx, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One file per session with more live sessions than MAX_OPEN_FILES (the session API's normal case):
    every event for a file not open flushed every buffer and closed one file, then opened its own. With 100
    sessions interleaved that was one open and ~32 writes per event: 50,000 events cost 10 s (186 us per event
    against 5 us with 32 sessions). Lines now wait in per-file buffers and files are opened at the flush."""
    opened: list[str] = []
    real_open = jsonl.open_private

    def counting_open(path: str | Path, *, truncate: bool = False) -> Any:
        opened.append(str(path))
        return real_open(path, truncate=truncate)

    monkeypatch.setattr(jsonl, "open_private", counting_open)
    sink = jsonl.JsonlSink(jsonl.JsonlOptions(path=f"{tmp_path}/{{capture_session_id}}.jsonl"), make_context())
    await sink.start()
    sessions, n = 100, 20_000
    events = [{"channel": "transcript", "capture_session_id": f"cap-{i % sessions}", "data": {"start": i}}
              for i in range(n)]
    before, most = _fds(), 0
    for i in range(0, n, 1000):
        await sink.write(events[i:i + 1000])
        most = max(most, _fds() - before)
    await sink.flush()
    most = max(most, _fds() - before)
    await sink.close()
    assert most <= jsonl.MAX_OPEN_FILES  # descriptors stay bounded whatever the number of sessions
    assert len(opened) <= 3 * sessions, len(opened)  # was ~20,000: one per event
    for s in range(sessions):
        lines = (tmp_path / f"cap-{s}.jsonl").read_bytes().splitlines()
        assert [orjson.loads(x)["data"]["start"] for x in lines] == list(range(s, n, sessions))


async def test_jsonl_buffer_bytes_bounds_the_lines_of_all_files_together(make_context: MakeCtx,
                                                                          tmp_path: Path) -> None:
    """With lines buffered per file until the flush, `buffer_bytes` bounds them all together: 3,000 sessions
    of one 200-byte line each never hold more than buffer_bytes (+ one batch) in memory."""
    sink = jsonl.JsonlSink(jsonl.JsonlOptions(path=f"{tmp_path}/{{capture_session_id}}.jsonl",
                                              buffer_bytes=64 * 1024, flush_interval="1h"), make_context())
    await sink.start()
    for b in range(30):
        await sink.write([{"channel": "x", "capture_session_id": f"cap-{b}-{i}", "pad": "p" * 160}
                          for i in range(100)])
        assert sink.buffered_bytes() <= 64 * 1024 + 100 * 250
    await sink.close()
    assert len(list(tmp_path.glob("cap-*.jsonl"))) == 3000


def _open_paths() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return out


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to see open files")
@pytest.mark.parametrize("flush_interval", ["50ms", "0s"])
async def test_jsonl_closes_the_file_of_a_session_that_stopped_sending(
        make_context: MakeCtx, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flush_interval: str) -> None:
    """A finished session's file (or yesterday's `{date}` file) stayed open until 32 newer files pushed it out:
    on a quiet pipeline for ever, its disk space still held after the file was deleted. Now a file not written
    for IDLE_CLOSE is closed, also while no event arrives; a later event reopens it and appends."""
    monkeypatch.setattr(jsonl, "IDLE_CLOSE", 0.3)
    sink = jsonl.JsonlSink(jsonl.JsonlOptions(path=f"{tmp_path}/{{capture_session_id}}.jsonl",
                                              flush_interval=flush_interval), make_context())
    await sink.start()
    a, b = str(tmp_path / "cap-a.jsonl"), str(tmp_path / "cap-b.jsonl")
    await sink.write([{"channel": "x", "capture_session_id": s, "n": 1} for s in ("cap-a", "cap-b")])
    await sink.flush()
    assert {a, b} <= _open_paths()
    async with asyncio.timeout(5):
        while a in _open_paths():  # session b goes on, session a has ended
            await sink.write([{"channel": "x", "capture_session_id": "cap-b", "n": 2}])
            await asyncio.sleep(0.05)
    assert b in _open_paths()
    async with asyncio.timeout(5):
        while b in _open_paths():  # nothing arrives any more
            await asyncio.sleep(0.05)
    await sink.write([{"channel": "x", "capture_session_id": "cap-a", "n": 3}])
    await sink.close()
    assert [orjson.loads(x)["n"] for x in Path(a).read_bytes().splitlines()] == [1, 3]


# -- parquet ------------------------------------------------------------------------------------

async def test_parquet_a_channel_name_ending_in_a_newline_is_not_a_directory_name(make_context: MakeCtx,
                                                                                  tmp_path: Path) -> None:
    """The channel check used `$`, which also matches before a final newline: `transcript\\n` made a
    directory with a newline in its name, where the README says a name that is not a plain word is `unknown`."""
    pytest.importorskip("pyarrow")
    from stages.sinks.parquet import ParquetOptions, ParquetSink

    sink = ParquetSink(ParquetOptions(path=f"{tmp_path}/{{channel}}"), make_context())
    await sink.start()
    await sink.write([{"channel": "transcript\n", "unix_ts": 1.0, "data": {"text": "x"}}])
    await sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unknown"]


async def test_parquet_rows_waiting_for_a_row_group_are_bounded_in_bytes(make_context: MakeCtx,
                                                                         tmp_path: Path) -> None:
    """Rows waited in memory until `row_group_rows` (10,000) whatever their size: 1,000 events of 64 KB of
    screen text held 128 MB of Python strings before anything reached the file (1 MiB events, the
    sources' limit: 20 GB). A row group is now written once the waiting rows reach 32 MiB."""
    pytest.importorskip("pyarrow")
    import tracemalloc

    import pyarrow.parquet as pq

    from stages.sinks.parquet import ParquetOptions, ParquetSink

    sink = ParquetSink(ParquetOptions(path=str(tmp_path / "pq"), roll_interval="1h"), make_context())
    await sink.start()
    text = "screen text " * 5_400  # ~64 KB
    tracemalloc.start()
    try:
        for b in range(20):
            await sink.write([{"channel": "visual_index", "unix_ts": 1.0 + i, "capture_session_id": "cap-1",
                               "data": {"text": f"{text} {b}/{i}", "start": b * 50 + i}} for i in range(50)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    await sink.close()
    assert peak < 80 << 20, f"peak {peak >> 20} MiB of Python objects while writing 1,000 rows of 64 KB"
    table = pq.read_table(tmp_path / "pq")
    assert table.num_rows == 1000 and sorted(table.column("start").to_pylist()) == list(range(1000))


async def test_jsonl_a_template_a_long_session_id_would_push_past_name_max_is_refused_at_config(
        make_context: MakeCtx, tmp_path: Path) -> None:
    """Before: the template was taken, and the first session with a 128-character id (the longest the session
    API accepts) made a 263-byte file name: ENAMETOOLONG at the flush failed the sink for every session, and
    every later line went to the dead letter."""
    from pydantic import ValidationError

    template = f"{tmp_path}/{{capture_session_id}}-{{capture_session_id}}.jsonl"
    with pytest.raises(ValidationError, match=r"a file name .* can reach 263 bytes .* 255"):
        jsonl.JsonlOptions(path=template)
    ok = jsonl.JsonlOptions(path=f"{tmp_path}/{{capture_session_id}}/{{channel}}-{{date}}.jsonl")
    sink = jsonl.JsonlSink(ok, make_context())
    await sink.start()
    sid = "s" * 128
    await sink.write([{"channel": "c" * 64, "capture_session_id": sid, "unix_ts": 1.7e9}])
    await sink.close()
    assert len((tmp_path / sid).iterdir().__next__().read_bytes().splitlines()) == 1


async def test_jsonl_made_up_channel_names_cannot_make_a_file_each(make_context: MakeCtx, tmp_path: Path) -> None:
    """Channel names come off the wire: 300 events with 300 made-up names made 300 `{channel}` files (a flood of
    them for as long as a peer sends new names). Past 64 names besides the built-in channels they share
    `unknown`, as in the parquet sink."""
    sink = jsonl.JsonlSink(jsonl.JsonlOptions(path=f"{tmp_path}/out/{{channel}}.jsonl"), make_context())
    await sink.start()
    await sink.write([{"channel": f"made-up-{i}", "i": i} for i in range(300)]
                     + [{"channel": "transcript", "i": 300}, {"channel": "alert", "i": 301}])
    await sink.close()
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(files) == 64 + 3 and {"transcript.jsonl", "alert.jsonl", "unknown.jsonl", "made-up-0.jsonl",
                                     "made-up-63.jsonl"} <= set(files), files
    assert len((tmp_path / "out" / "unknown.jsonl").read_bytes().splitlines()) == 300 - 64
    assert sum(len((tmp_path / "out" / f).read_bytes().splitlines()) for f in files) == 302


@pytest.mark.parametrize("fsync", [True, False])
async def test_jsonl_fsync_syncs_every_file_a_flush_wrote_after_its_lines(make_context: MakeCtx, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          fsync: bool) -> None:
    """Guarantees: `fsync: true` makes each JSONL flush survive power loss, i.e. every file a flush wrote is
    fsynced once its lines are in it (power loss itself cannot be staged here); without it, none is."""
    synced: list[tuple[str, int]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), os.fstat(fd).st_size))
        real_fsync(fd)

    monkeypatch.setattr(jsonl.os, "fsync", recording_fsync)
    sink = jsonl.JsonlSink(jsonl.JsonlOptions(path=f"{tmp_path}/{{channel}}.jsonl", fsync=fsync), make_context())
    await sink.start()
    await sink.write([{"channel": "transcript", "data": {"text": "a"}}, {"channel": "alert", "data": {"text": "b"}}])
    await sink.flush()
    first = sorted(synced)
    await sink.write([{"channel": "transcript", "data": {"text": "c"}}])
    await sink.flush()
    await sink.close()
    sizes = {name: (tmp_path / name).stat().st_size for name in ("transcript.jsonl", "alert.jsonl")}
    if not fsync:
        assert synced == []
        return
    assert [name for name, _ in first] == ["alert.jsonl", "transcript.jsonl"]  # each file of the flush
    assert synced[-1] == ("transcript.jsonl", sizes["transcript.jsonl"])  # after its lines, the second flush too
    assert ("alert.jsonl", sizes["alert.jsonl"]) in first
