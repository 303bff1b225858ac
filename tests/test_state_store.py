"""The persistent state store (`<state_dir>/state.db`): round trips, torn and corrupt files, symlinks."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.api import Context
from pipeline.emulator import Emulator
from pipeline.errors import StageError
from pipeline.state.store import DB_FILE, SqliteStateStore, TrackedDict
from tests.test_session_api import emulator as emulator  # the shared fixture
from tests.videodb_harness import make_stages


def test_values_survive_a_reopen_and_only_changed_keys_are_written(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path / "state")
    fired, streams = store.get("rules.last_fired"), store.get("enrich.rtstreams")
    assert type(fired) is TrackedDict and isinstance(fired, dict)
    fired["r|rts-1"] = 1_000
    fired["r|rts-2"] = 2_000
    streams["rts-1"] = ["cap-1", "mic:default", ["audio"], 5]
    assert store.dirty
    store.flush()
    assert not store.dirty and store.rows_written == 3
    del fired["r|rts-2"]
    fired["r|rts-1"] = 3_000
    store.flush()
    assert store.rows_written == 5  # one delete, one update: nothing else rewritten
    store.get("rules.windows")["w|x"] = [1, 2]  # never flushed: lost, like a kill -9 before the batch ended
    store._db.close()  # simulate a crash: no close(), no flush

    again = SqliteStateStore(tmp_path / "state")
    assert dict(again.get("rules.last_fired")) == {"r|rts-1": 3_000}
    assert again.get("enrich.rtstreams")["rts-1"] == ["cap-1", "mic:default", ["audio"], 5]
    assert dict(again.get("rules.windows")) == {}
    again.close()
    assert stat.S_IMODE((tmp_path / "state" / DB_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700


def test_every_dict_mutator_is_tracked(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path)
    m = store.get("m")
    m.setdefault("a", 1)
    m.update({"b": 2, "c": 3})
    m |= {"d": 4}  # type: ignore[operator]
    assert m.pop("c") == 3 and m.pop("zz", None) is None
    m.popitem()  # "d"
    store.close()
    assert dict(SqliteStateStore(tmp_path).get("m")) == {"a": 1, "b": 2}
    store = SqliteStateStore(tmp_path)
    store.get("m").clear()
    store.close()
    assert dict(SqliteStateStore(tmp_path).get("m")) == {}


@pytest.mark.parametrize("damage", ["garbage", "torn"])
def test_unreadable_state_is_set_aside_with_one_warning(tmp_path: Path, damage: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    store = SqliteStateStore(tmp_path)
    m = store.get("rules.last_fired")
    for i in range(2000):
        m[f"rule|rts-{i}"] = i
    store.close()
    db = tmp_path / DB_FILE
    raw = db.read_bytes()
    db.write_bytes(b"this is not a database file at all" * 200 if damage == "garbage" else raw[: len(raw) // 3])

    with caplog.at_level(logging.WARNING, logger="pipeline.state"):
        fresh = SqliteStateStore(tmp_path)
        got = dict(fresh.get("rules.last_fired"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert got == {} and len(warnings) == 1
    assert "unreadable state" in warnings[0] and "\n" not in warnings[0]
    assert [p.name for p in tmp_path.glob(f"{DB_FILE}.corrupt-*")]  # kept for inspection
    fresh.get("rules.last_fired")["k"] = 1
    fresh.close()
    assert dict(SqliteStateStore(tmp_path).get("rules.last_fired")) == {"k": 1}


def test_an_unreadable_row_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = SqliteStateStore(tmp_path)
    store.get("m")["ok"] = 1
    store.close()
    with sqlite3.connect(tmp_path / DB_FILE) as db:
        db.execute("INSERT INTO state VALUES ('m', '\"bad\"', x'ff00')")
    with caplog.at_level(logging.WARNING, logger="pipeline.state"):
        assert dict(SqliteStateStore(tmp_path).get("m")) == {"ok": 1}
    assert "skipped 1 unreadable state entry" in caplog.text


def test_symlinked_state_file_or_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StageError, match="symlink"):
        SqliteStateStore(tmp_path / "link")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / DB_FILE).symlink_to(tmp_path / "victim.db")
    with pytest.raises(StageError, match="symlink"):
        SqliteStateStore(tmp_path / "d")
    assert not (tmp_path / "victim.db").exists()


def test_a_failed_flush_keeps_the_changes_for_the_next_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = SqliteStateStore(tmp_path)
    store.get("m")["a"] = 1
    other = sqlite3.connect(tmp_path / DB_FILE, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # someone else holds the write lock: the flush fails at once
    with caplog.at_level(logging.ERROR, logger="pipeline.state"):
        store.flush()
    assert store.dirty and "cannot save rule/enrich state (database is locked)" in caplog.text
    other.execute("ROLLBACK")
    other.close()
    store.close()
    assert dict(SqliteStateStore(tmp_path).get("m")) == {"a": 1}



def run_on_state_dir(tmp_path: Path, st: Path) -> subprocess.CompletedProcess[str]:
    """`pipeline run` of a websocket -> jsonl config whose state_dir is `st` (nothing listens on the URL)."""
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"name: p\nstate_dir: {st}\n"
                   f"source: {{type: websocket, url: 'ws://127.0.0.1:9/'}}\n"
                   f"sinks: [{{type: jsonl, path: {tmp_path}/o.jsonl}}]\n")
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(cfg)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PIPELINE_LOG_LEVEL": "error"})

def test_state_dir_symlink_is_one_line_error_from_pipeline_run(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "st").symlink_to(tmp_path / "real")
    (tmp_path / "in.jsonl").write_text("")
    res = run_on_state_dir(tmp_path, tmp_path / "st")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    errors = [x for x in res.stderr.splitlines() if x.startswith("pipeline: ")]
    assert len(errors) == 1 and "st: refusing a symlinked directory" in errors[0]


def test_state_dir_key_is_validated(tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    base = "name: p\nsource: {type: replay, path: x}\nsinks: [{type: console}]\n"
    (tmp_path / "a.yaml").write_text(base)
    assert load_config(tmp_path / "a.yaml").state_dir == Path("out/p")
    (tmp_path / "b.yaml").write_text(base + "state_dir: /var/tmp/x\n")
    assert load_config(tmp_path / "b.yaml").state_dir == Path("/var/tmp/x")
    (tmp_path / "c.yaml").write_text(base + "state_dir: [1]\n")
    with pytest.raises(ConfigError, match=r"c.yaml:4:\d+: state_dir: expected a directory path"):
        load_config(tmp_path / "c.yaml")


def test_a_state_dir_in_use_by_another_run_is_refused(tmp_path: Path) -> None:
    from pipeline.state import prepare, release

    code = ("import sys, time; from pathlib import Path; from pipeline.state import prepare; "
            "prepare(Path(sys.argv[1])); print('ok', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "st")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ok\n"
        with pytest.raises(StageError, match=rf"state_dir is in use by another pipeline run \(pid {holder.pid}\)"):
            prepare(tmp_path / "st")
    finally:
        holder.kill()
        holder.wait()
    prepare(tmp_path / "st")  # the kernel dropped the dead holder's lock (kill -9)
    release(tmp_path / "st")


HOLD = ("import sys, time; from pathlib import Path; from pipeline.state import prepare; "
        "prepare(Path(sys.argv[1])); print('ok', flush=True); time.sleep(60)")


async def test_a_controller_state_dir_in_use_by_another_run_is_refused(
        tmp_path: Path, make_context: Callable[..., Context], emulator: Emulator) -> None:
    """A controller with its own `state_dir` (sessions saved there, resumed by a restart): another run holding it,
    this one stops at start with one line (before: only the pipeline's own `state_dir` was locked, so two runs
    whose configs differ there both resumed, re-bound and wrote the same sessions); its lock goes at close."""
    shared = tmp_path / "shared"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(shared)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ok\n"
        for mode in ({"end_user_id": "u"}, {"api": {"listen": "127.0.0.1:0", "token": "session-api-token-0123"}}):
            _, ctl = make_stages(make_context, emulator, controller={**mode, "state_dir": str(shared)})
            assert ctl is not None
            with pytest.raises(StageError, match=rf"state_dir is in use by another pipeline run \(pid {holder.pid}\)"):
                await ctl.start()
            await ctl.close()
    finally:
        holder.kill()
        holder.wait()
    _, ctl = make_stages(make_context, emulator, controller={"api": {"listen": "127.0.0.1:0",
                                                                      "token": "session-api-token-0123"},
                                                              "state_dir": str(shared)})
    assert ctl is not None
    once = HOLD.replace("time.sleep(60)", "pass")
    await ctl.start()  # the kernel dropped the dead holder's lock
    try:
        shutil.rmtree(shared)  # removed mid-run: the lock is made again, as the pipeline's own is
        async with asyncio.timeout(5):
            while not (shared / "lock").exists():
                await asyncio.sleep(0.05)
        other = subprocess.run([sys.executable, "-c", once, str(shared)], capture_output=True, text=True, timeout=30)
        assert other.returncode != 0 and "in use by another pipeline run" in other.stderr, other
    finally:
        await ctl.close()
    after = subprocess.run([sys.executable, "-c", once, str(shared)], capture_output=True, text=True, timeout=30)
    assert after.stdout == "ok\n", after.stderr  # released at close


def test_a_lock_taken_by_another_run_after_the_state_dir_was_removed_is_one_error_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Between the removal and the next check another run may lock the new file first: that is said once
    (not at every check), and the lock is taken back once that run is gone."""
    import shutil

    from pipeline.state import follow, prepare, release

    st = tmp_path / "st"
    prepare(st)
    try:
        shutil.rmtree(st)
        code = ("import sys, time; from pathlib import Path; from pipeline.state import prepare; "
                "prepare(Path(sys.argv[1])); print('ok', flush=True); time.sleep(60)")
        holder = subprocess.Popen([sys.executable, "-c", code, str(st)], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "ok\n"
            with caplog.at_level(logging.WARNING, logger="pipeline.state"):
                follow(st)
                follow(st)
            errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == 1 and f"another pipeline run (pid {holder.pid})" in errors[0], errors
        finally:
            holder.kill()
            holder.wait()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.state"):
            follow(st)
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
        assert (st / "lock").read_text() == str(os.getpid())
    finally:
        release(st)


def test_a_fifo_as_the_lock_file_is_one_error_line_from_pipeline_run(tmp_path: Path) -> None:
    """Truncating a FIFO raised a bare OSError (EINVAL) out of the lock: now it is refused by name."""
    st = tmp_path / "st"
    st.mkdir(mode=0o700)
    os.mkfifo(st / "lock")
    res = run_on_state_dir(tmp_path, st)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    errors = [x for x in res.stderr.splitlines() if x.startswith("pipeline: ")]
    assert len(errors) == 1 and "st/lock: cannot use as the state lock: not a regular file" in errors[0], errors


@pytest.mark.parametrize("swap", ["fifo", "symlinked lock", "symlinked state_dir"])
def test_a_lock_or_state_dir_swapped_mid_run_is_one_error_line_and_never_taken_for_ours(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, swap: str) -> None:
    """`follow()` (run every half second) raised OSError on a FIFO, which ended the guard task for good; a
    state_dir replaced by a symlink to another run's directory was looked up there, found not held, and
    skipped without a word (and `release()` then leaked the lock)."""
    from pipeline.state import follow, prepare, release

    st, other = tmp_path / "st", tmp_path / "other"
    other.mkdir()
    (other / "lock").write_text("4242")
    prepare(st)
    try:
        if swap == "fifo":
            (st / "lock").unlink()
            os.mkfifo(st / "lock")
        elif swap == "symlinked lock":
            (st / "lock").unlink()
            (st / "lock").symlink_to(other / "lock")
        else:
            st.rename(tmp_path / "st.old")
            st.symlink_to(other)
        with caplog.at_level(logging.WARNING, logger="pipeline.state"):
            follow(st)
            follow(st)
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "no new one can be locked" in errors[0], errors
        assert (other / "lock").read_text() == "4242"  # the other run's lock is left alone
    finally:
        release(st)
    from pipeline import state

    assert not [k for k in state._held if k.parent == tmp_path.resolve()]  # released, whatever `st` is now
