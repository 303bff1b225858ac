from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from pipeline.api import Context
from stages.processors.enrich import Enrich, EnrichOptions
from stages.processors.filter import Filter, FilterOptions
from stages.processors.rules import Rules, RulesOptions

MakeCtx = Callable[..., Context]


def vis(text: str, start: int = 1000, stream: str = "rts-3", name: str = "display:1", ch: str = "visual_index"):
    return {"channel": ch, "rtstream_id": stream, "rtstream_name": name, "data": {"text": text, "start": start}}


def tr(text: str, final: bool = True, start: int = 1000) -> dict[str, Any]:
    return {"channel": "transcript", "rtstream_id": "rts-1", "rtstream_name": "mic:default",
            "data": {"text": text, "is_final": final, "start": start}}


ACTIVE = {"event": "capture_session.active", "capture_session_id": "cap-1", "status": "active",
          "data": {"rtstreams": [{"rtstream_id": "rts-3", "name": "display:1", "media_types": ["video"]}]}}


def test_filter_channels_aliases_and_lifecycle(make_context: MakeCtx) -> None:
    f = Filter(FilterOptions(channels=["visual_index", "capture_session"]), make_context())
    batch = [vis("a", ch="scene_index"), vis("b"), tr("c"), ACTIVE, {"event": "capture_session.stopped"}]
    assert [e.get("data", {}).get("text") or e["event"] for e in f.process(batch)] == [
        "a", "b", "capture_session.active", "capture_session.stopped"]


def test_filter_final_only_min_length_and_globs(make_context: MakeCtx) -> None:
    f = Filter(FilterOptions(final_only=True, min_text_length=3, rtstream_names=["mic:*"]), make_context())
    batch = [tr("hello", final=False), tr("hello"), tr("hi"), vis("long enough"), ACTIVE]
    kept = f.process(batch)
    assert kept == [batch[1], ACTIVE]


def test_enrich_session_streams_fields_and_json(make_context: MakeCtx) -> None:
    e = Enrich(EnrichOptions(fields={"team": "blue"}), make_context())
    out = e.process([{"channel": "visual_index", "rtstream_id": "rts-3", "data": {"text": "x"}}, ACTIVE,
                     {"channel": "visual_index", "rtstream_id": "rts-3", "data": {"text": '{"app": "VS Code"}'}},
                     {"channel": "transcript", "rtstream_id": "rts-9", "data": {"text": "{not json"}}])
    assert "capture_session_id" not in out[0] and out[0]["team"] == "blue"
    assert out[2]["capture_session_id"] == "cap-1"
    assert out[2]["rtstream_name"] == "display:1" and out[2]["media_types"] == ["video"]
    assert out[2]["data"]["json"] == {"app": "VS Code"}
    assert "capture_session_id" not in out[3] and "json" not in out[3]["data"]  # unknown rtstream: no guess


def rules(make_context: MakeCtx, *specs: dict[str, Any]) -> Rules:
    return Rules(RulesOptions.model_validate({"rules": list(specs)}), make_context())


def alerts(out: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in out if e.get("channel") == "alert"]


def test_rules_alert_shape_and_event_passes_on(make_context: MakeCtx) -> None:
    r = rules(make_context, {"name": "code-on-screen", "channels": ["visual_index"], "keywords": ["code"]})
    ev = {**vis("User is editing Python code", start=1710000012340), "capture_session_id": "cap-1",
          "ts": "t", "unix_ts": 1.0}
    out = r.process([ev, vis("nothing here")])
    assert out[0] is ev and out[2]["data"]["text"] == "nothing here"
    assert out[1] == {"channel": "alert", "origin": "rules", "rtstream_id": "rts-3", "rtstream_name": "display:1",
                      "capture_session_id": "cap-1", "ts": "t", "unix_ts": 1.0,
                      "data": {"event_label": "code-on-screen", "timestamp": 1710000012340,
                               "text": "User is editing Python code", "severity": "info", "matched": ["code"],
                               "source_channel": "visual_index"}}


