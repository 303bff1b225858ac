"""Talk time per stream, three ways: the `window` stage's `talk_seconds`, the README's DuckDB query over the
parquet sink's files, and `pipeline report`. They must agree on any transcript the pipeline can carry, also
ones VideoDB would not send (no `data.start`, a float one)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.api import Context
from pipeline.report.collect import Collector
from stages.processors.window import Window, WindowOptions
from stages.sinks.parquet import ParquetOptions, ParquetSink

MakeCtx = Callable[..., Context]
T0 = 1772446500000  # 2026-03-02, in the past: no time here is ahead of the clock
QUERY = """SELECT rtstream_id, sum("end" - start) FROM read_parquet('{dir}/transcript/*.parquet')
WHERE is_final IS NOT false AND "end" > start AND "end" - start <= 86400000 GROUP BY ALL"""

offsets = st.integers(0, 100_000)


@st.composite
def transcripts(draw: Any) -> dict[str, Any]:
    t = T0 + draw(offsets)
    data: dict[str, Any] = {"text": draw(st.sampled_from(["", "a b", "x"]))}
    shape = draw(st.sampled_from(["start", "float start", "timestamp", "none", "bool start"]))
    if shape == "start":
        data["start"] = t
    elif shape == "float start":
        data["start"] = t + draw(st.sampled_from([0.25, 0.5, 0.75]))
    elif shape == "timestamp":
        data["timestamp"] = t
    elif shape == "bool start":
        data["start"], data["timestamp"] = True, t
    end = draw(st.one_of(st.integers(-5_000, 10_000).map(lambda d: t + d), st.just(t + 86_400_001),
                         st.sampled_from([None, "5", 1.5, True])))
    if end is not None:
        data["end"] = end
    final = draw(st.sampled_from([True, False, None, "no"]))
    if final is not None:
        data["is_final"] = final
    return {"channel": "transcript", "capture_session_id": "cap-1", "rtstream_id": draw(st.sampled_from("ab")),
            "unix_ts": t / 1000, "data": data}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=st.lists(transcripts(), min_size=1, max_size=30))
def test_window_parquet_and_report_count_the_same_talk_time(make_context: MakeCtx, tmp_path_factory: Any,
                                                           stream: list[dict[str, Any]]) -> None:
    """Before, a transcript without an integer `data.start` (a float, or only `data.timestamp`) added no talk
    time in the window stage, but `end` minus its event time in the report and in the DuckDB query."""
    d: Path = tmp_path_factory.mktemp("talk")
    # the report counts a line repeated in a file once, and so a transcript repeated with the same stream, times,
    # text and finality (as a restart's backfill writes it again): each one here is its own (talk time only)
    stream = [{**e, "data": {**e["data"], "text": f"{e['data']['text']} {i}"}} for i, e in enumerate(stream)]
    w = Window(WindowOptions(size="1h", key=["rtstream_id"], allowed_lateness="1d"), make_context())
    metrics = [m for m in w.process([dict(e) for e in stream]) + w.flush() if m["channel"] == "metrics"]
    by_window: dict[str, int] = {}
    for m in metrics:
        by_window[m["key"]["rtstream_id"]] = by_window.get(m["key"]["rtstream_id"], 0) + round(
            m["data"]["talk_seconds"] * 1000)

    async def write() -> None:
        sink = ParquetSink(ParquetOptions(path=f"{d}/pq/{{channel}}"), make_context("sinks[0]:parquet"))
        await sink.start()
        await sink.write([dict(e) for e in stream])
        await sink.close()

    asyncio.run(write())
    by_duckdb = {r[0]: int(r[1]) for r in duckdb.connect().execute(QUERY.format(dir=f"{d}/pq")).fetchall()}
    (d / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in stream))
    sessions = Collector().read([d / "events.jsonl"]).sessions
    by_report = {ln.name: ln.talk_ms for s in sessions.values() for ln in s.lanes.values() if ln.talk_ms}
    by_window = {k: v for k, v in by_window.items() if v}
    assert by_window == by_duckdb == by_report
