"""`pipeline report`'s bookkeeping stays bounded: the duplicate filter remembers the lines that can still repeat
(those of files before the last, and the last file's latest), the seconds remembered for gaps share one budget."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from pipeline.report import collect
from pipeline.report.collect import Collector


def _write(path: Path, first: int, n: int) -> Path:
    with open(path, "wb") as fh:
        for i in range(first, first + n):
            fh.write(orjson.dumps({"channel": "audio_index", "capture_session_id": "s1", "rtstream_id": "r1",
                                   "unix_ts": 1772323200 + i, "data": {"text": f"t{i}"}}) + b"\n")
    return path


def test_one_file_keeps_only_its_latest_digests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(collect, "RECENT_DEDUPE", 100)
    c = Collector()
    out = c.read([_write(tmp_path / "events.jsonl", 0, 5000)])
    assert out.sessions["s1"].counts["audio_index"] == 5000
    assert len(c._digests) == 0  # before: one per line, ~90 bytes each, up to 2,000,000
    assert len(c._recent) == len(c._order) == 100


def test_a_batch_written_twice_in_one_file_counts_once(tmp_path: Path) -> None:
    """A sink with a disk buffer may deliver the batch it was writing at a crash again: the same lines follow
    closely in the same file, and count once (as they did while every line was remembered)."""
    path = _write(tmp_path / "events.jsonl", 0, 3000)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2000] + lines[1800:2000] + lines[2000:]))
    out = Collector().read([path])
    assert out.duplicates == 200
    assert out.sessions["s1"].counts["audio_index"] == 3000


def test_lines_repeated_in_a_later_file_count_once(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.jsonl", 0, 3000)
    b = _write(tmp_path / "b.jsonl", 2000, 3000)  # 1000 lines also in a.jsonl
    c = Collector()
    out = c.read([a, b])
    assert out.duplicates == 1000
    assert out.sessions["s1"].counts["audio_index"] == 5000
    assert len(c._digests) == 3000  # a.jsonl's lines only


def test_event_seconds_share_one_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The seconds remembered for gaps were capped per session: 200 sessions held 200 times the cap."""
    monkeypatch.setattr(collect, "MAX_SECONDS", 100)
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(orjson.dumps({"channel": "transcript", "capture_session_id": f"s{i % 3}",
                                            "unix_ts": 1772323200 + i * 7}) + b"\n" for i in range(600)))
    out = Collector().read([path])
    assert sum(len(s.seconds) for s in out.sessions.values()) == 100
    assert all(s.counts["transcript"] == 200 for s in out.sessions.values())


def test_an_event_a_restart_fetched_again_counts_once(tmp_path: Path) -> None:
    """A restart after `kill -9` backfills from a checkpoint behind what the crashed run wrote: the same
    transcripts again, stamped afresh and marked `"backfill": true`. Before: every line was its own event, so
    talk time and words counted them twice (a session of 41 transcripts read 76)."""
    def line(i: int, ts: float, **extra: object) -> bytes:
        return orjson.dumps({"channel": "transcript", "capture_session_id": "s1", "rtstream_id": "r1",
                             "unix_ts": ts, **extra, "data": {"text": f"word {i}", "start": 1772323200000 + 1000 * i,
                                                              "end": 1772323200900 + 1000 * i, "is_final": True}})
    live = [line(i, 1772323200.0 + i) for i in range(40)]
    again = [line(i, 1772323300.0 + i, backfill=True) for i in range(30, 50)]  # 10 already written, 10 new
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(live + again) + b"\n")
    out = Collector().read([path])
    s = out.sessions["s1"]
    assert s.counts["transcript"] == 50 and out.duplicates == 10
    # events without a start: the same text twice is two events
    bare = [orjson.dumps({"channel": "transcript", "capture_session_id": "s1", "unix_ts": 1772323200.0 + i,
                          "data": {"text": "yes"}}) for i in range(2)]
    path.write_bytes(b"\n".join(bare) + b"\n")
    assert Collector().read([path]).sessions["s1"].counts["transcript"] == 2
