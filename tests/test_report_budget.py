"""`pipeline report` keeps marks, alert rows and lifecycle entries under one budget of bytes for all sessions:
bounded memory whatever the number of sessions."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.report import collect
from pipeline.report.collect import Collected, Collector
from pipeline.report.keep import Budget, Earliest, Track

T0 = 1_772_323_200_000
TEXT = "\U0001f600" + "x" * 398  # one emoji: Python keeps all 399 characters at 4 bytes each (1.6 KB)


def _events(sessions: int, lanes: int, per_track: int, text: str = TEXT, first: int = 0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(per_track):
        for s in range(first, first + sessions):
            out.append({"event": "capture_session.active", "capture_session_id": f"cap-{s}", "status": "active",
                        "unix_ts": (T0 + i * 1000) / 1000})
            for ln in range(lanes):
                for ch in ("transcript", "audio_index", "visual_index", "alert"):
                    t = T0 + i * 1000
                    out.append({"channel": ch, "capture_session_id": f"cap-{s}", "rtstream_name": f"lane-{ln}",
                                "data": {"text": f"{i} {text}", "start": t, "end": t + 900, "is_final": True,
                                         "event_label": "L", "matched": ["kw"]}})
    return out


def _write(path: Path, events: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    return path


def _kept_bytes(c: Collected) -> int:
    """Bytes of the texts all sessions keep, counted here, not by the report."""
    total = 0
    for s in c.sessions.values():
        total += sum(sys.getsizeof(m.text) for ln in s.lanes.values() for t in ln.tracks.values() for m in t.marks)
        total += sum(sys.getsizeof(a.text) for a in s.alerts)
    return total


def test_marks_of_all_sessions_share_one_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Marks were capped per lane and channel (1,500) and alert rows per session (2,000) only: 200 sessions of
    33 lanes of long texts could hold ~90 GB (10 such sessions: 4.7 GB max RSS). Past one budget for all
    sessions the biggest tracks are now thinned evenly."""
    monkeypatch.setattr(collect, "MAX_KEPT", 1_000_000, raising=False)
    src = _write(tmp_path / "events.jsonl", _events(sessions=20, lanes=1, per_track=100))
    c = Collector().read([src])
    assert len(c.sessions) == 20
    assert _kept_bytes(c) <= 1_000_000  # all of them: 16.8 MB
    for s in c.sessions.values():
        assert s.counts["transcript"] == 100 and s.alerts_total == 100  # counts still cover every event
        for track in s.lanes["lane-0"].tracks.values():
            starts = [m.start for m in track.marks]
            # thinned evenly: the first, then every n-th, over the whole session (not the first few only)
            assert len(starts) >= 2 and starts[0] == T0 and starts[-1] >= T0 + 50_000
            assert len({b - a for a, b in itertools.pairwise(starts)}) == 1


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 3000), st.lists(st.tuples(st.integers(0, 3), st.integers(0, 50)), max_size=300))
def test_kept_lists_stay_within_the_budget_and_thin_evenly(limit: int, offers: list[tuple[int, int]]) -> None:
    """Any mix of offers: the bytes counted are those kept, within the budget (or every cap is 1), the tracks
    keep every n-th item offered, the earliest list its first ones; under the budget, what an unbounded one keeps."""
    budget, free = Budget(limit), Budget(1 << 40)
    lists = [Track(8, int, budget), Track(5, int, budget), Earliest(6, int, budget), Track(3, int, budget)]
    alone = [Track(8, int, free), Track(5, int, free), Earliest(6, int, free), Track(3, int, free)]
    offered: list[list[int]] = [[], [], [], []]
    for which, size in offers:
        for ls in (lists, alone):
            ls[which].add(size)
        offered[which].append(size)
        assert budget.used == sum(sum(k.items) for k in lists)
        assert budget.used <= limit or all(k.cap == 1 for k in lists)
    for k, items in zip(lists, offered, strict=True):
        assert len(k) <= k.cap and k.seen == len(items)
        assert k.items == (items[::k.stride] if isinstance(k, Track) else items[:len(k)])
    if budget.level == 0:
        assert [k.items for k in lists] == [k.items for k in alone]
