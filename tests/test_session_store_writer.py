"""Session records are written by one thread, off the event loop: in order, newest wins, reads see them.

Before, every change to a session's record was written on the event loop (a temporary file, a rename), six
times per session as it was made, started and bound: a burst of creates stalled every session's events and
requests, and a slow disk stalled them for as long as each write took. Real files, a real pipeline (the
emulator and the real SDK) where the API is involved, a real subprocess and signal for the stop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from pipeline.api import Context
from pipeline.emulator import Emulator
from stages.controller import session_store
from stages.controller.session_store import SessionStore
from tests.test_session_api import TOKEN, Live, api_config, cues, hook, running
from tests.test_session_api import emulator as emulator  # the shared fixture
from tests.test_session_api_retention import LoopLag
from tests.videodb_harness import API_KEY, scenario_file


class Gate:
    """Record writes (`.json`, or files ending in `suffix`) wait until `open()` (2 s at most, so a test of old
    code cannot hang); `entered`: a write is waiting. Other files are written at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, suffix: str = ".json") -> None:
        self.entered, self._open, self.written = threading.Event(), threading.Event(), []
        real = session_store.write_private_bytes

        def write(path: Any, text: bytes) -> None:
            if str(path).endswith(suffix):
                self.entered.set()
                self._open.wait(2)
                self.written.append(orjson.loads(text))
            real(path, text)

        monkeypatch.setattr(session_store, "write_private_bytes", write)

    def open(self) -> None:
        self._open.set()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    g = Gate(monkeypatch)
    yield g
    g.open()


def on_disk(store: SessionStore, sid: str) -> dict[str, Any] | None:
    p = store.path(sid)
    return orjson.loads(p.read_bytes()) if p.exists() else None


def test_a_newer_version_replaces_one_not_written_yet_and_reads_see_it(tmp_path: Path, gate: Gate) -> None:
    store = SessionStore(tmp_path)
    store.save({"session_id": "cap-a", "status": "created"})
    assert gate.entered.wait(2)  # the writer thread holds version 1
    store.save({"session_id": "cap-a", "status": "starting"})
    store.save({"session_id": "cap-a", "status": "active"})
    store.write_json("backfill_from.checkpoint", {"rts-1 transcript": 1})
    store.write_json("backfill_from.checkpoint", {"rts-1 transcript": 2})
    # read-your-writes: the newest version, though nothing of it is on disk yet
    assert on_disk(store, "cap-a") is None
    assert (store.load("cap-a") or {})["status"] == "active"
    assert [r["status"] for r in store.load_all()] == ["active"]
    assert store.has("cap-a")
    assert store.read_json("backfill_from.checkpoint") == {"rts-1 transcript": 2}
    gate.open()
    assert store.flush()
    assert [r["status"] for r in gate.written] == ["created", "active"]  # "starting" was never written
    assert (on_disk(store, "cap-a") or {})["status"] == "active"


def test_a_drop_waits_for_the_writes_queued_before_it(tmp_path: Path, gate: Gate) -> None:
    """A removal queued while a write of the same record waits runs after it: the record does not come back."""
    store = SessionStore(tmp_path)
    store.save({"session_id": "cap-a", "status": "stopped"})
    assert gate.entered.wait(2)
    store.save({"session_id": "cap-a", "status": "exported"})
    store.drop("cap-a")
    assert store.load("cap-a") is None and store.load_all() == [] and not store.has("cap-a")
    gate.open()
    assert store.flush()
    assert not store.path("cap-a").exists()
    assert [r["status"] for r in gate.written] == ["stopped"]  # the one replaced by the removal: never written


async def test_a_stop_that_cannot_write_everything_names_each_file_left_once(
        tmp_path: Path, gate: Gate, caplog: pytest.LogCaptureFixture) -> None:
    """A record being written when the stop's 10 s ran out, with a newer version of it queued behind, was
    counted and named twice ("2 file(s) ... not written: cap-a.json, cap-a.json")."""
    store = SessionStore(tmp_path)
    store.save({"session_id": "cap-a", "status": "created"})
    assert gate.entered.wait(2)  # the writer thread holds version 1
    store.save({"session_id": "cap-a", "status": "active"})
    await store.close(0.1)
    assert "1 file(s) not written in the" in caplog.text, caplog.text
    assert caplog.text.count("cap-a.json") == 1, caplog.text
    gate.open()
    assert await asyncio.to_thread(store.flush, 5)  # nothing of it left for the next test's writes