def test_word_vs_substring_vs_regex(make_context: MakeCtx) -> None:
    r = rules(make_context,
              {"name": "w", "keywords": ["code", "pull request"]},
              {"name": "s", "keywords": ["cod"], "match": "substring"},
              {"name": "x", "keywords": [r"PR\s*#\d+"], "match": "regex"})
    fired = lambda text: sorted(a["data"]["event_label"] for a in alerts(r.process([vis(text)])))  # noqa: E731
    assert fired("Decoder output") == ["s"]
    assert fired("CODE review") == ["s", "w"]
    assert fired("opening a Pull  Request now") == ["w"]
    assert fired("see pr #42") == ["x"]
    assert fired("pull requester") == []


def test_overlapping_keywords_all_reported(make_context: MakeCtx) -> None:
    r = rules(make_context, {"name": "a", "keywords": ["python code", "code"]},
              {"name": "b", "keywords": ["python"], "match": "substring"})
    out = alerts(r.process([vis("some python code")]))
    assert {a["data"]["event_label"]: sorted(a["data"]["matched"]) for a in out} == {
        "a": ["code", "python code"], "b": ["python"]}


def test_channel_scoping(make_context: MakeCtx) -> None:
    r = rules(make_context, {"name": "v", "channels": ["scene_index"], "keywords": ["slack"]})
    assert len(alerts(r.process([vis("slack open"), tr("slack open")]))) == 1


def test_cooldown_per_rule_and_stream_in_event_time(make_context: MakeCtx) -> None:
    r = rules(make_context, {"name": "c", "keywords": ["code"], "cooldown": "30s"})
    times = [0, 10_000, 29_999, 30_000, 45_000, 61_000]
    out = alerts(r.process([vis("code", start=1_000_000 + t) for t in times]))
    assert [a["data"]["timestamp"] - 1_000_000 for a in out] == [0, 30_000, 61_000]
    other = alerts(r.process([vis("code", start=1_000_000 + 5, stream="rts-9")]))
    assert len(other) == 1


def test_window_min_count(make_context: MakeCtx) -> None:
    r = rules(make_context, {"name": "w", "keywords": ["slack"], "window": "1m", "min_count": 3})
    times = [0, 10_000, 100_000, 110_000, 120_000, 130_000]
    out = alerts(r.process([vis("slack", start=t) for t in times]))
    assert [a["data"]["timestamp"] for a in out] == [120_000]


def test_min_count_is_bounded() -> None:
    """Unbounded, min_count: 1000000000 kept every match time of a window and copied it per match:
    40,000 matching events took 62 s (1.8 s at 1000), and state grew with every match."""
    with pytest.raises(ValidationError, match="less than or equal to 1000"):
        RulesOptions.model_validate({"rules": [{"name": "x", "keywords": ["a"], "window": "1h",
                                                "min_count": 1_000_000_000}]})


def test_rule_validation_errors() -> None:
    with pytest.raises(ValidationError, match="invalid regex"):
        RulesOptions.model_validate({"rules": [{"name": "x", "keywords": ["("], "match": "regex"}]})
    with pytest.raises(ValidationError, match="min_count needs a window"):
        RulesOptions.model_validate({"rules": [{"name": "x", "keywords": ["a"], "min_count": 2}]})


def test_every_bad_keyword_of_a_rule_is_reported_at_once() -> None:
    """Only the first bad regex of a rule was reported: fix it, validate, find the next one."""
    with pytest.raises(ValidationError) as info:
        RulesOptions.model_validate({"rules": [{"name": "x", "keywords": ["(a", "ok", "b)", "x(?=y)"],
                                                "match": "regex"}]})
    (err,) = info.value.errors()
    assert ["'(a'" in err["msg"], "'b)'" in err["msg"], "'x(?=y)'" in err["msg"]] == [True] * 3
    assert "'ok'" not in err["msg"]


def test_many_rules_same_results_as_naive(make_context: MakeCtx) -> None:
    words = [f"kw{i}" for i in range(2000)]
    specs = [{"name": f"r{i}", "keywords": words[i * 20:(i + 1) * 20]} for i in range(100)]
    r = rules(make_context, *specs)
    texts = [f"screen shows kw{i} and kw{(i * 7) % 2000} text" for i in range(0, 2000, 13)]
    out = alerts(r.process([vis(t, start=i) for i, t in enumerate(texts)]))
    got = sorted((a["data"]["text"], a["data"]["event_label"]) for a in out)
    naive = sorted({(t, s["name"]) for t in texts for s in specs if any(k in t.split() for k in s["keywords"])})
    assert got == naive
