"""Stage state (`context.state.get(name)`) backed by faust Tables, for the faust runtime.

Each named mapping is a Table whose changelog topic has as many partitions as
the ingest topic. A write goes to the changelog partition of the events being
processed, so the state of a capture session travels with its ingest
partition: a restarted worker, or the one that takes over a dead worker's
partitions, reads it back from the changelog before processing resumes.
"""

from __future__ import annotations

from collections.abc import MutableMapping
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
        def partition_for_key(self, key: Any) -> int | None:
            return cursor.partition

    return PartitionTable


class TableState(StateStore):
    """`get(name)` returns a faust Table (declared on first use, before the app starts)."""

    def __init__(self, app: Any, partitions: int) -> None:
        super().__init__()
        self.app = app
        self.partitions = partitions

    def get(self, name: str) -> MutableMapping[str, Any]:
        table = self._maps.get(name)
        if table is None:
            table = self.app.Table(safe_topic(name), partitions=self.partitions,
                                   help=f"pipeline state {name!r}")
            self._maps[name] = table
        return table
