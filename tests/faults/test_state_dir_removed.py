"""state_dir removed (or state.db replaced) while a run uses it: the state is written again, not into a
deleted file, and the lock is taken again. Real files, real sqlite, real `pipeline run` processes."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.state.store import SqliteStateStore
from tests.procs import stop_process


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



def test_a_state_dir_that_cannot_be_made_again_yet_is_retried_at_the_next_save(tmp_path: Path) -> None:
    """`rm -rf state_dir` still under way when a save found state.db gone: the directory made again was
    removed before state.db could be opened in it, and the StageError ended the run (a clean `make test` saw
    it, 1 in 6). Now the save is logged and retried at the next one, as a failed write is."""
    state_dir = tmp_path / "st"
    store = SqliteStateStore(state_dir)
    fired = store.get("rules.last_fired")
    fired["a"] = 1
    store.flush()
    shutil.rmtree(state_dir)
    state_dir.write_text("not a directory (yet)")  # nothing can be made there for now
    fired["b"] = 2
    store.flush()  # raised StageError
    state_dir.unlink()
    fired["c"] = 3
    store.flush()
    reopened = SqliteStateStore(state_dir)
    assert dict(reopened.get("rules.last_fired")) == {"a": 1, "b": 2, "c": 3}
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


def _run(cfg: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PIPELINE_LOG_LEVEL": "error"})


def _holder(lock: Path) -> str:
    try:
        return lock.read_text()
    except OSError:
        return ""


def _made(db: Path) -> bool:
    """The state file exists with its table written (sqlite has opened it)."""
    try:
        return db.stat().st_size > 0
    except OSError:
        return False


def _until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_second_run_is_refused_after_the_state_dir_was_removed_under_the_first(tmp_path: Path) -> None:
    """The lock file went with the removed state_dir and was never made again: a second `pipeline run`
    started on the same state_dir, and both resumed the same session and wrote the same state."""
    state_dir = tmp_path / "st"
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"name: p\nstate_dir: {state_dir}\n"
                   "source: {type: websocket, url: 'ws://127.0.0.1:9/'}\n"  # nobody listens: it retries for ever
                   f"sinks: [{{type: jsonl, path: {tmp_path}/o.jsonl}}]\ndead_letter: {tmp_path}/dead.jsonl\n")
    first = _run(cfg)
    second: subprocess.Popen[str] | None = None
    try:
        # under way: locked, and its state.db made (a removal while it still starts is a start that fails)
        assert _until(lambda: _holder(state_dir / "lock") == str(first.pid) and _made(state_dir / "state.db"))
        shutil.rmtree(state_dir)  # someone cleans up while the first run goes on
        # it checks every 0.5 s; a second run started before it made its lock again would take it (the window
        # the check leaves), so wait for the lock as long as a loaded machine may need, and say so if it never comes
        assert _until(lambda: _holder(state_dir / "lock") == str(first.pid)), "the first run never locked it again"
        second = _run(cfg)
        try:
            _, err = second.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("a second run started on the state_dir the first one still uses")
        assert second.returncode != 0 and "Traceback" not in err
        lines = [x for x in err.splitlines() if x.strip()]
        assert lines == [f"pipeline: {state_dir}: state_dir is in use by another pipeline run (pid {first.pid}); "
                         "stop it or give this config its own state_dir"], err
        assert first.poll() is None
    finally:
        if second is not None:
            stop_process(second)
        assert stop_process(first) == 0
