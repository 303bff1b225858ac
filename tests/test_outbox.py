"""The outbox of kept outputs (a closed window's `metrics`, a rule's alerts) in state.db: one entry per batch,
what a later processor dropped not kept, and the entries an older version kept one per event still handed out."""

from __future__ import annotations

from pathlib import Path

from pipeline.state.outbox import OUTBOX
from pipeline.state.store import SqliteStateStore


def test_kept_outputs_are_one_entry_per_batch_and_come_back_after_a_reopen(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path)
    a, b, dropped, c = {"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}
    store.note([a, b, dropped])
    store.hold([{"n": 0}, a, b], 7)  # `dropped` did not reach the sinks: nothing to keep
    store.note([c])
    store.hold([c], 9)
    store.flush()
    assert [k.split(".")[0] for k in sorted(store.get(OUTBOX))] == ["000000000007", "000000000009"]
    assert store.undelivered(7) == [a, b, c]  # (read back in the same process too), held for batch 7 now
    assert [k.split(".")[0] for k in sorted(store.get(OUTBOX))] == ["000000000007"] * 2
    assert store.lowest_held() == 7 and store.holds(7) and not store.holds(9)
    store.note([c])
    store.hold([c], 9)
    assert store.lowest_held() == 7 and store.holds(9) and not store.holds(8)
    assert store.delivered(7) and store.lowest_held() == 9 and not store.holds(7)
    store.flush()
    store.close()
    again = SqliteStateStore(tmp_path)
    assert again.undelivered(0) == [c] and again.lowest_held() == 0
    assert again.delivered(0) and again.lowest_held() is None and again.undelivered(0) == []
    again.close()


def test_entries_kept_one_per_event_by_an_older_version_are_handed_out(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path)
    box = store.get(OUTBOX)
    box["000000000003.000000002"] = {"n": 2}
    box["000000000003.000000001"] = {"n": 1}
    box["000000000004"] = [{"n": 3}, "not an event"]
    store.flush()
    store.close()
    again = SqliteStateStore(tmp_path)
    assert again.undelivered(0) == [{"n": 1}, {"n": 2}, {"n": 3}]
    again.close()
