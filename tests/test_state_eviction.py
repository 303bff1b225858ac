"""Rule and enrich state stay bounded: evicted by event time and capped in size (ids are capped at the edge)."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from typing import Any

from pipeline.api import Context, StateStore
from stages.processors.enrich import Enrich
from stages.processors.rules import Rules

T0 = 1_710_000_000_000


def visual(rid: str, at: int, text: str = "editing code") -> dict[str, Any]:
    return {"channel": "visual_index", "rtstream_id": rid, "data": {"text": text, "start": at}}


def rules(make_context: Callable[..., Context], state: StateStore, **opts: Any) -> Rules:
    rule = {"name": "code", "keywords": ["code"], "cooldown": "30s"}
    return Rules(Rules.Options.model_validate({"rules": [rule], **opts}), make_context("rules", state=state))


def retained(fn: Callable[[], None]) -> int:
    """Bytes still allocated after `fn` ran (what it left behind: the stage state)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fn()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_rules_state_is_capped_under_a_flood_of_distinct_rtstream_ids(make_context: Callable[..., Context]) -> None:
    state = StateStore()
    r = rules(make_context, state, max_state_keys=1_000)
    last_fired = state.get("rules.last_fired")
    sizes: list[int] = []

    def flood() -> None:
        for b in range(20):  # 10k distinct ids, all within one cooldown: only the cap can help
            r.process([visual(f"rts-{b}-{i}", T0 + b) for i in range(500)])
            sizes.append(len(last_fired))

    used = retained(flood)
    assert r.fired == 10_000 and max(sizes) <= 1_000
    assert used < 400_000, f"rules state retained {used} bytes"  # without the cap: ~1.4 MB


def test_rules_state_is_evicted_by_event_time_without_changing_outcomes(
        make_context: Callable[..., Context]) -> None:
    state = StateStore()
    r = rules(make_context, state, state_ttl="1m")
    last_fired = state.get("rules.last_fired")
    r.process([visual(f"rts-{i}", T0) for i in range(50)])
    assert len(last_fired) == 50
    out = r.process([visual("rts-0", T0 + 20_000)])  # inside the 30 s cooldown: silent
    assert len(out) == 1
    r.process([visual("rts-live", T0 + 200_000)])  # 200 s later: 30 s cooldown + 60 s ttl have passed
    assert set(last_fired) == {"code|rts-live"}
    assert len(r.process([visual("rts-live", T0 + 210_000)])) == 1  # its own cooldown still holds


def test_windows_are_evicted_and_zero_cooldown_rules_keep_no_state(make_context: Callable[..., Context]) -> None:
    state = StateStore()
    rule = {"name": "w", "keywords": ["code"], "window": "10s", "min_count": 3}
    r = Rules(Rules.Options.model_validate({"rules": [rule], "state_ttl": "0s"}), make_context("r", state=state))
    windows = state.get("rules.windows")
    r.process([visual(f"rts-{i}", T0) for i in range(100)])
    assert len(windows) == 100
    r.process([visual("x", T0 + 100_000)])
    assert set(windows) == {"w|x"}
    assert dict(state.get("rules.last_fired")) == {}  # no cooldown: nothing to remember


def active(session: str, rids: list[str], at: int) -> dict[str, Any]:
    return {"event": "capture_session.active", "capture_session_id": session, "unix_ts": at / 1000,
            "data": {"rtstreams": [{"rtstream_id": r, "name": f"n-{r}", "media_types": ["audio"]} for r in rids]}}


def test_enrich_map_is_capped_under_a_flood_of_distinct_rtstream_ids(make_context: Callable[..., Context]) -> None:
    state = StateStore()
    e = Enrich(Enrich.Options.model_validate({"max_rtstreams": 1_000}), make_context("enrich", state=state))
    streams = state.get("enrich.rtstreams")
    sizes: list[int] = []

    def flood() -> None:
        for b in range(20):  # 10k distinct rtstreams in 100 sessions
            e.process([active(f"cap-{b}-{j}", [f"rts-{b}-{j}-{i}" for i in range(100)], T0) for j in range(5)])
            sizes.append(len(streams))

    used = retained(flood)
    assert max(sizes) <= 1_000
    assert used < 600_000, f"enrich state retained {used} bytes"  # without the cap: ~2.5 MB


