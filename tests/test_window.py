"""The `window` processor against a plain definition, and its end-of-run flush in real runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.api import Context
from stages.processors.window import Window, WindowOptions

MakeCtx = Callable[..., Context]
ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "config" / "samples" / "meeting-session.jsonl"

TEXTS = ["", "hello world", "a b c", "code on screen", "  spaced   out  "]


@st.composite
def events(draw: Any) -> dict[str, Any]:
    kind = draw(st.sampled_from(["transcript", "visual_index", "scene_index", "alert", "lifecycle", "bare"]))
    t = draw(st.integers(0, 20_000))
    sess = draw(st.sampled_from(["cap-1", "cap-2", None]))
    ev: dict[str, Any] = {"rtstream_id": draw(st.sampled_from(["rts-1", "rts-2"]))}
    if sess is not None:
        ev["capture_session_id"] = sess
    text = draw(st.sampled_from(TEXTS))
    if kind == "transcript":
        ev.update(channel="transcript", data={"text": text, "start": t, "end": t + draw(st.integers(-5, 3000)),
                                              "is_final": draw(st.sampled_from([True, False, None]))})
        if ev["data"]["is_final"] is None:
            del ev["data"]["is_final"]
    elif kind in ("visual_index", "scene_index"):
        ev.update(channel=kind, data={"text": text, "start": t, "end": t + 2000})
    elif kind == "alert":
        ev.update(channel="alert", data={"event_label": draw(st.sampled_from(["code", "slack"])), "timestamp": t,
                                         "text": text, "matched": draw(st.lists(st.sampled_from(["x", "y", "z"]),
                                                                                max_size=2))})
    elif kind == "lifecycle":
        ev.update(event="capture_session.active", status="active", unix_ts=t / 1000)
    else:
        ev.update(channel="visual_index", unix_ts=t / 1000)  # no data: event time from the receipt stamp
    return ev


def event_ms(ev: dict[str, Any]) -> int:
    d = ev.get("data") or {}
    if isinstance(d.get("start"), int):
        return int(d["start"])
    if isinstance(d.get("timestamp"), int):
        return int(d["timestamp"])
    return int(ev["unix_ts"] * 1000)


def plain(stream: list[dict[str, Any]], size: int, slide: int, lateness: int,
          fields: list[str]) -> tuple[dict[Any, dict[str, Any]], int]:
    """The definition: drop late events (arrival order), sort the rest by event time, bucket, aggregate."""
    newest: int | None = None
    kept, late = [], 0
    for ev in stream:
        t = event_ms(ev)
        if newest is not None and t < newest - lateness:
            late += 1
            continue
        newest = t if newest is None else max(newest, t)
        kept.append((t, ev))
    kept.sort(key=lambda p: p[0])
    buckets: dict[Any, list[tuple[int, dict[str, Any]]]] = {}
    for t, ev in kept:
        key = tuple(ev.get(f) for f in fields)
        for start in range((t - size) // slide * slide, t + 1, slide):  # every slide-aligned start
            if start <= t < start + size:
                buckets.setdefault((key, start), []).append((t, ev))
    out = {}
    for (key, start), evs in buckets.items():
        chans: dict[str, int] = {}
        alerts: dict[str, int] = {}
        words, talk, keywords, texts = 0, 0, set(), []
        for _, ev in evs:
            ch = "capture_session" if "event" in ev else ev["channel"].replace("scene_index", "visual_index")
            chans[ch] = chans.get(ch, 0) + 1
            d = ev.get("data", {})
            final = not (ch == "transcript" and d.get("is_final") is False)
            if ch == "transcript" and final:
                words += len(d["text"].split())
                talk += max(0, d["end"] - d["start"])
            if ch == "alert":
                alerts[d["event_label"]] = alerts.get(d["event_label"], 0) + 1
                keywords |= set(d["matched"])
            if final and d.get("text"):
                texts.append(d["text"])
        out[(key, start)] = {"events": chans, "words": words, "talk_seconds": talk / 1000, "alerts": alerts,
                             "keywords": sorted(keywords), "first_text": texts[0] if texts else None,
                             "last_text": texts[-1] if texts else None}
    return out, late


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=st.lists(events(), max_size=60), size=st.integers(1, 6000), slide_div=st.integers(1, 4),
       lateness=st.integers(0, 4000), cuts=st.lists(st.integers(1, 7), min_size=1, max_size=20),
       per_stream=st.booleans())
def test_window_matches_the_plain_definition(make_context: MakeCtx, stream: list[dict[str, Any]], size: int,
                                             slide_div: int, lateness: int, cuts: list[int],
                                             per_stream: bool) -> None:
    slide = max(1, size // slide_div)
    fields = ["capture_session_id", "rtstream_id"] if per_stream else ["capture_session_id"]
    w = Window(WindowOptions(size=size / 1000, slide=slide / 1000, allowed_lateness=lateness / 1000, key=fields),
               make_context("stages[0]:window"))
    emitted: list[dict[str, Any]] = []
    passed: list[dict[str, Any]] = []
    i, c, newest = 0, 0, None
    while i < len(stream):  # random batch boundaries must not change the result
        batch = [dict(e) for e in stream[i:i + cuts[c % len(cuts)]]]
        i += len(batch)
        c += 1
        for ev in batch:
            t = event_ms(ev)
            newest = t if newest is None else max(newest, t)
        out = w.process(batch)
        for ev in out:
            if ev.get("channel") == "metrics":
                assert ev["window"]["end"] <= newest - lateness  # closed only once the watermark passed it
                emitted.append(ev)
            else:
                passed.append(ev)
    emitted.extend(w.flush())
    assert passed == stream  # every event flows on, late ones included, in order
    got = {}
    for m in emitted:
        k = (tuple(m["key"][f] for f in fields), m["window"]["start"])
        assert k not in got, "a window was emitted twice"
        assert m["window"]["end"] - m["window"]["start"] == size
        got[k] = m["data"]
    want, late = plain(stream, size, slide, lateness, fields)
    assert got == want
    assert w.late == late
    assert w.flush() == []


def test_late_event_is_counted_passed_on_and_not_folded(make_context: MakeCtx) -> None:
    w = Window(WindowOptions(size="10s", allowed_lateness="2s"), make_context())
    tr = {"channel": "transcript", "capture_session_id": "c", "data": {"text": "one two", "start": 1000,
                                                                        "end": 2000}}
    out = w.process([tr, {"channel": "visual_index", "capture_session_id": "c", "data": {"text": "x",
                                                                                        "start": 12500}}])
    assert [m["window"] for m in out if m["channel"] == "metrics"] == [{"start": 0, "end": 10000}]
    late = {"channel": "transcript", "capture_session_id": "c", "data": {"text": "late words here", "start": 3000}}
    assert w.process([late]) == [late]
    assert w.report()["late"] == 1
    (last,) = w.flush()
    assert last["window"] == {"start": 10000, "end": 20000} and last["data"]["words"] == 0
    assert last["capture_session_id"] == "c" and last["unix_ts"] == 20.0


def test_open_windows_are_bounded(make_context: MakeCtx) -> None:
    w = Window(WindowOptions(size="10ms", key=["rtstream_id"], max_open_windows=20, allowed_lateness="1h"),
               make_context())
    out = w.process([{"channel": "transcript", "rtstream_id": f"r{i}", "data": {"start": 1000 + i * 10}}
                     for i in range(30)])
    evicted = [m for m in out if m["channel"] == "metrics"]
    assert len(evicted) == 10 and all(m["evicted"] for m in evicted)  # two at a time (a tenth of 20)
    assert [m["key"]["rtstream_id"] for m in evicted] == [f"r{i}" for i in range(10)]  # the oldest windows
    assert len(w.flush()) == 20
    assert w.report()["evicted"] == 10
    big = Window(WindowOptions(size="1m", key=["rtstream_id"], max_open_windows=10_000), make_context())
    flood = [{"channel": "x", "rtstream_id": f"r{i}", "data": {"start": 1000}} for i in range(30_000)]
    t = time.process_time()
    out = big.process(flood)
    # 20,000 evictions: one scan of 10,000 windows each would take minutes; a tenth at a time, 20 scans
    assert len(out) == 30_000 + 20_000 and time.process_time() - t < 15


def test_a_bad_event_in_a_batch_is_dead_lettered_and_the_others_count_once(make_context: MakeCtx,
                                                                              tmp_path: Path) -> None:
    """Before, the batch raised on the bad event and the chain retried event by event: the events before it
    were folded into their window twice."""
    from pipeline.build import Chain
    from pipeline.deadletter import DeadLetter

    ctx = make_context()
    w = Window(WindowOptions(size="1m"), ctx)
    chain = Chain([w], DeadLetter(tmp_path / "chain-dead.jsonl"))
    good = {"channel": "transcript", "capture_session_id": "c",
            "data": {"text": "hello world", "start": 1_000, "end": 2_000}}
    assert chain([good, None, {**good, "data": {**good["data"], "start": 3_000}}]) == [good, {**good, "data": {
        **good["data"], "start": 3_000}}]
    (m,) = chain.flush()
    assert m["data"]["events"] == {"transcript": 2} and m["data"]["words"] == 4
    dead = [json.loads(x) for x in (tmp_path / "dead-letter.jsonl").read_text().splitlines()]
    assert [(d["stage"], d["reason"].split(":")[0]) for d in dead] == [("test", "AttributeError")]
    assert ctx.stats.errors == 1


@pytest.mark.parametrize("opts, msg", [({"size": "0s"}, "size must be"), ({"size": "1m", "slide": "2m"}, "slide"),
                                       ({"size": "1m", "key": ["a", "a"]}, "distinct")])
def test_bad_options(opts: dict[str, Any], msg: str) -> None:
    with pytest.raises(ValidationError, match=msg):
        WindowOptions.model_validate(opts)


def _config(tmp_path: Path, speed: float) -> Path:
    cfg = tmp_path / "w.yaml"
    cfg.write_text(f"""
