"""faust table state in-process (no broker): where deletions go, what a rebalance forgets, when windows flush."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.config import load_config
from pipeline.runtime.faust import Worker
from pipeline.runtime.faust_state import PartitionCursor, partition_table_class
from tests.test_faust_runtime import write_config


def table_with_recorded_sends(cursor: PartitionCursor) -> tuple[Any, list[tuple[int, str, Any]]]:
    import faust

    app = faust.App("t-state", broker="kafka://127.0.0.1:9", store="memory://", Table=partition_table_class(cursor))
    table = app.Table("win", partitions=4)
    sent: list[tuple[int, str, Any]] = []

    def send(partition: int, key: str, value: Any, **_: Any) -> Any:
        sent.append((partition, key, value))
        return SimpleNamespace(message=SimpleNamespace(partition=partition))

    table.send_changelog = send
    return table, sent


def test_a_deletion_reaches_every_changelog_partition_the_key_was_written_to() -> None:
    cursor = PartitionCursor()
    table, sent = table_with_recorded_sends(cursor)
    cursor.partition = 0
    table["k"] = 1  # a session's first events, keyed by rtstream before its id was known
    cursor.partition = 2
    table["k"] = 2
    cursor.partition = 3  # deleted while another partition's batch is handled (a stopping worker's flush)
    del table["k"]
    assert sorted(p for p, key, value in sent if value is None) == [0, 2, 3]
    cursor.partition = 1
    table["k"] = 3
    del table["k"]  # written once since: one tombstone, where it lives
    assert [(p, v) for p, _, v in sent[-2:]] == [(1, 3), (1, None)]


async def test_a_rebalance_forgets_the_keys_of_partitions_given_away_also_those_written_here() -> None:
    from faust.types import TP

    cursor = PartitionCursor()
    table, _ = table_with_recorded_sends(cursor)
    for partition, key in [(1, "a"), (2, "b"), (3, "c")]:
        cursor.partition = partition
        table[key] = partition
    await table.on_rebalance(set(), set(), set())
    assert table.restored is False
    await table.on_recovery_completed({TP("win-changelog", 2), TP("win-changelog", 3)}, set())
    assert table.restored is True
    assert sorted(table.keys()) == ["b", "c"]


@pytest.mark.parametrize("restored", [False, True])
async def test_a_worker_flushes_windows_only_once_its_tables_are_restored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restored: bool) -> None:
    """A worker stopped while still restoring holds part of a partition's changelog: windows it emitted
    from it would be emitted again, whole, by the next owner."""
    cfg = write_config(tmp_path / "faust.yaml", engine="faust", bootstrap="127.0.0.1:9", out=tmp_path / "out",
                       stages=[{"type": "window", "size": "30s"}], name="flushgate")
    worker = Worker(load_config(cfg), tmp_path / "w", 10.0)
    flushed: list[bool] = []
    monkeypatch.setattr(worker.built.chain, "flush", lambda: flushed.append(True) or [])
    monkeypatch.setattr(worker.state, "restored", lambda: restored)

    async def sent(limit: float) -> None:
        return None

    monkeypatch.setattr(worker, "_changelog_sent", sent)
    await worker.flush_windows()
    assert flushed == ([True] if restored else [])


class _CountedWalks(dict):  # type: ignore[type-arg]
    """A table store's dict that counts how often all its keys are walked."""

    walks = 0

    def __iter__(self) -> Any:
        type(self).walks += 1
        return super().__iter__()


def test_the_length_of_staged_state_counts_the_batch_changes_without_walking_the_table() -> None:
    """Stages ask every batch whether a state mapping is over its cap (`len`). It walked every key of the table:
    with 1,000 sessions' rtstreams a third of a worker's CPU went there."""
    from pipeline.runtime.faust_state import StagedTable

    table, _ = table_with_recorded_sends(PartitionCursor())
    table.data.data = _CountedWalks({f"rts-{i}": i for i in range(4000)})  # as restored from the changelog
    staged = StagedTable(table)
    staged["new"] = 1  # added
    staged["rts-1"] = 10  # overwritten
    del staged["rts-2"]  # deleted
    staged["gone"] = 1
    del staged["gone"]  # added and deleted in the same batch
    del staged["rts-3"]
    staged["rts-3"] = 3  # deleted, then written again
    walks = _CountedWalks.walks
    assert len(staged) == 4000
    assert _CountedWalks.walks == walks  # the table was not walked
    assert len(list(staged)) == 4000 and _CountedWalks.walks == walks + 1
