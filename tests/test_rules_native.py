"""The rules stage's C engine gives exactly what its Python path gives.

The C engine (`stages/processors/_fastrules.c`) runs whole-word rules without a
window; everything else stays on the Python path, which the property test in
`test_rules_reference.py` holds to a plain definition. Here both paths run on
the same random streams, hostile ones included (non-ASCII case folds, NFC and NFD texts and keywords, odd
types where a string or an int is expected, times beyond 64 bits), and must
agree on every output event, the counters and the saved state.
"""

from __future__ import annotations

import copy
import unicodedata
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.api import StateStore
from pipeline.state.store import TrackedDict, open_store
from stages.processors import eviction
from stages.processors import rules as rules_mod
from stages.processors.rules import Rules, RulesOptions
from tests.test_fastloops import Collider, child_main, in_child, scenario_context

VOCAB = ["code", "terminal", "pass word", "password", "İstanbul", "straße", "ΟΔΟΣ", "kelvin", "_id", "x2",
         "٣٤", "deploy now", "a b c", "café", "cafe\u0301", "cafe", "Å ring", "crème brûlée"]
TEXT_CHANNELS = ["transcript", "visual_index", "audio_index"]
PIECES = [*VOCAB, "İ", "\u03c2", "\u03c3", "\u03a3", "\u212a", "\u0307", "ß", "SS", "Code.", "passwords", "!",
          "__", "é", "e\u0301", "😀", "pass\tword", "PASS  WORD", "x_2", "٣", "\x00", "\ud800", "CAFE\u0301",
          "\u212b", "A\u030a", "\u0301", "\u0327", "\u1100\u1161"]


def _engine_available() -> None:
    assert rules_mod._fastrules is not None, "the C engine is not built (make test builds it with the package)"


def test_the_c_engine_is_built_and_taken_for_word_rules(make_context) -> None:  # type: ignore[no-untyped-def]
    _engine_available()
    opts = RulesOptions.model_validate({"rules": [{"name": "a", "keywords": ["code", "pass word"], "cooldown": 5}]})
    assert Rules(opts, make_context())._engine is not None


@pytest.mark.parametrize("extra", [{"match": "substring"}, {"match": "regex", "keywords": ["co+de"]},
                                   {"window": 10, "min_count": 2}])