name: w
source: {{type: replay, path: {SAMPLE}, speed: {speed}}}
stages:
  - {{type: enrich}}
  - {{type: window, size: 30s, key: [capture_session_id, rtstream_id], allowed_lateness: 10s}}
sinks:
  - {{type: jsonl, path: {tmp_path}/metrics.jsonl, channels: [metrics], flush_interval: 0}}
  - {{type: jsonl, path: {tmp_path}/events.jsonl, flush_interval: 0}}
dead_letter: {tmp_path}/dead.jsonl
""")
    return cfg


def _metrics(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_run_flushes_open_windows_when_the_source_ends(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(_config(tmp_path, 0))],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "late 0" in res.stderr and "windows" in res.stderr
    ms = _metrics(tmp_path)
    sample = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    finals = [e for e in sample if e.get("channel") == "transcript" and e["data"].get("is_final")]
    assert sum(m["data"]["events"].get("transcript", 0) for m in ms) == sum(
        e.get("channel") == "transcript" for e in sample)
    assert round(sum(m["data"]["talk_seconds"] for m in ms), 3) == round(
        sum(e["data"]["end"] - e["data"]["start"] for e in finals) / 1000, 3)
    last = max(event_ms(e) for e in sample if "rtstream_id" in e)
    assert any(m["window"]["start"] <= last < m["window"]["end"] for m in ms)  # the last window was flushed


def test_signal_flushes_open_windows(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(_config(tmp_path, 1))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        events = tmp_path / "events.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and (
                not events.exists() or events.read_bytes().count(b"\n") < 3):
            time.sleep(0.05)  # real time: a few events in (so the run is up), every window still open
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    ms = _metrics(tmp_path)
    assert ms and all(m["window"]["start"] < 1772446530000 for m in ms), ms


def test_open_windows_survive_a_restart_through_the_state_file(tmp_path: Path, make_context: MakeCtx) -> None:
    from pipeline.state.store import open_store

    stream = [{"channel": "transcript", "capture_session_id": "c", "rtstream_id": f"r{i % 2}",
               "data": {"text": f"w{i} x", "start": 1000 * i, "end": 1000 * i + 500}} for i in range(50)]
    opts = WindowOptions(size="20s", slide="10s", key=["capture_session_id", "rtstream_id"], allowed_lateness="1s")

    def metrics(out: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in out if e["channel"] == "metrics"]

    one = Window(opts, make_context("stages[0]:window"))
    want = metrics(one.process([dict(e) for e in stream])) + one.flush()
    got: list[dict[str, Any]] = []
    for part in (stream[:23], stream[23:]):  # a run stops (no flush: kill -9) and a new one resumes the state
        store = open_store(tmp_path / "state")
        w = Window(opts, make_context("stages[0]:window", state=store))
        got += metrics(w.process([dict(e) for e in part]))
        store.flush()
        store.close()
    got += w.flush()
    assert got == want


def test_durations_in_milliseconds_are_exact(make_context: MakeCtx) -> None:
    w = Window(WindowOptions(size=1.001, allowed_lateness=1.003), make_context())  # size: 1.001 -> 1000.999.. ms
    (m,) = w.process([{"channel": "x", "data": {"start": 5}}]) and w.flush()
    assert m["window"] == {"start": 0, "end": 1001}


JSON = st.recursive(st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=8)
FIELDS = st.sampled_from(["channel", "event", "data", "unix_ts", "capture_session_id", "rtstream_id"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(st.dictionaries(FIELDS, JSON | st.fixed_dictionaries(
    {}, optional={"start": JSON, "end": JSON, "text": JSON, "is_final": JSON, "matched": JSON,
                  "event_label": JSON, "timestamp": JSON})), max_size=8))
def test_any_json_events_never_raise_and_all_flow_on(make_context: MakeCtx, batch: list[dict[str, Any]]) -> None:
    w = Window(WindowOptions(size="1s", slide="500ms", key=["capture_session_id", "rtstream_id"]),
               make_context())
    out = w.process(batch) + w.flush()
    assert [e for e in out if e.get("channel") != "metrics" or "window" not in e] == batch
    for m in out[len(batch):]:
        json.dumps(m)  # what sinks and state stores must be able to write


def test_hostile_key_values_and_times(make_context: MakeCtx) -> None:
    w = Window(WindowOptions(size="1s", key=["capture_session_id", "rtstream_id"]), make_context())
    batch = [{"channel": "x", "capture_session_id": 1 << 70, "rtstream_id": ["a"], "data": {"start": 5}},
             {"channel": "x", "capture_session_id": "c" * 10_000, "data": {"start": 1 << 60}},
             {"channel": "x", "data": {"start": 1e300}}]
    out = w.process(batch) + w.flush()
    (m,) = out[3:]
    assert m["key"] == {"capture_session_id": str(1 << 70), "rtstream_id": "['a']"}
    assert w.report()["late"] == 2  # times no clock can produce never move the watermark


def test_channel_names_and_alert_labels_off_the_wire_are_bounded_per_window(make_context: MakeCtx) -> None:
    """One window, every event a new channel name (some long) or a new alert label: the window's state (saved
    after every batch) stays bounded, and every event is still counted."""
    w = Window(WindowOptions(size="1h"), make_context())
    batch = [{"channel": f"ch-{i}-" + "x" * (i % 2 * 10_000), "capture_session_id": "c", "data": {"start": i}}
             for i in range(3000)]
    batch += [{"channel": "alert", "capture_session_id": "c", "data": {"start": 5000 + i, "event_label": f"l{i}"}}
              for i in range(3000)]
    w.process(batch)
    (m,) = w.flush()
    events, alerts = m["data"]["events"], m["data"]["alerts"]
    assert sum(events.values()) == 6000 and sum(alerts.values()) == 3000
    assert len(events) <= 40 and all(len(k) <= 256 for k in events) and len(alerts) <= 110, (len(events),
                                                                                              len(alerts))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=st.lists(events(), max_size=60), size=st.integers(1, 6000), slide_div=st.integers(1, 4),
       lateness=st.integers(0, 4000), cuts=st.lists(st.integers(1, 7), min_size=1, max_size=20),
       every=st.integers(1, 4), max_open=st.integers(1, 30))
def test_restarts_from_the_state_file_anywhere_change_nothing(make_context: MakeCtx, tmp_path_factory: Any,
                                                              stream: list[dict[str, Any]], size: int,
                                                              slide_div: int, lateness: int, cuts: list[int],
                                                              every: int, max_open: int) -> None:
    """Runs killed after every `every`-th batch (state saved, nothing flushed) and started again emit what one
    run emits, evictions included (few open windows allowed)."""
    from pipeline.state.store import open_store

    slide = max(1, size // slide_div)
    opts = WindowOptions(size=size / 1000, slide=slide / 1000, allowed_lateness=lateness / 1000,
                         key=["capture_session_id", "rtstream_id"], max_open_windows=max(max_open, size // slide))
    batches, i = [], 0
    while i < len(stream):
        batches.append(stream[i:i + cuts[len(batches) % len(cuts)]])
        i += len(batches[-1])

    def metrics(out: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in out if e.get("channel") == "metrics"]

    one = Window(opts, make_context("stages[0]:window"))
    want = [m for b in batches for m in metrics(one.process([dict(e) for e in b]))] + one.flush()
    state = tmp_path_factory.mktemp("state")
    store = open_store(state)
    w = Window(opts, make_context("stages[0]:window", state=store))
    got: list[dict[str, Any]] = []
    for n, b in enumerate(batches):
        got += metrics(w.process([dict(e) for e in b]))
        store.flush()
        if n % every == every - 1:
            store.close()
            store = open_store(state)
            w = Window(opts, make_context("stages[0]:window", state=store))
    got += w.flush()
    store.close()
    assert got == want
