"""`pipeline report` keeps marks, alert rows and lifecycle entries under one budget of bytes for all sessions:
bounded memory whatever the number of sessions, and pages that say what they left out."""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.report import collect
from pipeline.report.build import build_reports
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
    sessions the biggest tracks are now thinned evenly, and each page says how many marks it left out."""
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
    pages = build_reports([str(src)], str(tmp_path / "pages"))
    page = next(p for p in pages if p.name == "report-cap-7.html").read_text()
    drawn = page.count('class="m ')
    assert 0 < drawn < 400
    assert f"{400 - drawn} of 400 marks are not drawn" in page and "report fewer at a time" in page
    assert "more alerts not listed" in page


def test_keywords_are_kept_whole_and_the_marks_make_room(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keywords (up to 500 of 80 characters a session) were not counted in the budget: 200 sessions could hold
    60 MB of them on top of it. They are never dropped (their counts stay exact): the marks make room, here
    down to one a track, as the keywords alone take most of the budget."""
    monkeypatch.setattr(collect, "MAX_KEPT", 1_000_000)
    events = _events(sessions=20, lanes=1, per_track=100)
    events += [{"channel": "alert", "capture_session_id": f"cap-{s}", "rtstream_name": "lane-0",
                "data": {"start": T0 + i, "matched": [f"{i}-{k}" + "\U0001f600" * 76 for k in range(5)]}}
               for s in range(20) for i in range(20)]
    c = Collector().read([_write(tmp_path / "events.jsonl", events)])
    keywords = [k for s in c.sessions.values() for k in s.keywords]
    assert len(keywords) == 20 * 101 and all(s.keywords["kw"] == 100 for s in c.sessions.values())
    assert all(len(t.marks) == 1 for s in c.sessions.values() for t in s.lanes["lane-0"].tracks.values())
    assert _kept_bytes(c) + sum(map(sys.getsizeof, keywords)) <= 1_000_000  # 792 KB of keywords


def _pages(tmp_path: Path, src: Path, name: str) -> dict[str, str]:
    return {p.name: re.sub(r"nonce(=\"|-)[A-Za-z0-9_-]+", "nonce", p.read_text())
            for p in build_reports([str(src)], str(tmp_path / name))}


def test_under_the_budget_pages_are_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to the budget nothing is left out for it (the pages are those of an unbounded report); one byte less
    and the biggest tracks are thinned, and their page says so."""
    events = _events(sessions=3, lanes=2, per_track=30, text="words " * 20)
    events += _events(sessions=1, lanes=1, per_track=1600, text="crowded", first=3)  # over 1,500 a track
    src = _write(tmp_path / "e.jsonl", events)
    monkeypatch.setattr(collect, "MAX_KEPT", 1 << 40)
    peak = 0
    settle = Budget.settle

    def watched(self: Budget) -> None:  # the most the lists held at once, as the budget sees it
        nonlocal peak
        peak = max(peak, self.used)
        settle(self)

    monkeypatch.setattr(Budget, "settle", watched)
    Collector().read([src])
    monkeypatch.setattr(Budget, "settle", settle)
    unbounded = _pages(tmp_path, src, "unbounded")
    crowded = unbounded["report-cap-3.html"]  # thinned by the 1,500 a track, as before: now it says so
    drawn = crowded.count('class="m ')
    assert f"{6400 - drawn} of 6400 marks are not drawn" in crowded and "report fewer" not in crowded
    listed = crowded[crowded.index("<h2>Lifecycle</h2>"):crowded.index("<h2>Gaps")].count("<tr><td")
    assert f"{1600 - listed} more lifecycle events not listed" in crowded  # thinned by the 500 cap, as before
    assert "marks are not drawn" not in unbounded["report-cap-1.html"]
    monkeypatch.setattr(collect, "MAX_KEPT", peak)
    assert _pages(tmp_path, src, "at") == unbounded
    monkeypatch.setattr(collect, "MAX_KEPT", peak - 1)
    over = _pages(tmp_path, src, "over")
    # only the biggest tracks are thinned: the small sessions keep all of theirs
    assert {n for n in over if over[n] != unbounded[n]} == {"report-cap-3.html"}
    thinned = over["report-cap-3.html"]
    assert thinned.count('class="m ') < drawn and "report fewer at a time" in thinned


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 3000), st.lists(st.tuples(st.integers(0, 4), st.integers(0, 50)), max_size=300))
def test_kept_lists_stay_within_the_budget_and_thin_evenly(limit: int, offers: list[tuple[int, int]]) -> None:
    """Any mix of offers (and bytes charged outside the lists): the bytes counted are those held, within the
    budget (or every cap is 1), the tracks keep every n-th item offered, the earliest list its first ones; under
    the budget, what an unbounded one keeps."""
    budget, free = Budget(limit), Budget(1 << 40)
    lists = [Track(8, int, budget), Track(5, int, budget), Earliest(6, int, budget), Track(3, int, budget)]
    alone = [Track(8, int, free), Track(5, int, free), Earliest(6, int, free), Track(3, int, free)]
    offered: list[list[int]] = [[], [], [], []]
    charged = 0
    for which, size in offers:
        if which == 4:  # e.g. a keyword: held outside the lists, never dropped
            budget.charge(size)
            free.charge(size)
            charged += size
        else:
            for ls in (lists, alone):
                ls[which].add(size)
            offered[which].append(size)
        assert budget.used == charged + sum(sum(k.items) for k in lists)
        assert budget.used <= limit or all(k.cap == 1 for k in lists)
    for k, items in zip(lists, offered, strict=True):
        assert len(k) <= k.cap and k.seen == len(items)
        assert k.items == (items[::k.stride] if isinstance(k, Track) else items[:len(k)])
    if budget.level == 0:
        assert [k.items for k in lists] == [k.items for k in alone]


def test_matches_of_keywords_past_the_cap_are_said_not_counted(tmp_path: Path) -> None:
    """A session keeps its first 500 distinct keywords; matches of later ones were dropped without a word, so
    the chips looked like every match. The page now says how many matches it did not count."""
    events = [{"channel": "alert", "capture_session_id": "cap-k", "rtstream_name": "screen",
               "data": {"text": "t", "start": T0 + i, "event_label": "L", "matched": [f"kw{i}", "code"]}}
              for i in range(collect.MAX_KEYWORDS + 10)]
    (page,) = build_reports([str(_write(tmp_path / "events.jsonl", events))], str(tmp_path / "pages"))
    html = page.read_text()
    assert "code <b>510</b>" in html  # a keyword kept is still counted in full
    assert "11 more matches of keywords past the first 500 distinct ones are not counted here." in html
