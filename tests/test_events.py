from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pipeline import events as ev


def test_channel_and_aliases() -> None:
    assert ev.channel({"channel": "scene_index"}) == "scene_index"
    assert ev.channel({"event": "capture_session.active"}) == "capture_session"
    chans = ev.channel_set(["scene_index", "capture_session"])
    assert ev.in_channels({"channel": "visual_index"}, chans)
    assert ev.in_channels({"event": "capture_session.stopped"}, chans)
    assert not ev.in_channels({"channel": "transcript"}, chans)


def test_event_time_precedence() -> None:
    assert ev.event_time_ms({"data": {"start": 5, "timestamp": 7}, "unix_ts": 1.0}) == 5
    assert ev.event_time_ms({"data": {"timestamp": 7}, "unix_ts": 1.0}) == 7
    assert ev.event_time_ms({"unix_ts": 1.5}) == 1500
    assert ev.event_time_ms({"data": {"start": True}}) == 0


def test_stamp_keeps_existing() -> None:
    e = {"ts": "x", "unix_ts": 3.0}
    assert ev.stamp(e) == {"ts": "x", "unix_ts": 3.0}
    e2 = ev.stamp({}, now=1772446530.123)
    assert e2 == {"ts": "2026-03-02T10:15:30.123Z", "unix_ts": 1772446530.123}


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_stamper_matches_iso(now: float) -> None:
    e = ev.stamp({}, now=now)
    assert e["ts"].endswith("Z") and len(e["ts"]) == 24