def test_other_rule_shapes_keep_the_python_path(make_context, extra: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    spec = [{"name": "a", "keywords": ["code"]}, {"name": "b", "keywords": ["code"], **extra}]
    assert Rules(RulesOptions.model_validate({"rules": spec}), make_context())._engine is None




def _in_form(text: str, form: str | None) -> str:
    """`text` in a Unicode normalization form ("é" as "e" + U+0301 in NFD), or as it is."""
    return text if form is None else unicodedata.normalize(form, text)  # type: ignore[arg-type]


FORMS = st.sampled_from([None, None, "NFC", "NFD"])
keyword = st.builds(_in_form, st.sampled_from(VOCAB), FORMS)
rule = st.fixed_dictionaries(
    {"keywords": st.lists(keyword, min_size=1, max_size=3, unique=True)},
    optional={"channels": st.lists(st.sampled_from([*TEXT_CHANNELS, "scene_index"]), min_size=1, max_size=2),
              "rtstream_names": st.sampled_from([["display:*"], ["mic:?efault", "x"]]),
              "cooldown": st.sampled_from([0, 0.001, 2, 5, 30]),
              "severity": st.sampled_from(["info", "critical"])})
WALL_CLOCK = 1_700_000_015.5  # seconds: within the event times below, so some are ahead of it
TIMES = st.sampled_from([0, 1, 2, 5, 30, 31]).map(lambda s: 1_700_000_000_000 + s * 1000)
# Mostly events that can fire (so two paths have something to disagree on), some hostile ones.
start = st.one_of(TIMES, TIMES, TIMES, st.sampled_from([1.5, True, None, "12", 2**70, -(2**70), 2**63,
                                                        float("nan"), -5]))
words = st.lists(st.sampled_from(VOCAB + PIECES[:8]), min_size=1, max_size=6).map(" ".join)
text = st.one_of(*[words] * 3, st.builds(_in_form, words, st.sampled_from(["NFC", "NFD"])),
                 st.builds(_in_form, st.lists(st.sampled_from(PIECES), max_size=6).map(" ".join), FORMS),
                 st.lists(st.sampled_from(PIECES), max_size=4).map("".join),
                 st.text(max_size=30), st.sampled_from([None, 5, ["code"], ""]))
good_data = st.fixed_dictionaries({"text": text, "start": start})
data = st.one_of(good_data, good_data, good_data, st.fixed_dictionaries({"text": text}, optional={"timestamp": start}),
                 st.sampled_from([None, "code", ["code"]]))
event = st.fixed_dictionaries(
    {"channel": st.sampled_from([*TEXT_CHANNELS * 3, "scene_index", "alert", None, 7, "Transcript"]), "data": data},
    optional={"rtstream_id": st.sampled_from(["rts-1", "rts-2", "rts-1", "rts-2", "", None, 3]),
              "rtstream_name": st.sampled_from(["display:1", "mic:default", "", None, 0, "display:İ"]),
              "capture_session_id": st.sampled_from(["cap-1", "cap-2", None]),
              "ts": st.just("2026-01-01T00:00:00.000Z"), "unix_ts": st.sampled_from([1.5, 1_700_000_000.25]),
              "event": st.just("x")})


def _run(native: bool, spec: list[dict[str, Any]], events: list[dict[str, Any]], batch_size: int,
         context: Any) -> tuple[Any, ...]:
    saved = Rules.native
    Rules.native = native
    # one wall clock for both paths: an event time ahead of it moves the watermark only up to it
    with mock.patch.object(eviction, "time", SimpleNamespace(time=lambda: WALL_CLOCK)):
        try:
            stage = Rules(RulesOptions.model_validate({"rules": spec}), context)
        finally:
            Rules.native = saved
        assert (stage._engine is not None) == native
        out: list[Any] = []
        mine = copy.deepcopy(events)
        for i in range(0, len(mine), batch_size):
            out.extend(stage.process(mine[i:i + batch_size]))
    # repr: NaN times compare unequal to themselves, their text does not
    return (repr(out), stage.fired, dict(stage.fired_by), repr(list(stage.recent)), repr(stage._last_fired),
            repr(stage._evict.watermark), sorted(getattr(stage._last_fired, "changed", ())))


class _TrackedState(StateStore):
    """The saved state's maps (change-tracking dicts) without a file."""

    def get(self, name: str) -> Any:
        return self._maps.setdefault(name, TrackedDict())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(rule, min_size=1, max_size=4), st.lists(event, max_size=30), st.integers(1, 7), st.booleans())
def test_c_engine_equals_python_path(make_context, rules, events, batch_size, saved) -> None:  # type: ignore[no-untyped-def]
    _engine_available()
    spec = [{**r, "name": f"r{i}"} for i, r in enumerate(rules)]
    state = _TrackedState if saved else StateStore
    python = _run(False, spec, events, batch_size, make_context(state=state()))
    native = _run(True, spec, events, batch_size, make_context(state=state()))
    assert native == python


def test_the_watermark_never_moves_back_within_a_batch(make_context) -> None:  # type: ignore[no-untyped-def]
    """Times going back inside one batch (streams are not ordered with each other) leave the newest time
    as the watermark, on both paths: the C engine compares the time it saved, not the one it started with."""
    _engine_available()
    spec = [{"name": "a", "keywords": ["code"], "cooldown": 1}]
    events = [{"channel": "transcript", "rtstream_id": f"rts-{i}", "data": {"text": "code", "start": t}}
              for i, t in enumerate((1_000, 30_000, 5_000, 20_000))]
    python = _run(False, spec, events, 4, make_context())
    native = _run(True, spec, events, 4, make_context())
    assert native == python
    assert native[-2] == "30000"