async def test_a_record_someone_waits_for_is_written_before_the_other_sessions_records(
        tmp_path: Path, gate: Gate) -> None:
    """A create's 201 waits for its record: that write goes ahead of the other files' writes queued before it
    (else every create in a burst waited behind the writes of all the sessions being started and bound)."""
    store = SessionStore(tmp_path)
    store.save({"session_id": "cap-busy", "status": "active"})
    await asyncio.to_thread(gate.entered.wait, 2)
    for sid in ("cap-a", "cap-b", "cap-new"):
        store.save({"session_id": sid, "status": "created"})
    waiting = store.flushed("cap-new")
    gate.open()
    assert await waiting
    assert await asyncio.to_thread(store.flush)
    assert [r["session_id"] for r in gate.written] == ["cap-busy", "cap-new", "cap-a", "cap-b"]


def test_a_record_the_disk_refused_is_written_with_its_intent_dropped_only_after_it_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A failed write is logged once and kept; the next write that works writes it too, and only then the
    create's intent note goes (a restart finds the session by the note until its record is on disk)."""
    from pipeline.errors import StageError

    store = SessionStore(tmp_path)
    real, full = session_store.write_private_bytes, [True]

    def write(path: Any, text: bytes) -> None:
        if full[0] and str(path).endswith("cap-a.json"):
            raise StageError(f"{path}: cannot write: No space left on device")
        real(path, text)

    monkeypatch.setattr(session_store, "write_private_bytes", write)
    intent = {"session_id": None, "idempotency_key": "k", "end_user_id": "u"}
    assert asyncio.run(store.save_intent(intent))
    store.save({"session_id": "cap-a", "status": "created"}, then=lambda: store.drop_intent("k"))
    assert store.flush()
    assert store.intent_path("k").exists() and not store.path("cap-a").exists()
    assert caplog.text.count("cannot save") == 1 and "No space left" in caplog.text
    assert (store.load("cap-a") or {})["status"] == "created"  # kept in memory meanwhile
    full[0] = False
    store.save({"session_id": "cap-b", "status": "created"})
    assert store.flush()
    assert (on_disk(store, "cap-a") or {})["status"] == "created" and on_disk(store, "cap-b") is not None
    assert not store.intent_path("k").exists()
    assert caplog.text.count("cannot save") == 1  # the retry is not logged again


