"""What a plugin hands the runtime, checked once per batch: a list of events (dicts).

Built-in stages are trusted (checking them would cost every event a type test); a plugin's batch that
is not a list, or an item in it that is not a dict, would otherwise end the run at the first sink that
reads it (`'int' object has no attribute 'get'`) with the whole batch neither written nor dead-lettered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pipeline.api import Batch, Source
from pipeline.deadletter import DeadLetter
from pipeline.stats import StageStats


def ours(stage: object) -> bool:
    """A built-in stage (its output is not checked)."""
    return type(stage).__module__.startswith(("stages.", "pipeline."))


def events_of(out: Any, what: str, stage: str, dead: DeadLetter, stats: StageStats) -> Batch:
    """`out` if it is a list of dicts; the dicts of a list (each other item dead-lettered and counted as an
    error); TypeError naming `what` for anything that is not a list."""
    if not isinstance(out, list):
        raise TypeError(f"{what} returned {type(out).__name__}, not a list of events")
    if all(type(e) is dict for e in out):
        return out
    good: Batch = []
    for e in out:
        if isinstance(e, dict):
            good.append(e)
        else:
            stats.errors += 1
            dead.write(f"{what} returned {type(e).__name__} among its events, not an event (a JSON object)",
                       stage=stage, event=e)
    return good


async def checked_batches(source: Source, dead: DeadLetter) -> AsyncIterator[Batch]:
    """A plugin source's batches, each a list of dicts: what is not is dead-lettered, the run goes on."""
    ctx = source.context
    async for batch in source.batches():
        try:
            yield events_of(batch, "batches()", ctx.stage, dead, ctx.stats)
        except TypeError as exc:
            ctx.stats.errors += 1
            dead.write(str(exc), stage=ctx.stage, event=batch if isinstance(batch, dict) else repr(batch)[:1000])