def test_c_engine_writes_through_the_saved_state(tmp_path: Path) -> None:
    """Cooldowns set by the C engine go through the state store (so they survive a restart)."""
    _engine_available()
    from pipeline.api import Context
    from pipeline.deadletter import DeadLetter
    from pipeline.session import SessionLink
    from pipeline.stats import StageStats

    def context(store: Any) -> Context:
        return Context(pipeline="t", stage="rules", dead_letter=DeadLetter(tmp_path / "dead.jsonl"),
                       session=SessionLink(), stats=StageStats("rules", "processor"), state=store)

    opts = RulesOptions.model_validate({"rules": [{"name": "a", "keywords": ["code"], "cooldown": 60}]})
    ev = {"channel": "transcript", "rtstream_id": "rts-1", "data": {"text": "Code!", "start": 1_000}}
    store = open_store(tmp_path / "state")
    stage = Rules(opts, context(store))
    assert stage._engine is not None
    assert len(stage.process([dict(ev)])) == 2
    store.flush()
    store.close()
    again = open_store(tmp_path / "state")
    stage = Rules(opts, context(again))
    assert stage.process([{**ev, "data": {"text": "code", "start": 30_000}}]) != []
    assert stage.fired == 0  # still cooling down: the state came back from disk
    again.close()


@pytest.mark.parametrize("native", [False, True])
def test_a_lone_surrogate_in_text_does_not_stop_the_stage(make_context, native: bool) -> None:  # type: ignore[no-untyped-def]
    """A plugin can put a lone surrogate in a text; the keyword beside it still fires (the automaton used to
    raise UnicodeEncodeError and end the run)."""
    saved = Rules.native
    Rules.native = native
    try:
        stage = Rules(RulesOptions.model_validate({"rules": [{"name": "a", "keywords": ["code"]}]}), make_context())
    finally:
        Rules.native = saved
    out = stage.process([{"channel": "transcript", "data": {"text": "\ud800code \ud800 code", "start": 1}}])
    assert [e["data"]["matched"] for e in out if e.get("origin") == "rules"] == [["code"]]


def _stage(make_context: Any, native: bool, spec: list[dict[str, Any]]) -> Rules:
    saved = Rules.native
    Rules.native = native
    try:
        return Rules(RulesOptions.model_validate({"rules": spec}), make_context())
    finally:
        Rules.native = saved


@pytest.mark.parametrize("native", [False, True])
def test_a_none_saved_cooldown_time_counts_as_no_time(make_context, native: bool) -> None:  # type: ignore[no-untyped-def]
    """A saved state entry holding None (no time) does not stop the rule: the Python path's get() treats it as
    absent, and the C engine used to raise TypeError comparing None with the event time."""
    stage = _stage(make_context, native, [{"name": "a", "keywords": ["code"], "cooldown": 5}])
    assert native is (stage._engine is not None)
    stage._last_fired["a|rts-1"] = None
    out = stage.process([{"channel": "transcript", "rtstream_id": "rts-1", "data": {"text": "code", "start": 1}}])
    assert [e["data"]["event_label"] for e in out if e.get("origin") == "rules"] == ["a"]


class _ListLower(str):
    def lower(self) -> Any:  # type: ignore[override]
        return list(self)


@pytest.mark.parametrize("native", [False, True])
def test_a_text_whose_lower_is_not_a_str_raises_on_both_paths(make_context, native: bool) -> None:  # type: ignore[no-untyped-def]
    """A str subclass whose lower() gives a list of the same length: the C engine used to read the list's memory
    as text (and fire nothing) where the Python path raises TypeError."""
    stage = _stage(make_context, native, [{"name": "a", "keywords": ["code"]}])
    with pytest.raises(TypeError):
        stage.process([{"channel": "transcript", "data": {"text": _ListLower("é code"), "start": 1}}])


