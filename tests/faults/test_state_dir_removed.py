"""state_dir removed (or state.db replaced) while a run uses it: the state is written again, not into a
deleted file. Real files, real sqlite."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from pipeline.state.store import SqliteStateStore


def test_a_state_dir_removed_mid_run_gets_the_whole_state_back_at_the_next_save(tmp_path: Path) -> None:
    """Saves went on into the deleted file without a word; after a crash the restart found no cooldowns."""
    state_dir = tmp_path / "out" / "meeting"
    store = SqliteStateStore(state_dir)
    fired = store.get("rules.last_fired")
    fired["keyword|rts-1"] = 1000
    store.get("enrich.names")["rts-1"] = "mic"
    store.flush()
    shutil.rmtree(tmp_path / "out")  # someone cleans up out/ while the pipeline runs
    fired["other|rts-1"] = 2000  # the next batch changes one key
    store.flush()
    # no close(): the process is killed (-9); what a restart reads is what the file holds now
    reopened = SqliteStateStore(state_dir)
    assert dict(reopened.get("rules.last_fired")) == {"keyword|rts-1": 1000, "other|rts-1": 2000}
    assert dict(reopened.get("enrich.names")) == {"rts-1": "mic"}
    reopened.close()
    store.close()


def test_a_state_db_replaced_mid_run_holds_only_the_runs_state(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path)
    m = store.get("m")
    m["a"] = 1
    store.flush()
    (tmp_path / "state.db").unlink()
    other = sqlite3.connect(tmp_path / "state.db")  # another file put in its place, with rows of its own
    other.execute("CREATE TABLE state (map TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, "
                  "PRIMARY KEY (map, key)) WITHOUT ROWID")
    other.execute("""INSERT INTO state VALUES ('m', '"stale"', '9')""")
    other.commit()
    other.close()
    m["b"] = 2
    store.flush()
    assert dict(SqliteStateStore(tmp_path).get("m")) == {"a": 1, "b": 2}
    store.close()
