"""After a crash: fetch what a capture session produced after the saved checkpoint when it ended while no run was
up. VideoDB sent those events to a dead connection and will not send them again; the restart makes a new session,
so no re-bind would ever fetch them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from contextlib import AbstractAsyncContextManager
from typing import Any, Final

from stages.controller.ai_pipelines import AIPipelines, OnActive, streams_from_session
from stages.sources import backfill
from stages.sources.inlet import Inlet

log = logging.getLogger("pipeline.controller.capture_session")

TRIES: Final = 3  # a fetch failing in a way worth another try (5xx, 429, network): its only chance


async def fetch_ended(conn: Any, on_active: OnActive, who: str, api_key: str | None, callback_url: str | None,
                      inlet: Inlet, session: Any, saved: dict[str, Any], retry_interval: float) -> None:
    """Queue on `inlet` the events `session` produced after `saved`'s checkpoint (all of them without one)."""
    sid = str(session.id)
    inlet.resume(saved.get("backfill_from"))
    pipes = AIPipelines(conn, on_active, f"{who} {sid}", api_key, callback_url)
    pipes.streams = streams_from_session(session)
    pipes.adopt_indexes(conn, saved.get("indexes"))
    got = await fetch_with_retries(pipes, inlet, f"{who} {sid}", api_key, sid, retry_interval)
    log.info("%s: capture session %s ended while no run was up; fetched what it produced after the last run's "
             "checkpoint: %s", who, sid, ", ".join(f"{ch} {n}" for ch, n in sorted(got.items())) or "nothing missing")


async def fetch_with_retries(pipes: AIPipelines, inlet: Inlet, who: str, api_key: str | None, sid: str,
                             retry_interval: float, gate: AbstractAsyncContextManager[Any] | None = None
                             ) -> Counter[str]:
    """Backfill an ended session's streams (each fetch inside `gate`, when given); a fetch failing in a way
    worth another try (5xx, 429, network) is tried again after `retry_interval`, TRIES times in all: it is the
    only chance, as no re-bind or reconnect comes for a session that ended. Events fetched, per channel."""
    got: Counter[str] = Counter()
    for attempt in range(1, TRIES + 1):
        async with gate or contextlib.nullcontext():
            fetched = await backfill.run(pipes.backfill_targets(), inlet, who, api_key, sid)
        got += fetched.got
        if not fetched.soon or attempt == TRIES:
            break
        pipes.asked_to_wait(fetched.wait)
        await asyncio.sleep(pipes.retry_delay(retry_interval))
    return got