class _ShoutLower(str):
    def lower(self) -> str:
        return "code" if str(self) == "XYZW" else str.lower(self)


class _FailingLower(str):
    def lower(self) -> str:
        raise RuntimeError("lower")


@pytest.mark.parametrize("native", [False, True])
def test_an_ascii_str_subclass_text_is_lowered_by_its_own_lower(make_context, native: bool) -> None:  # type: ignore[no-untyped-def]
    """Both paths call a str subclass's lower(), ASCII or not: the C engine used to lower ASCII text itself, so
    it fired where the Python path raised (and missed what the subclass's lower() gives)."""
    stage = _stage(make_context, native, [{"name": "a", "keywords": ["code"]}])
    out = stage.process([{"channel": "transcript", "data": {"text": _ShoutLower("XYZW"), "start": 1}}])
    assert [e["data"]["event_label"] for e in out if e.get("origin") == "rules"] == ["a"]
    with pytest.raises(RuntimeError, match="lower"):
        stage.process([{"channel": "transcript", "data": {"text": _FailingLower("code"), "start": 1}}])
    assert stage.fired == 1


@pytest.mark.parametrize("native", [False, True])
def test_a_batch_emptied_while_it_is_scanned_does_not_crash(make_context, native: bool) -> None:  # type: ignore[no-untyped-def]
    """Code the scan calls (here a str subclass's lower()) may empty the batch list: the C engine used to read
    the freed items (a segfault); both paths stop at the list's new end."""
    batch: list[dict[str, Any]] = []

    class Clearing(str):
        def lower(self) -> str:
            batch.clear()
            return str.lower(self)

    stage = _stage(make_context, native, [{"name": "a", "keywords": ["code"]}])
    batch[:] = [{"channel": "transcript", "data": {"text": Clearing("code"), "start": 1}},
                *({"channel": "transcript", "data": {"text": f"code {i}", "start": 1}} for i in range(200))]
    out = stage.process(batch)
    assert [e["data"]["event_label"] for e in out] == ["a"]


@pytest.mark.parametrize("native", [False, True])
def test_an_rtstream_name_that_drops_itself_is_still_read_alive(make_context, native: bool) -> None:  # type: ignore[no-untyped-def]
    """An rtstream_name whose truth test removes it from the event: the C engine used to call str() on the
    freed object (memory corruption); both paths read it while it is alive, then let it go."""
    log: list[str] = []
    event: dict[str, Any] = {"channel": "transcript", "rtstream_id": "r", "data": {"text": "code", "start": 1}}

    class Name:
        def __bool__(self) -> bool:
            del event["rtstream_name"]
            return True

        def __str__(self) -> str:
            log.append("str")
            return "display:1"

        def __del__(self) -> None:
            log.append("del")

    event["rtstream_name"] = Name()
    stage = _stage(make_context, native, [{"name": "a", "keywords": ["code"], "rtstream_names": ["display:*"]}])
    out = stage.process([event])
    assert log == ["str", "del"]
    assert [e["data"]["event_label"] for e in out if e.get("origin") == "rules"] == ["a"]


@pytest.mark.parametrize("native", [False, True])
def test_an_event_dropped_from_the_batch_by_its_channel_hash_is_still_read_alive(make_context, native: bool) -> None:  # type: ignore[no-untyped-def]
    """A channel (str subclass) whose hash empties the batch: the C engine used to read the freed event."""
    batch: list[dict[str, Any]] = []

    class Channel(str):
        def __hash__(self) -> int:
            batch.clear()
            return str.__hash__(self)

        def __eq__(self, other: object) -> bool:
            return str.__eq__(self, other)

    stage = _stage(make_context, native, [{"name": "a", "keywords": ["code"]}])
    batch.append({"channel": Channel("transcript"), "data": {"text": "code", "start": 1}})
    out = stage.process(batch)
    assert [e["data"]["event_label"] for e in out] == ["a"]



