"""The `window` processor against hostile event times and keywords off the wire."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.api import Context
from stages.processors.window import Window, WindowOptions

MakeCtx = Callable[..., Context]
NOW_MS = int(time.time() * 1000) // 60_000 * 60_000 - 3_600_000  # an hour ago, on the minute


def transcript(t: int, text: str = "hello there") -> dict[str, Any]:
    return {"channel": "transcript", "capture_session_id": "cap-1", "rtstream_id": "rts-1",
            "data": {"text": text, "start": t, "end": t + 500, "is_final": True}}


def run(w: Window, batches: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for b in batches:
        out += [e for e in w.process(b) if e.get("channel") == "metrics"]
    return out + w.flush()


def summary(metrics: list[dict[str, Any]]) -> dict[int, tuple[int, int]]:
    return {m["window"]["start"]: (sum(m["data"]["events"].values()), m["data"]["words"]) for m in metrics}


def test_one_event_from_a_microsecond_clock_does_not_close_every_window(make_context: MakeCtx) -> None:
    """A `data.start` in microseconds (1.7e15, well inside ±2^53 ms) moved the watermark 55,000 years ahead:
    every open window closed at once, and every later event of the run was "late", so no metrics were
    made for the rest of the session (here: 3 minutes of 60 events, 59 of them lost to the windows)."""
    w = Window(WindowOptions(size="60s", allowed_lateness="5s"), make_context())
    normal = [transcript(NOW_MS + i * 3000) for i in range(60)]
    bogus = transcript((NOW_MS + 1000) * 1000)  # the same moment, in microseconds
    metrics = run(w, [normal[:1], [bogus], normal[1:30], normal[30:]])
    assert summary(metrics) == {NOW_MS: (20, 40), NOW_MS + 60_000: (20, 40), NOW_MS + 120_000: (20, 40)}
    assert w.report()["late"] == 1  # the bogus one, passed on and counted, never folded
    assert not any(m.get("evicted") for m in metrics)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(times=st.lists(st.integers(0, 600_000), min_size=1, max_size=40), at=st.integers(0, 40),
       future=st.integers(86_400_000 + 7_200_000, (1 << 53) - NOW_MS), cut=st.integers(1, 10))
def test_a_far_future_event_anywhere_changes_no_window(make_context: MakeCtx, times: list[int], at: int,
                                                       future: int, cut: int) -> None:
    """Equivalence: a stream with one event more than a day ahead of the clock inserted anywhere gives the
    same metrics as the stream without it (that event counts as late and flows on)."""
    stream = [transcript(NOW_MS + t) for t in times]
    poisoned = [*stream[:at], transcript(NOW_MS + future), *stream[at:]]

    def metrics_of(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        w = Window(WindowOptions(size="30s", slide="10s", allowed_lateness="2s"), make_context())
        return run(w, [events[i:i + cut] for i in range(0, len(events), cut)])

    assert metrics_of(poisoned) == metrics_of(stream)


def test_a_long_matched_keyword_is_listed_once(make_context: MakeCtx) -> None:
    """`keywords` is "the distinct data.matched keywords": a keyword over 256 characters was compared uncut
    and stored cut, so it never matched itself and 100 alerts filled the list with 100 copies."""
    w = Window(WindowOptions(size="60s"), make_context())
    long_kw = "k" * 300
    alerts = [{"channel": "alert", "capture_session_id": "cap-1",
               "data": {"start": NOW_MS + i, "event_label": "l", "matched": [long_kw, "short"]}}
              for i in range(100)]
    (m,) = run(w, [alerts])
    assert m["data"]["keywords"] == sorted(["k" * 256, "short"])
    assert m["data"]["alerts"] == {"l": 100}


def test_a_slide_that_puts_each_event_in_more_windows_than_may_be_open_is_a_config_error(tmp_path: Any) -> None:
    """`size: 1h, slide: 100ms` validated, then every event fell in 36,000 windows with at most 10,000 open:
    1.2 s per event, and each event closed ~27,000 windows early as partial `evicted` metrics."""
    from tests.test_runtime import run_cli

    (tmp_path / "in.jsonl").write_text("")
    cfg = tmp_path / "w.yaml"
    cfg.write_text(f"name: w\nsource: {{type: replay, path: {tmp_path}/in.jsonl}}\n"
                   "stages:\n  - {type: window, size: 1h, slide: 100ms}\nsinks: [{type: console}]\n")
    res = run_cli("validate", str(cfg), timeout=30)
    assert res.returncode == 2, res.stderr
    assert "every event in 36000 windows, more than max_open_windows (10000)" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    WindowOptions(size="1d", slide="1m")  # 1,440 windows per event: allowed (the cost is documented)
    WindowOptions(size="1h", slide="100ms", max_open_windows=40_000)


def test_a_transcript_ending_in_the_far_future_adds_no_talk_time_and_the_window_is_still_saved(
        make_context: MakeCtx, tmp_path: Any) -> None:
    """`data.end` comes off the wire: one transcript ending at 2^64 - 1 ms made a 60 s window's talk_seconds
    1.8e16, and two such summed past 64 bits, which the state store cannot save: the open window was silently
    not persisted, so a crash lost it. A transcript longer than a day now adds no talk time."""
    from pipeline.state.store import SqliteStateStore

    store = SqliteStateStore(tmp_path / "state")
    w = Window(WindowOptions(size="60s"), make_context(state=store))
    hostile = [{**transcript(NOW_MS + i), "data": {"text": "a b", "start": NOW_MS + i, "end": (1 << 64) - 1}}
               for i in range(2)]
    w.process([*hostile, transcript(NOW_MS + 2)])
    store.flush()
    reopened = SqliteStateStore(tmp_path / "state").get(Window.state_name("test"))
    assert [k for k in reopened if k != "~watermark"] == [f'[{NOW_MS},"cap-1"]']  # the open window was saved
    (m,) = w.flush()
    assert m["data"]["talk_seconds"] == 0.5
    assert m["data"]["events"] == {"transcript": 3} and m["data"]["words"] == 6


def test_an_event_hours_ahead_of_the_clock_does_not_make_the_live_stream_late(make_context: MakeCtx) -> None:
    """An event time up to a day ahead of the wall clock is accepted, and it moved the watermark there: one
    transcript from a peer 23 h ahead closed every open window and made every event of the next 23 h late,
    so a live session made no more metrics. The watermark now stops at the wall clock."""
    w = Window(WindowOptions(size="60s", allowed_lateness="5s"), make_context())
    live = int(time.time() * 1000) - 3000  # events of a live session arrive a little after their time
    stream = [transcript(live + i * 10) for i in range(100)]
    ahead = transcript(int(time.time() * 1000) + 23 * 3_600_000)
    metrics = run(w, [stream[:50], [ahead], stream[50:]])
    assert w.report()["late"] == 0
    counted = sum(sum(m["data"]["events"].values()) for m in metrics if m["window"]["start"] <= live + 1000)
    assert counted == 100  # every live event is in a window (the one ahead is in its own, closed at the end)
    assert sum(sum(m["data"]["events"].values()) for m in metrics) == 101


def test_key_values_equal_in_python_but_of_other_types_get_windows_of_their_own(make_context: MakeCtx) -> None:
    """True == 1 == 1.0 as dict keys: in one batch, events keyed 1, true and 1.0 all went to the window of
    whichever came first (one batch per event kept them apart), though key values keep their type (1.0 becomes
    "1.0"). Also when windows are evicted mid-batch."""
    vals: list[Any] = [1, True, 1.0, "1", 0, False, None, 0.0]
    stream = [{"channel": "x", "k": v, "data": {"start": NOW_MS + i}} for i, v in enumerate(vals * 3)]

    def counts(metrics: list[dict[str, Any]]) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in metrics:
            k = json.dumps(m["key"]["k"])
            out[k] = out.get(k, 0) + sum(m["data"]["events"].values())
        return out

    want = {"1": 3, "true": 3, '"1.0"': 3, '"1"': 3, "0": 3, "false": 3, "null": 3, '"0.0"': 3}
    for max_open in (10, 3):
        opts = WindowOptions(size="1s", key=["k"], allowed_lateness="1s", max_open_windows=max_open)
        together = run(Window(opts, make_context()), [[dict(e) for e in stream]])
        assert counts(together) == want, max_open
        assert counts(run(Window(opts, make_context()), [[dict(e)] for e in stream])) == want
        assert {json.dumps(m["k"]) for m in together if "k" in m} == set(want) - {"null"}  # copied, typed


def test_a_window_longer_than_any_calendar_is_a_config_error(tmp_path: Any) -> None:
    """`size: 99999999999999999999d` validated, then every `metrics` event it made held window bounds no JSON
    integer can hold: each was dead-lettered and the run exited 0. A window is now at most 366 days (as is
    allowed_lateness)."""
    from tests.test_runtime import run_cli

    (tmp_path / "in.jsonl").write_text("")
    for opts, what in (("size: 99999999999999999999d", "size"),
                       ("size: 1m, allowed_lateness: 99999999999999999999d", "allowed_lateness")):
        cfg = tmp_path / "w.yaml"
        cfg.write_text(f"name: w\nsource: {{type: replay, path: {tmp_path}/in.jsonl}}\n"
                       f"stages:\n  - {{type: window, {opts}}}\nsinks: [{{type: console}}]\n")
        res = run_cli("validate", str(cfg), timeout=30)
        assert res.returncode == 2, res.stderr
        assert f"{what} must be at most 366 days" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    WindowOptions(size="366d", allowed_lateness="366d")
