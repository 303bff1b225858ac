"""The filter and enrich stages' C loops give exactly what their Python code gives.

`stages/processors/_fastloops.c` handles plain events (exact dicts, exact str
channel and rtstream id) and hands every other event to the stage's Python
code. Here both paths run on the same random batches, hostile ones included
(str and dict subclasses, odd stream records, lifecycle events, JSON texts,
callbacks that shrink the batch), and must agree on every event, in key order,
and on the saved state.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.api import Context, StateStore
from pipeline.deadletter import DeadLetter
from pipeline.session import SessionLink
from pipeline.stats import StageStats
from stages.processors import enrich as enrich_mod
from stages.processors import filter as filter_mod
from stages.processors.enrich import Enrich, EnrichOptions
from stages.processors.filter import Filter, FilterOptions


class Str(str):
    """A str subclass: the C loops must hand it to Python."""


class Sub(dict):  # type: ignore[type-arg]
    """A plain dict subclass: Python code reads it."""


class Dict(dict):  # type: ignore[type-arg]
    """A dict subclass whose get() sees every key as absent."""

    def get(self, key: Any, default: Any = None) -> Any:
        return default


def test_the_c_loops_are_built() -> None:
    assert filter_mod._fastloops is not None and enrich_mod._fastloops is not None, \
        "the C loops are not built (make test builds them with the package)"


channel = st.sampled_from(["transcript", "visual_index", "scene_index", "audio_index", "alert", "x", 7, None,
                           Str("transcript"), Str("scene_index")])
text = st.one_of(st.sampled_from(['{"app": "Slack"}', '{"a": [1, {"b": 2}]}', "{not json", "{", "plain", "",
                                  Str('{"s": 1}'), 5, None]), st.text(max_size=5))
data = st.one_of(st.none(), st.just("str"),
                 st.fixed_dictionaries({}, optional={"is_final": st.sampled_from([True, False, None, 0]),
                                                     "text": text}),
                 st.fixed_dictionaries({"is_final": st.just(False), "text": text}).map(Dict),
                 st.fixed_dictionaries({"is_final": st.just(False), "text": text}).map(Sub))
event = st.fixed_dictionaries({}, optional={
    "channel": channel, "event": st.sampled_from(["capture_session.active", "capture_session.exported", "x"]),
    "rtstream_id": st.sampled_from(["rts-1", "rts-2", "rts-9", "", 3, None, Str("rts-1")]),
    "rtstream_name": st.sampled_from(["display:1", "mine"]),
    "capture_session_id": st.sampled_from(["cap-1", "cap-2"]),
    "data": data, "unix_ts": st.sampled_from([1.7e9, 1.7e9 + 700, 1.7e9 + 1400]),
})
lifecycle = st.fixed_dictionaries({
    "channel": st.just("capture_session"), "event": st.just("capture_session.active"),
    "capture_session_id": st.sampled_from(["cap-1", "cap-2", None]), "unix_ts": st.sampled_from([1.7e9, 1.7e9 + 1e3]),
    "data": st.fixed_dictionaries({"rtstreams": st.lists(st.fixed_dictionaries({
        "rtstream_id": st.sampled_from(["rts-1", "rts-2", Str("rts-3")]),
        "name": st.sampled_from(["display:1", "mic:default", None]),
        "media_types": st.sampled_from([["video"], None])}), max_size=3)})})
batches = st.lists(st.lists(st.one_of(event, event, lifecycle).map(lambda e: Dict(e) if "mine" in str(e) else e),
                            max_size=10), max_size=4)
# stream records as saved state may hold them: plain, stale, and odd ones the C loop must hand to Python
records = st.dictionaries(st.sampled_from(["rts-1", "rts-2", "rts-9"]), st.one_of(
    st.tuples(st.sampled_from(["cap-0", None]), st.sampled_from(["name-0", None]), st.sampled_from([["audio"], None]),
              st.sampled_from([1_699_000_000_000, 1_700_000_000_000])).map(list),
    st.sampled_from([[], ["a", "b", "c", "late"], ["a", "b", "c", 1, 2], ("a", "b", "c", 1)])), max_size=3)


def _filtered(native: bool, options: dict[str, Any], batches: list[list[Any]], context: Any) -> str:
    saved, Filter.native = Filter.native, native
    try:
        f = Filter(FilterOptions(**options), context)
        return repr([f.process(copy.deepcopy(b)) for b in batches])
    finally:
        Filter.native = saved


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches, st.sampled_from([None, ["transcript", "capture_session"], ["scene_index", "alert"],
                                 ["capture_session.active", "x"]]), st.booleans())
def test_filter_c_loop_equals_keep(make_context, batches, channels, final_only) -> None:  # type: ignore[no-untyped-def]
    options = {"channels": channels, "final_only": final_only}
    f = Filter(FilterOptions(**options), make_context())
    for b in batches:
        assert f.process(b) == [e for e in b if f.keep(e)]
    assert _filtered(True, options, batches, make_context()) == _filtered(False, options, batches, make_context())


def _enriched(native: bool, options: dict[str, Any], saved: dict[str, Any], batches: list[list[Any]],
              context: Any) -> tuple[str, str]:
    was, Enrich.native = Enrich.native, native
    try:
        context.state.get("enrich.rtstreams").update(copy.deepcopy(saved))
        e = Enrich(EnrichOptions(**options), context)
        out = [e.process(copy.deepcopy(b)) for b in batches]
        return repr(out), repr(e._streams)
    finally:
        Enrich.native = was


_EVERY_SHAPE = [[
    {"channel": "capture_session", "event": "capture_session.active", "capture_session_id": "cap-1",
     "unix_ts": 1.7e9,
     "data": {"rtstreams": [{"rtstream_id": "rts-1", "name": "display:1", "media_types": ["video"]}]}},
    {"channel": "visual_index", "rtstream_id": "rts-1", "data": {"text": '{"app": "Slack"}'}},
    {"channel": "visual_index", "rtstream_id": "rts-2", "data": Sub({"text": '{"app": "Zoom"}'})},
    {"channel": "scene_index", "rtstream_id": Str("rts-1"), "data": {"text": Str('{"s": 1}')}},
    Sub({"channel": "audio_index", "rtstream_id": "rts-9", "data": {"text": "{}"}, "unix_ts": 1.7e9 + 1400}),
]]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches, records, st.booleans(), st.booleans(), st.booleans())
@example(_EVERY_SHAPE, {"rts-2": ["cap-0", "name-0", None, 1_699_000_000_000]}, True, True, True)
def test_enrich_c_loop_equals_python(make_context, batches, saved, session, rtstreams, parse_json) -> None:  # type: ignore[no-untyped-def]
    options = {"capture_session": session, "rtstreams": rtstreams, "parse_json": parse_json}
    assert _enriched(True, options, saved, batches, make_context()) == \
        _enriched(False, options, saved, batches, make_context())


def test_filter_survives_a_keep_that_empties_the_batch(make_context) -> None:  # type: ignore[no-untyped-def]
    f = Filter(FilterOptions(channels=["transcript"]), make_context())
    batch: list[Any] = [{"channel": Str("transcript")}, {"channel": "transcript"}, {"channel": "transcript"}]
    keep = f.keep

    def clearing(event: Any) -> bool:
        batch.clear()  # Python code the C loop calls may shrink the list it walks
        return keep(event)

    f.keep = clearing  # type: ignore[method-assign]
    assert f.process(batch) == [{"channel": "transcript"}]


def test_enrich_survives_a_hash_that_empties_the_batch(make_context) -> None:  # type: ignore[no-untyped-def]
    ctx = make_context()
    e = Enrich(EnrichOptions(), ctx)
    batch: list[Any] = []

    class Evil(str):
        def __hash__(self) -> int:
            batch.clear()
            return str.__hash__(self)

    batch += [{"channel": "transcript", "rtstream_id": Evil("rts-1"), "data": {"text": "x"}},
              {"channel": "transcript", "rtstream_id": "rts-1", "data": {"text": '{"a": 1}'}}]
    e.process(batch)
    assert batch == []


def test_saved_state_takes_the_c_loop_and_records_its_writes(make_context, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With a state_dir (every live run), state maps are change-tracking dicts: the C loop must still be taken,
    and a refresh it writes must be recorded for the next flush."""
    from pipeline.state.store import open_store

    calls: list[int] = []
    real = enrich_mod._fastloops

    class Spy:
        filter = real.filter

        @staticmethod
        def enrich(batch: list[Any], *args: Any) -> None:
            calls.append(len(batch))
            real.enrich(batch, *args)

    monkeypatch.setattr(enrich_mod, "_fastloops", Spy)
    store = open_store(tmp_path / "state")
    streams = store.get("enrich.rtstreams")
    streams["rts-1"] = ["cap-1", "display:1", ["video"], 1_000]  # seen long ago: the next event refreshes it
    streams.changed.clear()  # type: ignore[attr-defined]
    e = Enrich(EnrichOptions(), make_context(state=store))
    batch = [{"channel": "visual_index", "rtstream_id": "rts-1", "data": {"text": "x", "start": 1_700_000_000_000}}]
    e.process(batch)
    assert calls == [1]
    assert batch[0]["capture_session_id"] == "cap-1" and streams["rts-1"][3] == 1_700_000_000_000
    assert streams.changed == {"rts-1"}  # type: ignore[attr-defined]


