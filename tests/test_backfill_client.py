"""The backfill client against REST answers shaped unlike the emulator's, and against a failing API.

Where the SDK does not fix a response shape, the client must stay tolerant; a fetch
that fails must keep its gap mark so the next re-bind tries again from the same point.
Real parts: the real `videodb` SDK (`RTStream.get_transcript`,
`RTStreamSceneIndex.get_scenes`) against a real HTTP server on loopback.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import videodb
from aiohttp import web
from videodb.rtstream import RTStream, RTStreamSceneIndex

from stages.sources.backfill import MARGIN_MS, MAX_TEXT, PAGE_SIZE, Target, fetch, run
from stages.sources.inlet import Inlet

T0 = 1_710_000_000_000  # epoch ms
KEY = "k-test-0123456789"


@dataclass
class FakeVideoDB:
    """Answers `GET rtstream/{id}/transcription` and `.../index/scene/{iid}` with whatever `answer` returns."""

    answer: Callable[[str, dict[str, str]], Any]
    status: list[int] = field(default_factory=list)  # statuses to answer first (then 200)
    queries: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    url: str = ""

    async def _handle(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        self.queries.append((request.path, query))
        if self.status:
            return web.json_response({"success": False, "message": "boom"}, status=self.status.pop(0))
        return web.json_response({"success": True, "data": self.answer(request.path, query)})

    @property
    def pages(self) -> list[int]:
        return [int(q["page"]) for _, q in self.queries]


@pytest.fixture
async def api() -> AsyncIterator[Callable[[Callable[[str, dict[str, str]], Any]], FakeVideoDB]]:
    runners: list[web.AppRunner] = []

    async def start(answer: Callable[[str, dict[str, str]], Any]) -> FakeVideoDB:
        fake = FakeVideoDB(answer)
        app = web.Application()
        app.router.add_get("/{tail:.*}", fake._handle)
        runner = web.AppRunner(app, shutdown_timeout=0.1, access_log=None)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return fake

    yield start  # type: ignore[misc]
    for r in runners:
        await r.cleanup()


def transcript(fake: FakeVideoDB, rid: str = "rts-mic") -> Target:
    conn = videodb.connect(api_key=KEY, base_url=fake.url)
    return Target(rid, "mic:default", "transcript", RTStream(conn, id=rid))


def scenes(fake: FakeVideoDB, channel: str = "visual_index") -> Target:
    conn = videodb.connect(api_key=KEY, base_url=fake.url)
    return Target("rts-screen", "display:1", channel, RTStreamSceneIndex(conn, "idx-1", "rts-screen"))


async def test_a_bare_list_in_epoch_seconds_is_paged_by_length_and_read_as_ms(api: Any) -> None:
    """No `next_page`: a full page means ask for the next one. Times in seconds become ms."""
    records = [{"start": T0 / 1000 + i + 0.25, "end": T0 / 1000 + i + 1, "text": f"t{i}"}
               for i in range(PAGE_SIZE + 50)]

    def answer(path: str, q: dict[str, str]) -> Any:
        first = (int(q["page"]) - 1) * int(q["page_size"])
        return records[first:first + int(q["page_size"])]

    fake = await api(answer)
    got = await asyncio.to_thread(fetch, transcript(fake), None)
    assert fake.pages == [1, 2] and "start" not in fake.queries[0][1]
    assert [e["data"]["text"] for e in got] == [f"t{i}" for i in range(PAGE_SIZE + 50)]
    assert got[3] == {"channel": "transcript", "rtstream_id": "rts-mic", "rtstream_name": "mic:default",
                      "data": {"text": "t3", "start": T0 + 3250, "end": T0 + 4000, "is_final": True},
                      "backfill": True}


async def test_nested_lists_other_text_keys_and_junk_records(api: Any, caplog: pytest.LogCaptureFixture) -> None:
    """`{"data": {"segments": [...]}}`, text under `transcript`; records we cannot place are skipped."""
    good = [{"start": T0 + 1000, "transcript": "under transcript", "is_final": False},
            {"start": T0 + 2000, "end": T0 + 2500, "text": "plain"}]
    junk = ["not a record", {"text": "no start"}, {"start": T0, "text": 7}, {"start": True, "text": "bool"},
            {"start": "1710000000000", "text": "string time"}, {"start": T0 + 3000, "text": "x" * (MAX_TEXT + 1)}]

    fake = await api(lambda path, q: {"data": {"segments": [junk[0], good[0], *junk[1:], good[1]]}})
    got = await asyncio.to_thread(fetch, transcript(fake), T0 + 20_000)
    assert fake.queries[0][1]["start"] == str(T0 + 20_000 - MARGIN_MS)  # re-read 30 s back, then dedupe
    assert [e["data"] for e in got] == [{"text": "under transcript", "start": T0 + 1000, "is_final": False},
                                        {"text": "plain", "start": T0 + 2000, "end": T0 + 2500, "is_final": True}]
    assert "skipped 1 records with text over" in caplog.text


async def test_scene_records_follow_next_page_and_a_server_that_ignores_the_filter(api: Any) -> None:
    """get_scenes sends start and end together; records before the requested start are dropped here."""
    since = T0 + 100_000

    def answer(path: str, q: dict[str, str]) -> Any:
        assert path == "/rtstream/rts-screen/index/scene/idx-1"
        page = int(q["page"])
        recs = [{"start": T0 + page * 60_000 + i, "description": f"p{page} r{i}"} for i in range(3)]
        return {"scene_index_records": recs, "next_page": page < 3}

    fake = await api(answer)
    got = await asyncio.to_thread(fetch, scenes(fake, "audio_index"), since)
    assert fake.pages == [1, 2, 3]
    q = fake.queries[0][1]
    assert int(q["start"]) == since - MARGIN_MS and int(q["end"]) > since
    assert [e["data"]["text"] for e in got] == [f"p{p} r{i}" for p in (2, 3) for i in range(3)]
    assert {e["channel"] for e in got} == {"audio_index"} and "is_final" not in got[0]["data"]


async def test_an_empty_scene_answer_is_nothing_missing(api: Any) -> None:
    fake = await api(lambda path, q: {})  # the SDK's get_scenes returns None for it
    assert await asyncio.to_thread(fetch, scenes(fake), None) == [] and fake.pages == [1]


async def test_a_failed_fetch_keeps_its_mark_and_the_next_rebind_resumes_from_it(
        api: Any, caplog: pytest.LogCaptureFixture) -> None:
    """HTTP 500 from the API: logged, nothing queued, the gap mark stays; the retry reads from the same point."""
    def live(start: int, text: str) -> dict[str, Any]:
        return {"channel": "transcript", "rtstream_id": "rts-mic", "data": {"start": start, "text": text}}

    fake = await api(lambda path, q: {"segments": [
        {"start": T0 + 5000, "text": "seen live"}, {"start": T0 + 6000, "text": "missed 1"},
        {"start": T0 + 7000, "text": "missed 2"}], "next_page": False})
    fake.status = [500]
    inlet = Inlet()
    inlet.admit([live(T0 + 5000, "seen live")])
    inlet.mark_gap()
    inlet.admit([live(T0 + 9000, "after the gap")])  # the new connection's first event moves `last` on
    target = transcript(fake)

    queued, ok, *_ = await run([target], inlet, "controller:capture_session", KEY)
    assert not ok and queued == {} and not inlet.queued
    assert "kept for the next re-bind" in caplog.text and "backfill mic:default transcript failed" in caplog.text
    assert inlet.since("rts-mic", "transcript") == T0 + 5000  # still the gap mark, not T0 + 9000

    queued, ok, *_ = await run([target], inlet, "controller:capture_session", KEY)
    assert ok and queued == {"transcript": 2}
    assert [q["start"] for _, q in fake.queries] == [str(T0 + 5000 - MARGIN_MS)] * 2  # the same point twice
    batch = inlet.take()
    assert batch is not None and [e["data"]["text"] for e in batch] == ["missed 1", "missed 2"]
    assert inlet.since("rts-mic", "transcript") == T0 + 9000  # the mark is covered


@pytest.mark.parametrize("make_target", [transcript, scenes])
async def test_a_server_whose_time_filters_read_epoch_seconds_still_gives_the_gap(api: Any, make_target: Any) -> None:
    """The REST filters' unit is undocumented. A server reading `start`/`end` as epoch seconds found nothing for
    the ms values the backfill sent, and the gap was lost; the query is now asked again in seconds."""
    since = T0 + 100_000
    records = [{"start": T0 + i * 10_000, "end": T0 + i * 10_000 + 5_000, "text": f"r{i}"} for i in range(20)]

    def answer(path: str, q: dict[str, str]) -> Any:
        lo, hi = float(q.get("start", 0)), float(q.get("end", "inf"))
        kept = [r for r in records if lo <= r["start"] / 1000 <= hi]
        return {"segments": kept, "scene_index_records": kept, "next_page": False}

    fake = await api(answer)
    got = await asyncio.to_thread(fetch, make_target(fake), since)
    # what it re-reads before the mark (the margin) is dropped later as duplicates of live events
    assert [e["data"]["text"] for e in got] == [f"r{i}" for i in range(7, 20)]
    first, second = fake.queries[0][1], fake.queries[1][1]
    assert int(first["start"]) == since - MARGIN_MS
    assert int(second["start"]) == (since - MARGIN_MS) // 1000 and int(second["end"]) < 1e11


async def test_a_millisecond_server_with_nothing_new_is_asked_once_more_and_reads_no_history(api: Any) -> None:
    """The retry in seconds carries an `end`, so a server reading ms answers it with nothing as well (instead of
    every record since 1970)."""
    since = T0 + 100_000
    records = [{"start": T0 + i * 1_000, "text": f"old{i}"} for i in range(50)]  # all before the mark

    def answer(path: str, q: dict[str, str]) -> Any:
        lo, hi = float(q.get("start", 0)), float(q.get("end", "inf"))
        return {"segments": [r for r in records if lo <= r["start"] <= hi], "next_page": False}

    fake = await api(answer)
    assert await asyncio.to_thread(fetch, transcript(fake), since + MARGIN_MS) == []
    assert len(fake.queries) == 2 and "end" not in fake.queries[0][1] and "end" in fake.queries[1][1]


@pytest.mark.parametrize("skew_h", [3, -3])
async def test_a_clock_hours_off_from_videodbs_still_gives_the_gap(api: Any, skew_h: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Our clock hours behind VideoDB's (a VM resumed from suspend, a clock set to local time): the scene
    query's `end` was our "now + 1 h", before every record of the gap, and the gap was lost. Record times
    are VideoDB's; the query must reach past the mark whatever our clock says."""
    import time as real_time

    now = int(real_time.time() * 1000)
    videodb_now = now + skew_h * 3_600_000
    since = videodb_now - 120_000
    records = [{"start": since + i * 10_000, "end": since + i * 10_000 + 5_000, "text": f"r{i}"} for i in range(10)]

    def answer(path: str, q: dict[str, str]) -> Any:
        lo, hi = float(q.get("start", 0)), float(q.get("end", "inf"))
        kept = [r for r in records if lo <= r["start"] <= hi]
        return {"scene_index_records": kept, "next_page": False}

    fake = await api(answer)
    got = await asyncio.to_thread(fetch, scenes(fake), since)
    assert [e["data"]["text"] for e in got] == [f"r{i}" for i in range(10)]


