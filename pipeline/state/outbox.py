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


def _events(value: Any) -> Batch:
    """The events of one kept entry: a list of them (as read back from state.db), the same serialized (kept by
    this process), or one event (as an older version kept them)."""
    if isinstance(value, orjson.Fragment):
        value = orjson.loads(orjson.dumps(value))
    if isinstance(value, dict):
        return [value]
    return [e for e in value if isinstance(e, dict)] if isinstance(value, list) else []


class Outbox:
    """The noted outputs of the batches the sinks have not all written yet, in a persisted map: one entry per
    batch (the list of its kept events), so an alert storm costs a row per batch, not one per alert."""

    def __init__(self, box: MutableMapping[Any, Any]) -> None:
        self._box = box
        self._noted: dict[int, Event] = {}  # id -> the event (kept alive, so its id is not reused meanwhile)
        self._n = 0
        self.batches: set[int] = set()  # every batch held

    @property
    def lowest(self) -> int | None:
        """The lowest batch held, None when nothing is."""
        return min(self.batches, default=None)

    def note(self, events: Batch) -> None:
        for e in events:
            self._noted[id(e)] = e

    def hold(self, out: Batch, batch: int) -> None:
        if not self._noted:
            return
        noted, self._noted = self._noted, {}
        present = set(map(id, out))  # (in C: a storm's batches are mostly alerts)
        kept = [e for i, e in noted.items() if i in present]  # what a later processor dropped is not kept
        if kept:
            self._keep(kept, batch)

    def _keep(self, kept: Batch, batch: int) -> None:
        """One entry: `kept`, until every sink has batch `batch`."""
        self._n += 1
        # serialized now: an alert storm kept as live dicts made every garbage collection walk them all
        self._box[f"{batch:012d}.{self._n:09d}"] = orjson.Fragment(orjson.dumps(kept, default=str))
        self.batches.add(batch)

    def delivered(self, upto: int) -> bool:
        if not any(b <= upto for b in self.batches):
            return False
        gone = [k for k in self._box if (b := _batch(k)) is not None and b <= upto]
        for k in gone:
            del self._box[k]
        self.batches = {b for b in self.batches if b > upto}
        return bool(gone)

    def undelivered(self, batch: int) -> Batch:
        """What an earlier run kept, to hand out with batch `batch` (this run's first): kept under it until then.
        Before, it left the map at once and lived in memory only, so a save before that batch (a reload that
        changed a rule, while the source was idle) committed its removal and a `kill -9` then lost it."""
        entries = [_events(self._box[k]) for k in sorted(self._box, key=str)]
        for k in list(self._box):  # all gone first: a new key may be an old one
            del self._box[k]
        self.batches = set()
        for kept in entries:
            if kept:
                self._keep(kept, batch)
        return [e for kept in entries for e in kept]
