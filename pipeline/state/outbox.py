"""Outputs kept in state.db until every sink has them: a closed window's `metrics`, and a rule's alerts (whose
cooldown is saved with the batch: the restart would never fire them again), survive a `kill -9`.

Why: the local runtime saves stage state after each batch, before the sinks write its outputs. A window
stage removes a window from its state when it emits the window's `metrics`; a `kill -9` after that save and
before a sink wrote the line (a jsonl sink writes buffered lines once a second) lost the window: the next run
had neither its state nor its line (6 of 100 windows in five kills at 400 events/s). Now the `metrics` a stage
notes are saved in the same transaction as that removal, under the source batch they go out with, and
forgotten only once every sink wrote (and flushed) that batch; a restart hands out what is left first. A
kill after a sink wrote them but before they were forgotten writes them again (at least once, never lost).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import orjson

from pipeline.events import Batch, Event

OUTBOX = "~outbox"  # the state map (no stage state is named so: theirs are `<type>:<stage>` and the like)


def _batch(key: Any) -> int | None:
    try:
        return int(str(key).split(".", 1)[0])  # "000000000042.000000007": batch 42
    except ValueError:
        return None


class Outbox:
    """The noted outputs of the batches the sinks have not all written yet, in a persisted map: one entry per
    batch (the list of its kept events), so an alert storm costs a row per batch, not one per alert."""

    def __init__(self, box: MutableMapping[Any, Any]) -> None:
        self._box = box
        self._noted: dict[int, Event] = {}  # id -> the event (kept alive, so its id is not reused meanwhile)
        self._n = 0
        self.lowest: int | None = None  # the lowest batch held, None when nothing is
        self.batches: set[int] = set()  # every batch held

    def note(self, events: Batch) -> None:
        for e in events:
            self._noted[id(e)] = e

    def hold(self, out: Batch, batch: int) -> None:
        if not self._noted:
            return
        noted, self._noted = self._noted, {}
        present = set(map(id, out))  # (in C: a storm's batches are mostly alerts)
        kept = [e for i, e in noted.items() if i in present]  # what a later processor dropped is not kept
        if not kept:
            return
        self._n += 1
        # serialized now: an alert storm kept as live dicts made every garbage collection walk them all
        self._box[f"{batch:012d}.{self._n:09d}"] = orjson.Fragment(orjson.dumps(kept, default=str))
        self.lowest = batch if self.lowest is None else min(self.lowest, batch)
        self.batches.add(batch)

    def delivered(self, upto: int) -> bool:
        if self.lowest is None or self.lowest > upto:
            return False
        gone = [k for k in self._box if (b := _batch(k)) is not None and b <= upto]
        for k in gone:
            del self._box[k]
        rest = [b for k in self._box if (b := _batch(k)) is not None]
        self.lowest = min(rest) if rest else None
        self.batches = set(rest)
        return bool(gone)

    def undelivered(self) -> Batch:
        keys = sorted(self._box, key=str)
        events: Batch = []
        for k in keys:
            v = self._box[k]
            if isinstance(v, orjson.Fragment):  # kept by this process (read back from state.db: a list)
                v = orjson.loads(orjson.dumps(v))
            events += [e for e in v if isinstance(e, dict)] if isinstance(v, list) else [v] if isinstance(v, dict) \
                else []
        for k in keys:
            del self._box[k]
        self.lowest, self.batches = None, set()
        self.note(events)
        return events