async def test_a_backfill_stops_at_its_page_and_text_bounds(api: Any, caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Guarantees, Backpressure: one backfill pulls at most MAX_PAGES pages and MAX_BYTES of text per rtstream
    and channel, then stops with a warning line, whatever the server keeps offering (bounds lowered here)."""
    from stages.sources import backfill

    monkeypatch.setattr(backfill, "MAX_PAGES", 3)

    def endless(path: str, q: dict[str, str]) -> Any:  # every page full, for ever
        first = (int(q["page"]) - 1) * PAGE_SIZE
        return [{"start": T0 + (first + i) * 1000, "text": f"t{first + i}"} for i in range(PAGE_SIZE)]

    fake = await api(endless)
    got = await asyncio.to_thread(fetch, transcript(fake), None)
    assert fake.pages == [1, 2, 3] and len(got) == 3 * PAGE_SIZE
    assert "backfill mic:default transcript: stopped after 3 pages" in caplog.text

    monkeypatch.setattr(backfill, "MAX_PAGES", 1000)
    monkeypatch.setattr(backfill, "MAX_BYTES", 250_000)

    def wordy(path: str, q: dict[str, str]) -> Any:  # 100 records of 1,000 characters a page
        first = (int(q["page"]) - 1) * PAGE_SIZE
        return [{"start": T0 + (first + i) * 1000, "text": "w" * 1000} for i in range(PAGE_SIZE)]

    fake = await api(wordy)
    got = await asyncio.to_thread(fetch, transcript(fake), None)
    assert fake.pages == [1, 2, 3] and len(got) == 3 * PAGE_SIZE  # the page that crossed 250,000 is the last
    assert "backfill mic:default transcript: stopped after 0 MiB of text" in caplog.text