def test_enrich_forgets_ended_sessions_and_idle_rtstreams_but_keeps_live_ones(
        make_context: Callable[..., Context]) -> None:
    state = StateStore()
    e = Enrich(Enrich.Options.model_validate({"rtstream_ttl": "1h", "ended_ttl": "5m"}),
               make_context("enrich", state=state))
    streams = state.get("enrich.rtstreams")
    e.process([active("cap-old", ["a"], T0), active("cap-live", ["b"], T0), active("cap-idle", ["c"], T0)])
    e.process([{"event": "capture_session.exported", "capture_session_id": "cap-old", "unix_ts": (T0 + 1000) / 1000}])
    hour = 3_600_000
    for k in range(1, 6):  # "b" keeps talking for 75 minutes; "a" ended, "c" went quiet
        ev = e.process([visual("b", T0 + k * hour // 4)])
        assert ev[0]["rtstream_name"] == "n-b" and ev[0]["capture_session_id"] == "cap-live"
        if k == 1:
            assert "a" not in streams and "c" in streams  # 15 min after the export: gone
    assert set(streams) == {"b"}


def test_a_bogus_future_event_time_does_not_expire_everything(make_context: Callable[..., Context]) -> None:
    import time

    now = int(time.time() * 1000)
    state = StateStore()
    r = rules(make_context, state, state_ttl="1m")
    r.process([visual("rts-1", now)])
    r.process([visual("rts-2", 32_503_680_000_000)])  # year 3000, from a broken or hostile peer
    assert "code|rts-1" in state.get("rules.last_fired")
    assert len(r.process([visual("rts-1", now + 10_000)])) == 1  # still inside its cooldown: no second alert
    e = Enrich(Enrich.Options.model_validate({}), make_context("enrich", state=state))
    e.process([active("cap-1", ["a"], now)])
    e.process([{**visual("a", 32_503_680_000_000)}])
    assert e.process([visual("a", now + 1000)])[0]["rtstream_name"] == "n-a"


def test_an_event_hours_ahead_of_the_clock_does_not_expire_everything(make_context: Callable[..., Context]) -> None:
    """Within a day ahead of the wall clock an event time moved the watermark: one event 23 h ahead (a skewed or
    hostile peer) swept every cooldown and every rtstream name; the next hit fired again inside its cooldown.
    Now the watermark goes no further than the clock. Both the C engine and the Python path."""
    import time

    now = int(time.time() * 1000)
    ahead = now + 23 * 3_600_000
    for native in (True, False):
        state = StateStore()
        saved, Rules.native = Rules.native, native
        try:
            r = rules(make_context, state, state_ttl="1m")
        finally:
            Rules.native = saved
        r.process([visual("rts-1", now)])
        r.process([visual("rts-2", ahead)])
        r.process([visual("rts-3", now + 1)])  # the next batch's sweep
        assert "code|rts-1" in state.get("rules.last_fired"), native
        assert len(r.process([visual("rts-1", now + 10_000)])) == 1, native  # inside its cooldown: no alert
    state = StateStore()
    e = Enrich(Enrich.Options.model_validate({}), make_context("enrich", state=state))
    e.process([active("cap-1", ["a"], now)])
    e.process([visual("a", ahead)])
    e.process([visual("b", now + 1)])
    assert e.process([visual("a", now + 1000)])[0]["rtstream_name"] == "n-a"


def test_long_cooldowns_are_not_swept_every_minute_of_event_time(
        make_context: Callable[..., Context], monkeypatch: Any) -> None:
    """A sweep walks every saved key; it ran once per minute of event time whatever the horizon. With a 24 h
    cooldown the keys cannot expire for a day, yet each minute walked them all again: 200 streams' cooldowns and
    one event a minute (a replay, or a quiet meeting) cost 200 key walks per event. Now the sweeps are a quarter
    of the horizon apart (at least a minute), and the keys still go once the horizon has passed."""
    from stages.processors import rules as rules_module

    walked = 0
    last_time = rules_module._last_time

    def counting(v: Any) -> int:
        nonlocal walked
        walked += 1
        return last_time(v)

    monkeypatch.setattr(rules_module, "_last_time", counting)
    state = StateStore()
    rule = {"name": "code", "keywords": ["code"], "cooldown": "24h"}
    r = Rules(Rules.Options.model_validate({"rules": [rule], "state_ttl": "10m"}), make_context("rules", state=state))
    last_fired = state.get("rules.last_fired")
    r.process([visual(f"rts-{i}", T0) for i in range(200)])
    walked = 0
    for minute in range(1, 1_401):  # 23 h 20 min
        r.process([visual("rts-0", T0 + minute * 60_000)])  # inside its cooldown: silent
    assert r.fired == 200
    assert walked <= 2 * 1_400, f"{walked} key walks for 1,400 events"  # before: 280,000
    r.process([visual("rts-late", T0 + 2 * 24 * 3_600_000)])  # two days on: every old cooldown has expired
    assert set(last_fired) == {"code|rts-late"}
