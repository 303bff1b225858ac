"""`GET /v1/sessions` pages: bounded answers, a cursor that neither skips nor repeats while sessions come and go.

Real SDK against the emulator, real HTTP, real record files: the sessions a restart reads from
`<state_dir>/sessions/` fill the registry (finished ones: nothing is asked of VideoDB for them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from pipeline.api import Context
from pipeline.emulator import Emulator
from pipeline.events import iso_ts
from stages.controller import session_pages
from tests.test_session_api import TOKEN, Live, running
from tests.test_session_api import emulator as emulator  # the shared fixture


def saved(state_dir: Path, n: int, metadata: dict[str, Any] | None = None) -> list[str]:
    """`n` finished sessions' record files, oldest first (every 7th failed, the others exported); their ids."""
    d = state_dir / "sessions"
    d.mkdir(mode=0o700, exist_ok=True)
    start = time.time() - n
    ids = []
    for i in range(n):
        sid = f"cap-old-{i:05d}"
        (d / f"{sid}.json").write_bytes(orjson.dumps({
            "session_id": sid, "end_user_id": f"u{i}", "status": "failed" if i % 7 == 3 else "exported",
            "created_at": iso_ts(start + i), "metadata": metadata or {}, "stop_requested": False}))
        ids.append(sid)
    return ids


async def raw_get(live: Live, query: str) -> tuple[int, bytes]:
    async with live.http.get(f"{live.url}/v1/sessions{query}", headers={"Authorization": "Bearer " + TOKEN}) as r:
        return r.status, await r.read()


async def test_10000_sessions_are_listed_in_bounded_pages_without_skips_or_repeats_while_others_come_and_go(
        emulator: Emulator, make_context: Callable[..., Context], tmp_path: Path) -> None:
    """Before: one answer held every session (~7 MB at 10,000, ~70 ms of the event loop), no `limit`, no cursor.
    Now a page holds `limit` sessions (1000 by default), and a client following `next_after` sees each session
    once, in the order taken, while new sessions are made (they come last) and old ones evicted for them."""
    old = saved(tmp_path, 10_000)
    async with running(make_context, emulator, api={"max_sessions": 10_000}) as live:
        status, first = await raw_get(live, "")
        assert status == 200 and len(first) < 1_000_000, len(first)  # before: all 10,000, 2.1 MB even so small
        page = orjson.loads(first)
        assert (page["count"], page["total"]) == (1000, 10_000) and page["next_after"]
        assert [s["session_id"] for s in page["sessions"]] == old[:1000]
        seen = [s["session_id"] for s in page["sessions"]]
        cursor, made = page["next_after"], []
        while cursor:
            if len(made) < 2:  # each evicts the oldest finished session (already listed) to stay at max_sessions
                status, body = await live.call("POST", "/v1/sessions", json={"end_user_id": f"new{len(made)}"})
                assert status == 201, body
                made.append(body["session_id"])
            status, page = await live.call("GET", f"/v1/sessions?limit=3000&after={cursor}")
            assert status == 200 and page["count"] <= 3000 and page["total"] == 10_000, page.get("error")
            seen += [s["session_id"] for s in page["sessions"]]
            cursor = page["next_after"]
        assert seen == old + made
        assert old[0] not in live.ctl.manager.sessions  # evicted while the client paged


async def test_big_metadata_pages_are_bounded_in_bytes_and_the_status_filter_pages_too(
        emulator: Emulator, make_context: Callable[..., Context], tmp_path: Path) -> None:
    """A page ends near 1 MiB whatever `limit` says (sessions with 60 KiB of metadata each); `status=` still
    filters, `total` counts what matches on every page; a bad `limit` or cursor, or one from before a restart,
    is 400."""
    old = saved(tmp_path, 40, {"blob": "x" * 60_000})
    async with running(make_context, emulator) as live:
        status, body = await raw_get(live, "?limit=10000")
        page = orjson.loads(body)
        assert status == 200 and len(body) <= session_pages.MAX_PAGE_BYTES + 1000
        assert 0 < page["count"] < 40 and page["total"] == 40 and page["next_after"]
        failed, seen, cursor = old[3::7], [], ""
        while True:
            status, page = await live.call("GET", f"/v1/sessions?status=failed&limit=2&after={cursor}")
            assert status == 200 and page["total"] == len(failed) and page["count"] == len(page["sessions"]) <= 2
            seen += [s["session_id"] for s in page["sessions"]]
            if not page["next_after"]:
                break
            cursor = page["next_after"]
        assert seen == failed
        for query, words in (("?limit=0", "limit: expected a whole number from 1 to 10000"),
                             ("?limit=10001", "from 1 to 10000"), ("?limit=ten", "limit"),
                             ("?after=cap-old-00001", "not a cursor")):
            status, err = await live.call("GET", f"/v1/sessions{query}")
            assert status == 400 and words in err["error"], (query, err)
    async with running(make_context, emulator) as live:  # restarted: the numbers behind cursors start again
        status, err = await live.call("GET", f"/v1/sessions?status=failed&limit=2&after={cursor}")
        assert status == 400 and "from before the pipeline restarted" in err["error"], err
