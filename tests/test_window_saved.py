"""A `window` stage restarted on a state.db it cannot simply resume: damaged entries, another config's windows,
a newest event time no clock gives. Each event still counts once, and every event flows on."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.api import Context
from pipeline.build import Chain
from pipeline.deadletter import DeadLetter
from pipeline.state.store import open_store
from stages.processors.window import Window, WindowOptions

MakeCtx = Callable[..., Context]
T0 = 1_700_000_040_000  # ms, a multiple of 60 s and of 120 s
STAGE = "stages[0]:window"


def ev(i: int) -> dict[str, Any]:
    return {"channel": "transcript", "capture_session_id": "c", "data": {"text": "a b", "start": T0 + i * 1000}}


def first_run(make_context: MakeCtx, state: Path, opts: WindowOptions, n: int) -> None:
    """A run that saw events 0..n-1 (one per second) and was killed: its open windows are in state.db."""
    store = open_store(state)
    w = Window(opts, make_context(STAGE, state=store))
    w.process([ev(i) for i in range(n)])
    store.flush()
    store.close()


def second_run(make_context: MakeCtx, tmp_path: Path, state: Path, opts: WindowOptions,
               events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], DeadLetter]:
    """The restart, through a real chain (which retries a raising batch event by event): (passed on, metrics)."""
    store = open_store(state)
    dl = DeadLetter(tmp_path / "dead-letter.jsonl")
    w = Window(opts, make_context(STAGE, state=store))
    chain = Chain([w], dl)
    out = chain(events) + chain.flush()
    store.close()
    return [e for e in out if e["channel"] != "metrics"], [e for e in out if e["channel"] == "metrics"], dl


@pytest.mark.parametrize("value", ["5", '{"end": "x"}', '{"key": {"capture_session_id": "c"}, "start": 1, "end": 2}',
                                   '[]', '{"key": {}, "start": 0, "end": 60000, "events": {"x": "1"}, "words": 0, '
                                         '"talk_ms": 0, "alerts": {}, "keywords": [], "ft": null, "first": null, '
                                         '"lt": null, "last": null}'])
def test_a_damaged_saved_window_is_dropped_and_every_event_still_flows_and_counts(
        make_context: MakeCtx, tmp_path: Path, value: str, caplog: pytest.LogCaptureFixture) -> None:
    """Before: one such entry made every batch raise after folding it; the chain's retry event by event then
    raised again, so all 60 events were dead-lettered (none passed on) and 59 counted late."""
    state = tmp_path / "state"
    opts = WindowOptions(size="60s")
    first_run(make_context, state, opts, 30)
    db = sqlite3.connect(state / "state.db")
    assert db.execute("UPDATE state SET value = ? WHERE key LIKE '\"[%'", (value,)).rowcount == 1
    db.commit()
    db.close()
    with caplog.at_level(logging.WARNING):
        passed, metrics, _ = second_run(make_context, tmp_path, state, opts, [ev(i) for i in range(30, 90)])
    assert len(passed) == 60
    assert not (tmp_path / "dead-letter.jsonl").exists() or not (tmp_path / "dead-letter.jsonl").read_text()
    assert [(m["window"]["start"] - T0, m["data"]["events"]) for m in metrics] == [
        (0, {"transcript": 30}), (60_000, {"transcript": 30})]
    assert "dropped 1 saved window(s) that cannot be read" in caplog.text


@pytest.mark.parametrize(("before", "after"), [("60s", "120s"), ("120s", "60s")])
def test_windows_saved_under_another_size_close_at_the_restart_and_never_take_new_events(
        make_context: MakeCtx, tmp_path: Path, before: str, after: str) -> None:
    """Before (60 s -> 120 s, windows starting at the same time): the saved [0, 60 s) window took the event at
    60 s past its end, closed, and a second window [0, 120 s) began; 120 s -> 60 s: the saved [0, 120 s) took
    the events of [60 s, 120 s) that belonged to a 60 s window (and was emitted as one of 120 s)."""
    state = tmp_path / "state"
    first_run(make_context, state, WindowOptions(size=before), 30)
    passed, metrics, _ = second_run(make_context, tmp_path, state, WindowOptions(size=after),
                                    [ev(i) for i in range(30, 200)])
    assert len(passed) == 170
    saved, *new = metrics
    assert saved["window"] == {"start": T0, "end": T0 + int(before[:-1]) * 1000}
    assert saved["data"]["events"] == {"transcript": 30}  # the first run's events, nothing of the second's
    size = int(after[:-1]) * 1000
    for m in new:
        lo, hi = m["window"]["start"], m["window"]["end"]
        assert hi - lo == size
        assert m["data"]["events"]["transcript"] == sum(lo <= T0 + i * 1000 < hi for i in range(30, 200)), m
    assert sum(m["data"]["events"]["transcript"] for m in metrics) == 200


def test_a_saved_newest_time_no_clock_gives_is_ignored(make_context: MakeCtx, tmp_path: Path) -> None:
    """Before: a saved newest event time far ahead (damaged, or a run under a clock a year ahead) made every
    event of the restarted run late: counted in no window."""
    state = tmp_path / "state"
    opts = WindowOptions(size="60s")
    first_run(make_context, state, opts, 30)
    db = sqlite3.connect(state / "state.db")
    assert db.execute("UPDATE state SET value = ? WHERE key = '\"~watermark\"'",
                      (str(T0 + 10 * 365 * 86_400_000),)).rowcount == 1
    db.commit()
    db.close()
    passed, metrics, _ = second_run(make_context, tmp_path, state, opts, [ev(i) for i in range(30, 90)])
    assert len(passed) == 60
    assert [m["data"]["events"]["transcript"] for m in metrics] == [60, 30]


def test_windows_saved_by_a_stage_that_moved_between_two_runs_are_resumed_at_its_new_place(
        make_context: MakeCtx, tmp_path: Path) -> None:
    """A filter added in front of the window stage between a kill and the restart: `stages[0]:window` became
    `stages[1]:window`. Before: the 30 events of the open window stayed in state.db, never emitted (the
    window said 30 of 60)."""
    state = tmp_path / "state"
    opts = WindowOptions(size="60s")
    first_run(make_context, state, opts, 30)
    store = open_store(state)
    w = Window(opts, make_context("stages[1]:window", state=store))
    out = w.process([ev(i) for i in range(30, 90)]) + w.flush()
    store.flush()
    store.close()
    assert [(m["window"]["start"] - T0, m["data"]["events"]) for m in out if m["channel"] == "metrics"] == [
        (0, {"transcript": 60}), (60_000, {"transcript": 30})]
    store = open_store(state)
    assert store.unclaimed() == ["window:stages[1]:window"]  # nothing left at the old place
    store.close()
