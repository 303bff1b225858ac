"""jsonl and parquet sinks under many sessions and hostile path parts: real files, real descriptors."""

from __future__ import annotations

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