def test_a_dict_with_its_own_reads_keeps_the_python_path(make_context, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from stages.processors.native import plain_reads

    class Reads(dict):  # type: ignore[type-arg]
        def get(self, key: Any, default: Any = None) -> Any:
            return ["cap-x", None, None, 10**15]

    assert plain_reads({}) and not plain_reads(Reads()) and not plain_reads([])
    ctx = make_context()
    ctx.state._maps["enrich.rtstreams"] = Reads()
    e = Enrich(EnrichOptions(), ctx)
    batch = [{"channel": "transcript", "rtstream_id": "rts-1", "data": {"text": "x"}}]
    e.process(batch)
    assert batch[0]["capture_session_id"] == "cap-x"  # its get() was asked, as the Python path asks it


# ---- Python code inside a dict lookup: scenarios run in a fresh interpreter with Python's debug memory hooks
# (-X dev), where a read of freed memory crashes or shows garbage (in this process it can pass unnoticed).

ROOT = Path(__file__).resolve().parent.parent


class Collider(str):
    """A key that hashes like `like`; once armed, its first __eq__ runs `act`: Python code inside a dict lookup,
    free to drop the very object the lookup runs in, or is for."""

    like_hash: int
    act: Callable[[], object] | None

    def __new__(cls, like: str) -> Collider:
        key = super().__new__(cls, f"collides-with-{like}")
        key.like_hash, key.act = hash(like), None
        return key

    def __hash__(self) -> int:
        return self.like_hash

    def __eq__(self, other: object) -> bool:
        act, self.act = self.act, None
        if act is not None:
            act()
        return False


def scenario_context(tmp: Path) -> Context:
    return Context(pipeline="test", stage="test", dead_letter=DeadLetter(tmp / "dead-letter.jsonl"),
                   session=SessionLink(), stats=StageStats("test", "test"), state=StateStore(), out_dir=tmp,
                   state_dir=tmp)


def in_child(module: str, scenario: str) -> tuple[str, str]:
    """Run `scenario` of `module` in a child `python -X dev`: what the C path and the Python path give."""
    r = subprocess.run([sys.executable, "-X", "dev", "-m", module, scenario], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"the child died ({r.returncode}):\n{r.stderr[-3000:]}"
    native, python = r.stdout.splitlines()
    return native, python


def child_main(scenarios: dict[str, Callable[[bool, Path], str]]) -> None:
    """The child side of `in_child`: print the scenario's outcome on the C path, then on the Python path."""
    with tempfile.TemporaryDirectory() as tmp:
        for native in (True, False):
            print(scenarios[sys.argv[1]](native, Path(tmp)))


def _outcome(run: Callable[[], object]) -> str:
    try:
        return repr(run())
    except Exception as exc:
        return f"raised {type(exc).__name__}: {exc}"


def _filter_data_dropped_by_is_final_lookup(native: bool, tmp: Path) -> str:
    """final_only: a key of `data` that collides with "is_final" drops `data` from the event mid-lookup."""
    event: dict[str, Any] = {"channel": "transcript"}
    key = Collider("is_final")
    event["data"] = {key: 1, "is_final": False}
    key.act = lambda: event.pop("data")
    saved, Filter.native = Filter.native, native
    try:
        f = Filter(FilterOptions(channels=["transcript"], final_only=True), scenario_context(tmp))
        return _outcome(lambda: f.process([event]))
    finally:
        Filter.native = saved


def _enrich(native: bool, tmp: Path, streams: dict[Any, Any], batch: list[Any]) -> str:
    saved, Enrich.native = Enrich.native, native
    try:
        ctx = scenario_context(tmp)
        ctx.state.get("enrich.rtstreams").update(streams)
        e = Enrich(EnrichOptions(), ctx)
        return _outcome(lambda: e.process(batch)) + " " + repr(e._streams)
    finally:
        Enrich.native = saved


def _enrich_rtstream_id_dropped_by_stream_lookup(native: bool, tmp: Path) -> str:
    """A saved stream key that collides with the event's rtstream_id drops that id from the event mid-lookup;
    the stale record found is then written back under the id."""
    event: dict[str, Any] = {"channel": "transcript", "rtstream_id": "".join(["rts-", "1"]), "data": {"text": "x"},
                             "unix_ts": 1.7e9}
    key = Collider("rts-1")
    streams = {key: ["cap-0", None, None, 1], "rts-1": ["cap-1", "display:1", ["video"], 1]}
    key.act = lambda: event.pop("rtstream_id")
    return _enrich(native, tmp, streams, [event])


def _enrich_record_emptied_while_copied(native: bool, tmp: Path) -> str:
    """An event key that collides with a key enrich adds empties the stream record while it is read."""
    out = []
    for added in ("capture_session_id", "rtstream_name", "media_types"):
        event: dict[Any, Any] = {"channel": "transcript", "rtstream_id": "rts-1", "data": {"text": "x"},
                                 "unix_ts": 1.7e9}
        key = Collider(added)
        event[key] = 1
        record = ["cap-1", "display:1", ["video"], 1_700_000_000_000]
        key.act = record.clear
        out.append(_enrich(native, tmp, {"rts-1": record}, [event]))
    return repr(out)


def _enrich_data_dropped_by_text_lookup(native: bool, tmp: Path) -> str:
    """parse_json: a key of `data` that collides with "text" drops `data` from the event mid-lookup."""
    event: dict[str, Any] = {"channel": "visual_index"}
    key = Collider("text")
    event["data"] = {key: 1, "text": '{"a": 1}'}
    key.act = lambda: event.pop("data")
    return _enrich(native, tmp, {}, [event])


SCENARIOS: dict[str, Callable[[bool, Path], str]] = {
    "filter-data-dropped-by-is_final-lookup": _filter_data_dropped_by_is_final_lookup,
    "enrich-rtstream_id-dropped-by-stream-lookup": _enrich_rtstream_id_dropped_by_stream_lookup,
    "enrich-record-emptied-while-copied": _enrich_record_emptied_while_copied,
    "enrich-data-dropped-by-text-lookup": _enrich_data_dropped_by_text_lookup,
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_python_code_in_a_lookup_cannot_free_what_the_c_loop_reads(scenario: str) -> None:
    """A key's __eq__ runs Python code inside a dict lookup: the C loops used to read objects it had dropped
    (a crash, or garbage read as an event); both paths now give the same."""
    native, python = in_child("tests.test_fastloops", scenario)
    assert native == python


if __name__ == "__main__":  # python -X dev -m tests.test_fastloops SCENARIO (see in_child)
    child_main(SCENARIOS)