class _Blind(dict):  # type: ignore[type-arg]
    """A dict subclass whose get() sees every key as absent."""

    def get(self, key: Any, default: Any = None) -> Any:
        return default


class _NoStart(dict):  # type: ignore[type-arg]
    """A dict subclass whose get() sees no "start"."""

    def get(self, key: Any, default: Any = None) -> Any:
        return default if key == "start" else dict.get(self, key, default)


class _Ids(dict):  # type: ignore[type-arg]
    """A dict subclass whose `in` and [] see every key, as "X"."""

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: Any) -> Any:
        return "X" if key != "data" else dict.__getitem__(self, key)


class _Falsy(str):
    def __bool__(self) -> bool:
        return False


def _code(**extra: Any) -> dict[str, Any]:
    return {"channel": "transcript", "rtstream_id": "rts-1", "data": {"text": "code", "start": 1}, **extra}


ODD_EVENTS: dict[str, Callable[[], list[Any]]] = {
    "event-get": lambda: [_Blind(_code())],
    "data-get": lambda: [_code(data=_Blind({"text": "code", "start": 1}))],
    "data-get-start": lambda: [_code(data=_NoStart({"text": "code", "start": 1}), unix_ts=7.5)],
    "event-in-and-getitem": lambda: [_Ids(_code())],
    "not-a-dict": lambda: [None, _code()],
    "a-mapping-with-get": lambda: [MappingProxyType(_code(ts="t", unix_ts=7.5))],
    "falsy-text": lambda: [_code(data={"text": _Falsy("code"), "start": 1})],
}


@pytest.mark.parametrize("case", list(ODD_EVENTS))
def test_events_of_other_shapes_are_read_as_python_reads_them(make_context, case: str) -> None:  # type: ignore[no-untyped-def]
    """The Python path reads an event with get(), `in` and [] and a text by its truth: a dict subclass's own
    methods, an AttributeError for a non-dict. The C engine used to read the dict's storage underneath (firing
    where Python does not) and pass non-dicts silently."""
    outcomes = []
    for native in (True, False):
        stage = _stage(make_context, native, [{"name": "a", "keywords": ["code"]}])
        try:
            outcomes.append((repr(stage.process(ODD_EVENTS[case]())), stage.fired, repr(list(stage.recent))))
        except Exception as exc:
            outcomes.append((f"raised {type(exc).__name__}: {exc}", stage.fired, repr(list(stage.recent))))
    assert outcomes[0] == outcomes[1]


class _Retitled(str):
    """A channel whose str() is another channel."""

    def __str__(self) -> str:
        return "audio_index"


def _hooked_text(text: str, hook: Callable[[], object]) -> str:
    class Hooked(str):
        def lower(self) -> str:
            hook()
            return str.lower(self)

    return Hooked(text)


def _channel_changed_by_lower() -> list[Any]:
    event = _code()
    event["data"]["text"] = _hooked_text("code", lambda: event.update(channel="scene_index"))
    return [event]


def _channel_dropped_by_lower() -> list[Any]:
    event = _code()
    event["data"]["text"] = _hooked_text("code", lambda: event.pop("channel"))
    return [event]


def _batch_cleared_after_a_hit() -> list[Any]:
    batch = [_code(), _code(rtstream_id="rts-2"), _code(rtstream_id="rts-3")]
    batch[1]["data"]["text"] = _hooked_text("code", batch.clear)
    return batch


def _event_replaced_after_its_hit() -> list[Any]:
    batch = [_code(), _code(rtstream_id="rts-2")]
    batch[1]["data"]["text"] = _hooked_text("code", lambda: batch.__setitem__(0, {"replaced": True}))
    return batch


