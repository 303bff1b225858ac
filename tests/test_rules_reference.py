"""The rules stage fires exactly the alerts a plain definition of rules fires.

The stage is tuned for hit-heavy streams (cooldowns checked before anything is
built, alerts copied from a prepared header). Here it is compared, on random
streams with out-of-order event times, repeated streams and missing ids, with
the obvious reading of the documented behaviour: for each event, each rule
whose channels and stream names match and one of whose keywords occurs (whole
words or substring, case-insensitive, both in NFC); windows count matches within the window
and restart after firing; a cooldown silences a rule on a stream from an alert
until `cooldown` later, in event time.
"""

from __future__ import annotations

import fnmatch
import re
import unicodedata
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.events import canonical, event_time_ms
from stages.processors.rules import Rules, RulesOptions

WORD = re.compile(r"\w+")
VOCAB = ["code", "terminal", "slack", "pass word", "password", "budget", "deploy", "error", "ΟΔΟΣ", "café",
         "crème brûlée"]
PIECES = ["x", "Code.", "passwords", "!", "\u03bf\u03b4\u03bf\u03c2", "İ", "İcode",  # "οδος": a final sigma
          "cafe", "CAFE\u0301", "\u0301"]
FORMS = st.sampled_from([None, "NFC", "NFD"])  # texts and keywords in either normalization form, or as they are
TEXT_CHANNELS = ["transcript", "visual_index", "audio_index"]
T0 = 1_700_000_000_000
SECONDS = [0, 1, 2, 3, 5, 7, 10, 25, 30, 31]  # few distinct times: cooldown and window edges are hit exactly


def low(text: str) -> str:
    """In NFC, then case folded one character per character, as documented: "İ" is "i", every sigma the small
    one."""
    text = unicodedata.normalize("NFC", text)
    return "".join(ch.lower()[0] for ch in text).replace("\u03c2", "\u03c3")


def in_form(text: str, form: str | None) -> str:
    return text if form is None else unicodedata.normalize(form, text)  # type: ignore[arg-type]


def occurs(keyword: str, text: str, mode: str) -> bool:
    if mode == "substring":
        return low(keyword) in low(text)
    words = WORD.findall(low(keyword))
    return (" " + " ".join(words) + " ") in (" " + " ".join(WORD.findall(low(text))) + " ")


def reference(spec: list[dict[str, Any]], events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    last: dict[tuple[str, str], int] = {}
    win: dict[tuple[str, str], list[int]] = {}
    out: list[dict[str, Any]] = []
    for e in events:
        out.append(e)
        ch = e.get("channel")
        data = e.get("data")
        text = data.get("text") if isinstance(data, dict) else None
        if not isinstance(ch, str) or not isinstance(text, str) or not text:
            continue
        when = event_time_ms(e)
        rid = e.get("rtstream_id")
        stream = rid if isinstance(rid, str) and rid else \
            f"{e.get('capture_session_id') or ''}/{rid or e.get('rtstream_name') or ''}"
        for r in spec:
            if canonical(ch) not in {canonical(c) for c in r.get("channels", TEXT_CHANNELS)}:
                continue
            matched = [k for k in r["keywords"] if occurs(k, text, r.get("match", "word"))]
            if not matched:
                continue
            globs = r.get("rtstream_names")
            if globs and not any(fnmatch.fnmatchcase(str(e.get("rtstream_name") or ""), g) for g in globs):
                continue
            key = (r["name"], stream)
            if r.get("window"):
                times = [t for t in win.get(key, []) if t > when - r["window"] * 1000] + [when]
                if len(times) < r["min_count"]:
                    win[key] = times[-r["min_count"]:]
                    continue
                win[key] = []
            cooldown = r.get("cooldown", 0) * 1000
            if cooldown:
                if key in last and last[key] <= when < last[key] + cooldown:
                    continue
                last[key] = when
            alert: dict[str, Any] = {"channel": "alert", "origin": "rules"}
            alert.update({k: e[k] for k in ("rtstream_id", "rtstream_name", "capture_session_id") if k in e})
            alert["data"] = {"event_label": r["name"], "timestamp": when, "text": text,
                             "severity": r.get("severity", "info"), "matched": sorted(matched),
                             "source_channel": canonical(ch)}
            alert.update({k: e[k] for k in ("ts", "unix_ts") if k in e})
            out.append(alert)
    return out


rule = st.fixed_dictionaries(
    {"keywords": st.lists(st.builds(in_form, st.sampled_from(VOCAB), FORMS), min_size=1, max_size=3, unique=True)},
    optional={"match": st.sampled_from(["word", "substring"]),
              "channels": st.lists(st.sampled_from([*TEXT_CHANNELS, "scene_index"]), min_size=1, max_size=2),
              "rtstream_names": st.just(["display:*"]),
              "cooldown": st.sampled_from([0, 2, 5, 30]),
              "severity": st.sampled_from(["info", "critical"])})
windowed = st.tuples(st.sampled_from([None, 5, 20]), st.integers(2, 3))
event = st.fixed_dictionaries(
    {"channel": st.sampled_from([*TEXT_CHANNELS, "scene_index", "alert"]),
     "data": st.fixed_dictionaries({"text": st.builds(in_form, st.lists(st.sampled_from([*VOCAB, *PIECES]),
                                                                        max_size=5).map(" ".join), FORMS),
                                    "start": st.sampled_from(SECONDS).map(lambda s: T0 + s * 1000)})},
    optional={"rtstream_id": st.sampled_from(["rts-1", "rts-2", ""]),
              "rtstream_name": st.sampled_from(["display:1", "mic:default"]),
              "capture_session_id": st.sampled_from(["cap-1", "cap-2"]),
              "ts": st.just("2026-01-01T00:00:00.000Z"), "unix_ts": st.just(1.5)})


def _seen_at(*seconds: int) -> list[dict[str, Any]]:
    return [{"channel": "visual_index", "rtstream_id": "rts-1", "data": {"text": "code", "start": T0 + s * 1000}}
            for s in seconds]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example([({"keywords": ["code"]}, (5, 2))], _seen_at(0, 5, 10, 11), 1).via("a window's far edge is outside it")
@example([({"keywords": ["code"], "cooldown": 5}, (None, 2))], _seen_at(0, 5, 9, 10), 2).via("cooldown edge")
@given(st.lists(st.tuples(rule, windowed), min_size=1, max_size=4), st.lists(event, max_size=40),
       st.integers(1, 8))
def test_rules_stage_equals_plain_definition(make_context, rules, events, batch_size) -> None:  # type: ignore[no-untyped-def]
    spec = []
    for i, (r, (window, min_count)) in enumerate(rules):
        r = {**r, "name": f"r{i}"}
        if window:
            r.update(window=window, min_count=min_count)
        spec.append(r)
    stage = Rules(RulesOptions.model_validate({"rules": spec}), make_context())
    got: list[dict[str, Any]] = []
    copies = [{**e, "data": dict(e["data"])} for e in events]
    for i in range(0, len(copies), batch_size):
        got.extend(stage.process(copies[i:i + batch_size]))
    for a in got:
        if a.get("origin") == "rules":
            a["data"]["matched"] = sorted(a["data"]["matched"])
    assert got == reference(spec, events)
    assert stage.fired == sum(1 for a in got if a.get("origin") == "rules")
