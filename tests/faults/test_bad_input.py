"""Random events through every processor and the console sink: no stage may raise."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.api import Context
from pipeline.events import event_time_ms, stamp
from stages.processors.enrich import Enrich, EnrichOptions
from stages.processors.filter import Filter, FilterOptions
from stages.processors.rules import Rules, RulesOptions
from stages.sinks.console import ConsoleOptions, ConsoleSink

json_scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
json_value = st.recursive(json_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                             max_size=3), max_leaves=8)
keys = st.sampled_from(["channel", "event", "data", "rtstream_id", "rtstream_name", "capture_session_id",
                        "unix_ts", "ts", "status"])
data_keys = st.sampled_from(["text", "is_final", "start", "timestamp", "rtstreams", "event_label"])
channels = st.sampled_from(["transcript", "visual_index", "scene_index", "audio_index", "alert", "other"])
events = st.dictionaries(keys, json_value, max_size=6) | st.builds(
    lambda ch, d, extra: {"channel": ch, "data": d, **extra},
    channels,
    st.dictionaries(data_keys, json_value | st.text(max_size=40), max_size=4),
    st.dictionaries(keys, json_value, max_size=2))

MakeCtx = Callable[..., Context]


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(batch=st.lists(events, max_size=8))
async def test_processors_never_raise_on_random_events(make_context: MakeCtx, batch: list[dict[str, Any]]) -> None:
    stages = [
        Filter(FilterOptions(channels=["transcript", "visual_index", "capture_session", "alert"], final_only=True,
                             min_text_length=1, rtstream_names=["*"]), make_context()),
        Enrich(EnrichOptions(fields={"k": 1}), make_context()),
        Rules(RulesOptions.model_validate({"rules": [
            {"name": "w", "keywords": ["a", "b c"], "cooldown": "1s", "window": "1m", "min_count": 2},
            {"name": "s", "keywords": ["x"], "match": "substring"},
            {"name": "r", "keywords": ["[0-9]+"], "match": "regex"}]}), make_context()),
    ]
    for s in stages:
        batch = s.process(batch)
    out = io.StringIO()
    await ConsoleSink(ConsoleOptions(color=True), make_context(), stream=out).write(batch)
    for e in batch:
        assert isinstance(event_time_ms(e), int)
        stamp(e)


async def test_jsonl_channel_template_cannot_escape_its_directory(make_context: MakeCtx, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from stages.sinks.jsonl import JsonlOptions, JsonlSink

    sink = JsonlSink(JsonlOptions(path=f"{tmp_path}/by/{{channel}}-{{date}}.jsonl"), make_context())
    await sink.start()
    await sink.write([{"channel": "../../evil", "unix_ts": float("inf")}, {"channel": "transcript", "unix_ts": 0}])
    await sink.close()
    names = sorted(p.name for p in (tmp_path / "by").iterdir())
    assert names[0].startswith("transcript-1970-01-01") and names[1].startswith("unknown-")
    assert not list(tmp_path.glob("evil*")) and not (tmp_path.parent / "evil").exists()


async def test_jsonl_date_paths_keep_a_bounded_number_of_files_open(make_context: MakeCtx, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from stages.sinks import jsonl

    sink = jsonl.JsonlSink(jsonl.JsonlOptions(path=f"{tmp_path}/{{date}}.jsonl"), make_context())
    await sink.start()
    days = 100
    for d in range(days):
        await sink.write([{"channel": "x", "unix_ts": 86400.0 * d, "d": d}])
        assert len(sink._files) <= jsonl.MAX_OPEN_FILES
    await sink.write([{"channel": "x", "unix_ts": 0.0, "d": "again"}])  # an early day reopens and appends
    await sink.close()
    assert len(list(tmp_path.glob("*.jsonl"))) == days
    assert (tmp_path / "1970-01-01.jsonl").read_text().count("\n") == 2