MUTATED: dict[str, Callable[[], list[Any]]] = {
    "channel-str": lambda: [_code(channel=_Retitled("transcript"))],
    "channel-changed-by-lower": _channel_changed_by_lower,
    "channel-dropped-by-lower": _channel_dropped_by_lower,
    "batch-cleared-after-a-hit": _batch_cleared_after_a_hit,
    "event-replaced-after-its-hit": _event_replaced_after_its_hit,
}


@pytest.mark.parametrize("case", list(MUTATED))
def test_what_python_code_changes_mid_batch_shows_as_on_the_python_path(make_context, case: str) -> None:  # type: ignore[no-untyped-def]
    """The Python path names an alert's source channel by str() of the channel read when the alert is made, and
    cuts the output from the batch as it is at the end. The C engine used the channel read first, and copied the
    batch while walking it: code run meanwhile (a text's lower()) made the two differ."""
    outcomes = []
    for native in (True, False):
        stage = _stage(make_context, native, [{"name": "a", "keywords": ["code"]}])
        outcomes.append((repr(stage.process(MUTATED[case]())), stage.fired))
    assert outcomes[0] == outcomes[1]

# ---- Python code inside a dict lookup: scenarios run in a child `python -X dev` (see test_fastloops.py)

def _rules(native: bool, tmp: Path, batch: list[Any]) -> str:
    saved, Rules.native = Rules.native, native
    try:
        stage = Rules(RulesOptions.model_validate({"rules": [{"name": "a", "keywords": ["code"]}]}),
                      scenario_context(tmp))
    finally:
        Rules.native = saved
    try:
        return repr((stage.process(batch), stage.fired))
    except Exception as exc:
        return f"raised {type(exc).__name__}: {exc}"


def _data_dropped_by_text_lookup(native: bool, tmp: Path) -> str:
    """A key of `data` that collides with "text" drops `data` from the event mid-lookup."""
    event: dict[str, Any] = {"channel": "transcript"}
    key = Collider("text")
    event["data"] = {key: 1, "text": "code"}
    key.act = lambda: event.pop("data")
    return _rules(native, tmp, [event])


def _channel_dropped_by_its_hash(native: bool, tmp: Path) -> str:
    """A channel (str subclass) whose hash replaces it in the event (by an equal plain str): its last reference
    goes while the channel map is searched for it."""
    event: dict[str, Any] = {"data": {"text": "code"}}

    class Channel(str):
        def __hash__(self) -> int:
            event["channel"] = "transcript"
            return str.__hash__(self)

        def __eq__(self, other: object) -> bool:
            return str.__eq__(self, other)

    event["channel"] = Channel("".join(["trans", "cript"]))
    return _rules(native, tmp, [event])


