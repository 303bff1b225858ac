"""Stage state (`context.state.get(name)`) backed by faust Tables, for the faust runtime.

Each named mapping is a Table whose changelog topic has as many partitions as
the ingest topic. A write goes to the changelog partition of the events being
processed, so the state of a capture session travels with its ingest
partition: a restarted worker, or the one that takes over a dead worker's
partitions, reads it back from the changelog before processing resumes.

A batch's writes reach the tables (and so the changelog) only once every sink
has written and flushed that batch (`commit()`). Else a worker killed between the
two left state behind for events no sink had: the worker processing them again
found, say, the rule cooling down, and their alert was never delivered.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, MutableMapping
from typing import Any

from pipeline.api import StateStore
from pipeline.kafka import safe_topic


class PartitionCursor:
    """The ingest partition whose events are being processed right now (set by the worker)."""

    __slots__ = ("partition",)

    def __init__(self) -> None:
        self.partition = 0


def partition_table_class(cursor: PartitionCursor) -> type:
    """A faust Table class that writes changelog records to `cursor.partition`.

    Why: faust finds the partition through the "current event", which is not set
    while a whole batch is processed at once; the worker groups batches by
    partition and moves the cursor instead.
    """
    from faust.tables.table import Table

    class PartitionTable(Table):  # type: ignore[misc]
        """Also remembers which changelog partitions hold each key, so a deletion reaches all of them.

        Why: a key is deleted while another partition's batch is being processed (a worker that stops
        closes every open window at once); a tombstone only in that partition left the key in its own,
        and the next owner restored it (a window emitted twice).
        """

        def partition_for_key(self, key: Any) -> int | None:
            return cursor.partition

        def _homes(self) -> dict[Any, set[int]]:
            homes: dict[Any, set[int]] | None = self.__dict__.get("_pipeline_homes")
            if homes is None:
                homes = self.__dict__["_pipeline_homes"] = {}
            return homes

        def apply_changelog_batch(self, batch: Any) -> None:
            events = list(batch)
            homes = self._homes()
            for event in events:
                key = self._to_key(event.key)
                if event.message.value is None:
                    homes.pop(key, None)
                else:
                    homes.setdefault(key, set()).add(event.message.partition)
            super().apply_changelog_batch(events)

        def on_key_set(self, key: Any, value: Any) -> None:
            super().on_key_set(key, value)
            self._homes().setdefault(key, set()).add(cursor.partition)

        def on_key_del(self, key: Any) -> None:
            super().on_key_del(key)  # the tombstone in the current partition
            for partition in self._homes().pop(key, set()) - {cursor.partition}:
                self.send_changelog(partition, key, value=None, value_serializer="raw")

        #: the table holds the whole changelog of the partitions assigned last (not set before the first
        #: assignment, nor while a rebalance restores it)
        restored = False

        async def on_rebalance(self, *args: Any, **kwargs: Any) -> None:
            self.restored = False
            await super().on_rebalance(*args, **kwargs)

        async def on_recovery_completed(self, active_tps: Any, standby_tps: Any) -> None:
            """After a rebalance, forget the keys of partitions given away, also those this worker wrote
            itself (faust's memory store forgets only keys it read from the changelog): their new owner
            has them, and a window kept here too would be emitted by both."""
            await super().on_recovery_completed(active_tps, standby_tps)
            self.restored = True  # below: no await, so a stop cannot come between the two
            owned = {partition for _, partition in active_tps}
            homes, data = self._homes(), self.data
            for key, parts in list(homes.items()):
                if key not in data:
                    del homes[key]
                elif not parts & owned:
                    del data[key]
                    del homes[key]
            log.info("worker %d: table %s restored for partitions %s: %d keys", os.getpid(), self.name,
                     sorted(owned), len(data))

    return PartitionTable


log = logging.getLogger("pipeline.runtime.faust")

_ABSENT: Any = object()
_GONE: Any = object()  # a key this batch deleted


class StagedTable(MutableMapping[str, Any]):
    """A faust Table as this batch sees it: reads see the batch's own writes, which reach the table
    (and its changelog) only at `commit()`; `discard()` forgets them."""

    __slots__ = ("changed", "table")

    def __init__(self, table: Any) -> None:
        self.table = table
        self.changed: dict[str, Any] = {}  # key -> new value, or _GONE

    def __getitem__(self, key: str) -> Any:
        value = self.changed.get(key, _ABSENT)
        if value is _ABSENT:
            return self.table[key]
        if value is _GONE:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        value = self.changed.get(key, _ABSENT)
        if value is _ABSENT:
            return self.table.get(key, default)
        return default if value is _GONE else value

    def __contains__(self, key: object) -> bool:
        value = self.changed.get(key, _ABSENT)  # type: ignore[call-overload]
        return key in self.table if value is _ABSENT else value is not _GONE

    def __setitem__(self, key: str, value: Any) -> None:
        self.changed[key] = value

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        self.changed[key] = _GONE

    def __iter__(self) -> Iterator[str]:
        changed = self.changed
        for key in list(self.table):
            if key not in changed:
                yield key
        for key, value in list(changed.items()):
            if value is not _GONE:
                yield key

    def __len__(self) -> int:
        """The table's length corrected by this batch's changes: stages ask once per batch (is the state over
        its cap?), and walking every key each time cost a worker a third of its CPU at 1,000 sessions."""
        table = self.table
        n = len(table)
        for key, value in self.changed.items():
            if (value is _GONE) == (key in table):  # deletes a key the table has, or adds one it lacks
                n += -1 if value is _GONE else 1
        return n

    def commit(self) -> None:
        """Write the batch's changes to the table: faust sends them to the changelog partition of the cursor."""
        changed, self.changed = self.changed, {}
        table = self.table
        for key, value in changed.items():
            if value is _GONE:
                table.pop(key, None)
            else:
                table[key] = value

    def discard(self) -> None:
        self.changed = {}


class TableState(StateStore):
    """`get(name)` returns a staged faust Table (declared on first use, before the app starts)."""

    def __init__(self, app: Any, partitions: int) -> None:
        super().__init__()
        self.app = app
        self.partitions = partitions
        self.staged: list[StagedTable] = []

    def get(self, name: str) -> MutableMapping[str, Any]:
        table = self._maps.get(name)
        if table is None:
            faust_table = self.app.Table(safe_topic(name), partitions=self.partitions,
                                         help=f"pipeline state {name!r}")
            table = StagedTable(faust_table)
            self.staged.append(table)
            self._maps[name] = table
        return table

    def commit(self) -> None:
        """Every sink flushed the batch: its state changes may now reach the tables and the changelog."""
        for table in self.staged:
            if table.changed:
                table.commit()

    def discard(self) -> None:
        """The batch failed: its state changes never happened."""
        for table in self.staged:
            table.discard()

    def restored(self) -> bool:
        """Whether every table holds all of its assigned partitions' changelog (a stop during a rebalance
        finds them half restored)."""
        return all(getattr(t.table, "restored", True) for t in self.staged)