async def test_a_slow_disk_does_not_hold_the_event_loop_while_records_are_saved(
        emulator: Emulator, make_context: Callable[..., Context], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every record write takes 0.5 s (a slow or network disk). Before, each one held the event loop for as
    long: a session starting (two status changes, the bind) stopped every request and event for seconds.
    Now the loop goes on (requests answered at once); a create's 201 still waits for its record."""
    async with running(make_context, emulator) as live:
        status, made = await live.call("POST", "/v1/sessions", json={"end_user_id": "a"})
        assert status == 201, made
        sid, m = made["session_id"], live.ctl.manager
        real = session_store.write_private_bytes

        def slow(path: Any, text: bytes) -> None:
            if str(path).endswith(".json"):
                time.sleep(0.5)
            real(path, text)

        monkeypatch.setattr(session_store, "write_private_bytes", slow)
        async with LoopLag() as lag:
            await hook(live, emulator, f"sessions/{sid}/start")
            await live.wait_for(lambda: m.get(sid).lifecycle.state == "active", timeout=10)
            t0 = time.monotonic()
            assert (await live.call("GET", f"/v1/sessions/{sid}"))[0] == 200  # while its records are written
            answered = time.monotonic() - t0
            created = asyncio.create_task(live.call("POST", "/v1/sessions", json={"end_user_id": "b"}))
            status, made_b = await created
            assert status == 201, made_b
            assert (on_disk(m.store, made_b["session_id"]) or {}).get("end_user_id") == "b"  # its 201 came after
        assert lag.worst < 0.25, lag.worst  # a write takes 0.5 s
        assert answered < 0.25, answered
        await live.wait_for(lambda: (on_disk(m.store, sid) or {}).get("status") == "active", timeout=5)


async def test_a_create_is_answered_only_once_its_record_and_not_before_the_note_goes(
        emulator: Emulator, make_context: Callable[..., Context], gate: Gate) -> None:
    """The 201 promises a restart knows the session: it waits for the record's write (held here), and the
    create's intent note (Idempotency-Key) goes only after the record is on disk."""
    async with running(make_context, emulator) as live:
        store = live.ctl.manager.store
        create = asyncio.create_task(live.call("POST", "/v1/sessions", json={"end_user_id": "a"},
                                               headers={"Idempotency-Key": "key-a"}))
        await live.wait_for(gate.entered.is_set, timeout=5)
        done, _ = await asyncio.wait({create}, timeout=0.3)  # the loop runs on; the answer does not come
        assert not done
        assert store.intent_path("key-a").exists()  # the record is not on disk yet: the note stays
        gate.open()
        status, made = await create
        assert status == 201, made
        assert (on_disk(store, made["session_id"]) or {}).get("idempotency_key") == "key-a"
        await live.wait_for(lambda: not store.intent_path("key-a").exists(), timeout=5)


async def test_a_shutdown_does_not_wait_for_the_disk_as_for_a_create_at_videodb(
        emulator: Emulator, make_context: Callable[..., Context], gate: Gate,
        caplog: pytest.LogCaptureFixture) -> None:
    """A shutdown waits up to 30 s for creates VideoDB has not answered yet (their sessions need a record).
    Before, a create VideoDB had answered, its record queued behind a slow disk, counted as one of those: the
    stop waited the 30 s for the disk (then 10 s more for the queued writes) and warned that the session had
    no record. Now it does not wait for it (the stop writes the queued records); its 201 still waits."""
    async with running(make_context, emulator) as live:
        create = asyncio.create_task(live.call("POST", "/v1/sessions", json={"end_user_id": "a"}))
        await live.wait_for(gate.entered.is_set, timeout=5)  # VideoDB answered; the record's write is held
        t0 = time.monotonic()
        await live.ctl.manager.creator.close()
        assert time.monotonic() - t0 < 1.0  # the gate holds the write for 2 s
        assert "still waiting for VideoDB" not in caplog.text
        assert not create.done()
        gate.open()
        status, made = await create
        assert status == 201, made
        assert (on_disk(live.ctl.manager.store, made["session_id"]) or {}).get("end_user_id") == "a"


async def test_a_shutdown_does_not_wait_for_a_create_whose_note_the_disk_holds_and_it_makes_nothing(
        emulator: Emulator, make_context: Callable[..., Context], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A keyed create writes its note before it asks VideoDB. Before, a shutdown counted one whose note a slow
    disk held as a create at VideoDB: it waited up to 30 s for the disk, warned that the session had no record,
    and the create then went on to make a session during the stop. Now the stop does not wait for it, and the
    create answers 503 (nothing made, its note dropped)."""
    gate = Gate(monkeypatch, ".creating")
    try:
        async with running(make_context, emulator) as live:
            store = live.ctl.manager.store
            create = asyncio.create_task(live.call("POST", "/v1/sessions", json={"end_user_id": "a"},
                                                   headers={"Idempotency-Key": "key-a"}))
            await live.wait_for(gate.entered.is_set, timeout=5)  # the note's write is held
            t0 = time.monotonic()
            await live.ctl.manager.creator.close()
            assert time.monotonic() - t0 < 1.0  # the gate holds the write for 2 s
            assert "still waiting for VideoDB" not in caplog.text
            gate.open()
            status, err = await create
            assert status == 503 and "shutting down" in err["error"], err
            assert not emulator.registry.sessions
            await live.wait_for(lambda: store.flush(0) and not store.intent_path("key-a").exists(), timeout=5)
    finally:
        gate.open()


SLOW_CHILD = """
import sys, time
from stages.controller import session_store
real = session_store.write_private_bytes
def slow(path, text):
    if str(path).endswith(".json"):
        time.sleep(0.5)
    real(path, text)
session_store.write_private_bytes = slow
from pipeline.cli import main
sys.exit(main(["run", sys.argv[1]]))
"""


async def test_sigterm_writes_the_queued_records_before_the_process_exits(tmp_path: Path) -> None:
    """`pipeline run` (its own process) on a disk taking 0.5 s per record: a session starts and SIGTERM comes
    while its newest records still wait to be written. The stop writes them before the process exits."""
    import re

    emu = Emulator(scenario_file(tmp_path, cues(200), end=1000), speed=10, api_key=API_KEY, autostart=False)
    await emu.start()
    config = api_config(tmp_path, emu)
    env = {**os.environ, "SESSION_API_TOKEN": TOKEN, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", SLOW_CHILD, str(config), cwd=tmp_path,
                                                env=env, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    lines: list[str] = []
    live = Live(None, aiohttp.ClientSession(), "")  # type: ignore[arg-type]
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(40):
            while not (m := re.search(r"session API on (http://\S+)/v1/sessions", "".join(lines))):
                line = (await proc.stderr.readline()).decode()
                assert line, "".join(lines)
                lines.append(line)
        live.url = m.group(1)
        status, made = await live.call("POST", "/v1/sessions", json={"end_user_id": "u"})
        assert status == 201, made
        sid = made["session_id"]
        await hook(live, emu, f"sessions/{sid}/start")
        async with asyncio.timeout(10):  # active in the pipeline: its record is queued behind the slow disk
            while (await live.call("GET", f"/v1/sessions/{sid}"))[1]["status"] != "active":
                await asyncio.sleep(0.02)
        record = tmp_path / "state" / "sessions" / f"{sid}.json"
        assert orjson.loads(record.read_bytes())["status"] != "active"  # not written yet
        proc.send_signal(signal.SIGTERM)
        rest = (await asyncio.wait_for(proc.stderr.read(), 30)).decode()
        assert await asyncio.wait_for(proc.wait(), 30) == 0, "".join(lines) + rest
        assert "not written" not in rest and "Traceback" not in rest, rest
        assert orjson.loads(record.read_bytes())["status"] == "active"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await live.http.close()
        await emu.stop()


async def test_the_sweep_of_expired_notes_never_removes_a_retrys_new_note(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep read an expired note for key K; the writer thread then put a retry's new note for K in its
    place; the sweep removed that new one (a crash before the record was saved: the next retry made a second
    session). Now the sweep runs in the writer thread: the new note is written after it, and stays."""
    store = SessionStore(tmp_path)
    old = {"session_id": None, "idempotency_key": "k", "end_user_id": "u", "expires_at": "2000-01-01T00:00:00Z"}
    new = {**old, "expires_at": "2999-01-01T00:00:00Z"}
    # written as a run before this one left it: save_intent() would queue a sweep of its own, and the note it
    # awaits goes ahead of that sweep, which could then remove this expired note before the one looked at here
    store.dir.mkdir(parents=True)
    session_store.write_private_bytes(store.intent_path("k"), orjson.dumps(old))
    name, real, retried = store.intent_path("k").name, session_store.read_regular, threading.Event()

    def read(path: Path, limit: int) -> bytes:
        data = real(path, limit)
        if path.name == name and not retried.is_set():  # the sweep has read the expired note: a retry comes
            retried.set()
            store._writer.put(name, orjson.dumps(new), keep=False)  # what save_intent queues
            if threading.current_thread().name != "session-records":  # the writer thread is free: it writes it
                assert store.flush(2)
        return data

    monkeypatch.setattr(session_store, "read_regular", read)
    swept = store.drop_expired_intents(now=True)
    if swept is not None:
        await swept
    assert await asyncio.to_thread(store.flush)
    assert retried.is_set()
    monkeypatch.undo()
    assert store.load_intent("k") == new
    assert orjson.loads(store.intent_path("k").read_bytes()) == new