SCENARIOS: dict[str, Callable[[bool, Path], str]] = {
    "data-dropped-by-text-lookup": _data_dropped_by_text_lookup,
    "channel-dropped-by-its-hash": _channel_dropped_by_its_hash,
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_python_code_in_a_lookup_cannot_free_what_the_c_engine_reads(scenario: str) -> None:
    """Python code run inside a dict lookup (a key's __eq__, a channel's __hash__) drops what the C engine was
    reading: it used to read freed memory (a crash, or a corrupt alert); both paths now give the same."""
    native, python = in_child("tests.test_rules_native", scenario)
    assert native == python


if __name__ == "__main__":  # python -X dev -m tests.test_rules_native SCENARIO (see in_child)
    child_main(SCENARIOS)


def _chain_of(native: bool, spec: list[dict[str, Any]], context: Any, tmp_path: Path) -> tuple[Any, Rules]:
    from pipeline.build import Chain
    from pipeline.deadletter import DeadLetter

    saved, Rules.native = Rules.native, native
    try:
        stage = Rules(RulesOptions.model_validate({"rules": spec}), context)
    finally:
        Rules.native = saved
    return Chain([stage], DeadLetter(tmp_path / "dead.jsonl")), stage


@pytest.mark.parametrize("native", [True, False])
def test_a_bad_event_in_a_batch_does_not_cost_a_good_events_alert(make_context, tmp_path, native) -> None:  # type: ignore[no-untyped-def]
    """The batch raises on the bad event; the chain retries event by event. The good event's cooldown write
    from the failed pass must be undone, or its retry finds the rule cooling down and the alert is lost."""
    _engine_available()
    chain, stage = _chain_of(native, [{"name": "code", "keywords": ["code"], "cooldown": 30}], make_context(),
                             tmp_path)
    good = {"channel": "visual_index", "rtstream_id": "rts-1", "data": {"text": "code", "start": 1_000}}
    out = chain([good, None])
    assert [e["data"]["event_label"] for e in out if e.get("origin") == "rules"] == ["code"]
    assert (stage.fired, stage._counts, len(stage.recent)) == (1, [1], 1)
    assert stage._last_fired == {"code|rts-1": 1_000}
    assert len((tmp_path / "dead.jsonl").read_bytes().splitlines()) == 1  # the bad event, and only it


def test_a_bad_event_in_a_batch_does_not_count_a_good_event_twice_in_a_window(make_context, tmp_path) -> None:  # type: ignore[no-untyped-def]
    chain, stage = _chain_of(False, [{"name": "two", "keywords": ["code"], "window": 60, "min_count": 2}],
                             make_context(), tmp_path)
    good = {"channel": "visual_index", "rtstream_id": "rts-1", "data": {"text": "code", "start": 1_000}}
    assert chain([good, None]) == [good]  # one match of two: no alert (counted twice, it fired)
    assert stage._windows == {"two|rts-1": [1_000]}


@pytest.mark.parametrize("native", [True, False])
def test_saved_state_notes_each_cooldown_write_and_a_failed_batch_takes_its_writes_back(tmp_path, native) -> None:  # type: ignore[no-untyped-def]
    """With a saved state the C engine writes cooldowns without calling the tracking dict's __setitem__
    (a Python call per alert); it must note the same keys for saving, and a failed batch must leave the map
    and the notes as the Python path leaves them (a key new in the batch popped, an old one put back)."""
    _engine_available()
    from pipeline.api import Context
    from pipeline.deadletter import DeadLetter
    from pipeline.session import SessionLink
    from pipeline.stats import StageStats

    store = open_store(tmp_path / "state")
    ctx = Context(pipeline="t", stage="rules", dead_letter=DeadLetter(tmp_path / "dead.jsonl"),
                  session=SessionLink(), stats=StageStats("rules", "processor"), state=store)
    saved, Rules.native = Rules.native, native
    try:
        stage = Rules(RulesOptions.model_validate({"rules": [{"name": "a", "keywords": ["code"], "cooldown": 5}]}),
                      ctx)
    finally:
        Rules.native = saved
    assert (stage._engine is not None) == native
    last = stage._last_fired
    assert type(last) is TrackedDict

    def ev(rid: str, ms: int) -> dict[str, Any]:
        return {"channel": "transcript", "rtstream_id": rid, "data": {"text": "code", "start": ms}}

    assert len(stage.process([ev("rts-1", 1_000)])) == 2
    assert (dict(last), last.changed) == ({"a|rts-1": 1_000}, {"a|rts-1"})
    store.flush()
    assert last.changed == set()
    with pytest.raises(AttributeError):  # the None fails the batch after two cooldown writes
        stage.process([ev("rts-1", 9_000), ev("rts-2", 9_000), None])
    assert dict(last) == {"a|rts-1": 1_000}
    assert last.changed == {"a|rts-1", "a|rts-2"}  # as TrackedDict's own writes and pop() note them
    store.flush()
    store.close()
    again = open_store(tmp_path / "state")
    assert dict(again.get("rules.last_fired")) == {"a|rts-1": 1_000}
    again.close()
