"""Session churn: what the session API keeps of finished sessions, in memory and in `state_dir`, stays bounded.

Real SDK against the emulator, real files: sessions are created, started by the emulated desktop client,
stopped through the API and exported, one after another, as in a long run serving many users.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from pipeline.api import Context
from pipeline.emulator import Emulator
from pipeline.events import iso_seconds, iso_ts
from stages.controller import session_manager, session_store
from stages.controller.lifecycle import Lifecycle
from tests.test_session_api import Live, cues, hook, running
from tests.test_session_api import emulator as emulator  # the shared fixture
from tests.test_session_api_attacks import status_of
from tests.videodb_harness import API_KEY, scenario_file


async def finished(live: Live, emu: Emulator, user: str, key: str | None = None) -> str:
    """One session's whole life: created (with `key` as its Idempotency-Key), started, stopped, exported."""
    headers = {"Idempotency-Key": key} if key else {}
    status, body = await live.call("POST", "/v1/sessions", json={"end_user_id": user}, headers=headers)
    assert status == 201, body
    sid = body["session_id"]
    await hook(live, emu, f"sessions/{sid}/start")
    assert (await status_of(live, sid, "active"))["status"] == "active"
    assert (await live.call("POST", f"/v1/sessions/{sid}/stop"))[0] == 202
    assert (await status_of(live, sid, "exported"))["status"] == "exported"
    return sid


def records(state_dir: Path) -> set[str]:
    return {p.stem for p in (state_dir / "sessions").glob("*.json")}


async def test_finished_session_files_are_bounded_and_keys_still_answer(
        emulator: Emulator, make_context: Callable[..., Context], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished session's file goes once it has left memory and no Idempotency-Key can ask for it (before:
    one file per session ever made, all read back by every restart)."""
    monkeypatch.setattr(session_manager, "FORGOTTEN_KEYS", 1)
    async with running(make_context, emulator, api={"max_sessions": 1}) as live:
        plain = [await finished(live, emulator, f"p{i}") for i in range(2)]
        keyed = [await finished(live, emulator, f"k{i}", key=f"key-{i}") for i in range(3)]
        # in memory: the newest; answered by key from its file: the one key remembered; nothing else
        assert set(live.ctl.manager.sessions) == {keyed[2]}
        assert records(tmp_path) == {keyed[1], keyed[2]}, (plain, keyed)
        status, again = await live.call("POST", "/v1/sessions", json={"end_user_id": "k1"},
                                        headers={"Idempotency-Key": "key-1"})
        assert status == 201 and again["session_id"] == keyed[1]


async def test_a_restart_keeps_the_newest_finished_sessions_in_memory(
        emulator: Emulator, make_context: Callable[..., Context], tmp_path: Path) -> None:
    """After a restart GET still answers for the session that ended last (before: the records were read in
    file-name order, so the finished sessions kept in memory were those whose random ids sort last)."""
    made: list[str] = []
    async with running(make_context, emulator, api={"max_sessions": 1}) as live:
        for i in range(12):  # until the newest does not have the greatest id: file-name order would drop it
            made.append(await finished(live, emulator, f"u{i}"))
            if len(made) > 1 and made[-1] < max(made):
                break
        assert made[-1] < max(made), made
    async with running(make_context, emulator, api={"max_sessions": 1}) as live:
        status, view = await live.call("GET", f"/v1/sessions/{made[-1]}")
        assert status == 200 and view["status"] == "exported", view
        assert set(live.ctl.manager.sessions) == {made[-1]}
    assert records(tmp_path) == {made[-1]}


async def test_sessions_ended_by_polling_leave_no_poll_notes(make_context: Callable[..., Context],
                                                             tmp_path: Path) -> None:
    """Sessions whose end only polling sees (their events go to an old connection) leave nothing behind in
    the poller (before: one note per such session, kept for the life of the process)."""
    emu = Emulator(scenario_file(tmp_path, cues(), end=1000), speed=3, api_key=API_KEY, autostart=False)
    await emu.start()
    try:
        made = []
        async with running(make_context, emu) as live:
            for user in ("a", "b", "c"):
                sid = (await live.call("POST", "/v1/sessions", json={"end_user_id": user}))[1]["session_id"]
                await hook(live, emu, f"sessions/{sid}/start")
                made.append(sid)
            for sid in made:
                assert (await status_of(live, sid, "active"))["status"] == "active"
                assert (await live.call("POST", f"/v1/sessions/{sid}/stop"))[0] == 202
        async with running(make_context, emu) as live:  # a new connection: only polling sees them end
            for sid in made:
                assert (await status_of(live, sid, "exported"))["status"] == "exported"
            assert live.ctl.manager._poll_seen == {}
    finally:
        await emu.stop()


async def test_create_intents_are_removed_once_their_token_expired(make_context: Callable[..., Context],
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A keyed create VideoDB answered with a 5xx leaves its intent for the retry (VideoDB may have made the
    session); a retry that never came left it for ever, one file per such create. Once the client token it
    noted has expired it is removed: while running (at the next create, at most hourly) and at a restart."""
    monkeypatch.setattr(session_store, "INTENT_SWEEP_EVERY", 0.0)
    emu = Emulator(scenario_file(tmp_path, cues(), end=1000), speed=10, api_key=API_KEY, autostart=False)
    await emu.start()
    intents = tmp_path / "sessions"

    async def failed_create(live: Live, key: str) -> None:
        emu.fault("POST", "/collection/default/capture/session", status=503, times=1)
        status, _ = await live.call("POST", "/v1/sessions", json={"end_user_id": key}, headers={"Idempotency-Key": key})
        assert status == 502 and len(list(intents.glob("*.creating"))) == 1
        expires = orjson.loads(next(intents.glob("*.creating")).read_bytes())["expires_at"]
        while iso_ts(time.time()) <= expires:  # until its token has expired
            await asyncio.sleep(0.05)

    try:
        async with running(make_context, emu, client_token_expires_in=1) as live:
            await failed_create(live, "a")
            status, _ = await live.call("POST", "/v1/sessions", json={"end_user_id": "b"},
                                        headers={"Idempotency-Key": "b"})
            assert status == 201  # its own note goes once its record is on disk, just after the answer
            await live.wait_for(lambda: not list(intents.glob("*.creating")), timeout=5)
            await failed_create(live, "c")
        async with running(make_context, emu, client_token_expires_in=1) as live:
            assert not list(intents.glob("*.creating"))
            status, made = await live.call("POST", "/v1/sessions", json={"end_user_id": "c"},
                                           headers={"Idempotency-Key": "c"})  # a late retry: a new session
            assert status == 201 and made["client_token"]
    finally:
        await emu.stop()


async def test_a_restart_with_many_saved_sessions_is_quick_and_indexes_only_live_streams(
        emulator: Emulator, make_context: Callable[..., Context], tmp_path: Path) -> None:
    """Every saved record goes through the eviction at a restart, which listed every session in memory each
    time (6,000 finished records, max_sessions 3,000: 4 s to start; 10,000 with the default 10,000, a minute),
    and the rtstreams of finished sessions were looked up again as if they could still send events."""
    saved = tmp_path / "sessions"  # what a long run's finished sessions left, as its store writes them
    saved.mkdir(mode=0o700)
    for i in range(6000):
        (saved / f"cap-{i:06d}.json").write_bytes(orjson.dumps({
            "session_id": f"cap-{i:06d}", "status": "exported", "end_user_id": "u", "metadata": {},
            "created_at": iso_ts(1_780_000_000 + i), "idempotency_key": f"key-{i}",
            "rtstreams": [{"rtstream_id": f"rts-{i}", "name": "mic", "media_types": ["audio"]}]}))
    looked = 0  # how often a session's `lifecycle.done` is read while the API starts: its work, not its time
    done = Lifecycle.done

    def counted(self: Lifecycle) -> bool:
        nonlocal looked
        looked += 1
        return bool(done.fget(self))  # type: ignore[misc]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Lifecycle, "done", property(counted))
        async with running(make_context, emulator, api={"max_sessions": 3000}) as live:
            at_start = looked
            mp.undo()
            m = live.ctl.manager
            assert len(m.sessions) == 3000 and min(m.sessions) == "cap-003000"  # the newest stay
            assert m.by_stream == {}
            status, old = await live.call("POST", "/v1/sessions", json={"end_user_id": "u"},
                                          headers={"Idempotency-Key": "key-1"})  # answered from its file
            assert status == 201 and old["session_id"] == "cap-000001"
    assert at_start < 60_000, at_start  # a few per record; before, every session in memory per record: ~9M


async def test_a_session_stopped_before_it_started_keeps_its_file_only_while_videodb_could_start_it(
        emulator: Emulator, make_context: Callable[..., Context], tmp_path: Path) -> None:
    """One stopped through the API before it started, then pushed out of memory (max_sessions): its file stays
    while VideoDB has it `created` (a desktop client could still start it; a lost create's lookup must know it is
    ours), and goes once VideoDB no longer has it. Before, nothing asked about it again, and a restart that pushed
    it out of memory at once never did either: its file stayed for ever."""
    api = {"max_sessions": 1, "silent_check_interval": 0.1}
    async with running(make_context, emulator, api=api) as live:
        keep = (await live.call("POST", "/v1/sessions", json={"end_user_id": "early"}))[1]["session_id"]
        assert (await live.call("POST", f"/v1/sessions/{keep}/stop"))[0] == 202
        gone = (await live.call("POST", "/v1/sessions", json={"end_user_id": "late"}))[1]["session_id"]
        assert (await live.call("POST", f"/v1/sessions/{gone}/stop"))[0] == 202
        keyed = {"json": {"end_user_id": "keyed"}, "headers": {"Idempotency-Key": "k-1"}}
        held = (await live.call("POST", "/v1/sessions", **keyed))[1]["session_id"]
        assert (await live.call("POST", f"/v1/sessions/{held}/stop"))[0] == 202
        await live.call("POST", "/v1/sessions", json={"end_user_id": "now"})  # pushes them out of memory
        assert not {keep, gone, held} & set(live.ctl.manager.sessions)
        emulator.registry.sessions.pop(gone)
        emulator.registry.sessions.pop(held)
        await live.wait_for(lambda: gone not in records(tmp_path), timeout=5)
        # its key is still answered from its file: the file stays, saying what became of it
        await live.wait_for(lambda: orjson.loads((tmp_path / "sessions" / f"{held}.json").read_bytes())
                            .get("status") == "failed", timeout=5)
        status, again = await live.call("POST", "/v1/sessions", **keyed)
        assert (status, again["session_id"], again["status"]) == (201, held, "failed"), again
        n = sum(c["path"].endswith(f"/{keep}") for c in emulator.calls)
        await live.wait_for(lambda: sum(c["path"].endswith(f"/{keep}") for c in emulator.calls) >= n + 2)
        assert keep in records(tmp_path)  # still `created` at VideoDB
    async with running(make_context, emulator, api=api) as live:  # the restart pushes it out of memory at once
        assert keep not in live.ctl.manager.sessions and keep in records(tmp_path)
        emulator.registry.sessions.pop(keep)
        await live.wait_for(lambda: keep not in records(tmp_path), timeout=5)


async def test_a_check_of_sessions_stopped_before_they_started_ends_at_the_first_call_past_its_deadline(
        emulator: Emulator, make_context: Callable[..., Context], monkeypatch: pytest.MonkeyPatch) -> None:
    """Such sessions out of memory, VideoDB answering get_capture_session after 1 s, the call deadline 0.3 s: the
    round stops after the first few calls, as the silent check's does (before: every one up to silent_check_max
    was asked, one deadline per 4 of them, 13 minutes for 50 at the real 60 s deadline, holding 4 of the SDK's
    few threads); those not asked come first in the next check."""
    from pipeline import videodb_sdk
    from stages.controller.silent_check import CONCURRENCY

    api = {"max_sessions": 1, "silent_check_interval": 60, "silent_check_max": 2 * CONCURRENCY}
    async with running(make_context, emulator, api=api) as live:
        for i in range(3 * CONCURRENCY + 1):  # each pushes the one before it out of memory
            sid = (await live.call("POST", "/v1/sessions", json={"end_user_id": f"u{i}"}))[1]["session_id"]
            assert (await live.call("POST", f"/v1/sessions/{sid}/stop"))[0] == 202
        shelf = live.ctl.manager.shelf
        shelved = list(shelf.ids)
        assert len(shelved) == 3 * CONCURRENCY
        monkeypatch.setattr(videodb_sdk, "CALL_DEADLINE", 0.3)
        emulator.fault("GET", "/capture/session/", delay=1.0, times=CONCURRENCY)
        start = len(emulator.calls)
        await shelf.check_once()
        asked = {c["path"].rsplit("/", 1)[1] for c in list(emulator.calls)[start:] if c["method"] == "GET"}
        assert asked == set(shelved[:CONCURRENCY]), asked  # only the first few: then it gave up for this round
        await shelf.check_once()
        asked2 = [c["path"].rsplit("/", 1)[1] for c in list(emulator.calls)[start:] if c["method"] == "GET"]
        assert set(asked2[CONCURRENCY:]) == set(shelved[CONCURRENCY:3 * CONCURRENCY]), asked2  # not asked: first
        assert set(shelf.ids) == set(shelved)  # still `created` at VideoDB: their files stay


async def shelve(live: Live, n: int) -> list[dict[str, str]]:
    """`n` sessions stopped before they started (their create answers), each pushing the one before it out of
    memory (max_sessions 1): the last one stays in memory."""
    made = []
    for i in range(n):
        body = (await live.call("POST", "/v1/sessions", json={"end_user_id": f"u{i}"}))[1]
        assert (await live.call("POST", f"/v1/sessions/{body['session_id']}/stop"))[0] == 202
        made.append(body)
    return made


async def test_the_shelf_of_sessions_stopped_before_they_started_is_bounded_and_loses_no_file(
        emulator: Emulator, make_context: Callable[..., Context], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """VideoDB keeps them `created` for ever: the shelf held every one (its id and tokens) for the rest of the run.
    Now it holds SHELF_MAX (3 here): the fourth pushes off the one whose tokens expire first, with one warning;
    its file stays (a restart with room shelves it again) and its tokens are no longer masked."""
    from pipeline import secrets
    from stages.controller import shelf as shelf_module

    monkeypatch.setattr(shelf_module, "SHELF_MAX", 3, raising=False)
    api = {"max_sessions": 1, "silent_check_interval": 60}
    async with running(make_context, emulator, api=api) as live:
        shelf = live.ctl.manager.shelf
        made = await shelve(live, 4)
        assert list(shelf.ids) == [m["session_id"] for m in made[:3]]
        assert not [r for r in caplog.records if "the most there may be" in r.getMessage()]
        made += await shelve(live, 1)  # pushes made[3] onto the full shelf
        off, kept = made[0], made[1:4]
        assert list(shelf.ids) == [m["session_id"] for m in kept]  # bounded: the one expiring first is off
        assert len(shelf.tokens) == 3
        assert not secrets.known(off["client_token"]) and all(secrets.known(m["client_token"]) for m in kept)
        warned = [r.getMessage() for r in caplog.records if "the most there may be" in r.getMessage()]
        assert len(warned) == 1 and "3 sessions stopped before they started" in warned[0], warned
        assert {m["session_id"] for m in made} <= records(tmp_path)  # no file lost
    monkeypatch.setattr(shelf_module, "SHELF_MAX", 10)
    async with running(make_context, emulator, api=api) as live:  # a restart with room shelves it again
        assert off["session_id"] in live.ctl.manager.shelf.ids and secrets.known(off["client_token"])


async def test_the_tokens_of_a_shelved_session_are_unmasked_once_they_expired(
        emulator: Emulator, make_context: Callable[..., Context]) -> None:
    """A session stopped before it started and out of memory, VideoDB still has it `created`: its client tokens
    stayed masked for the rest of the run though nobody could start it with them after they expired. Now the
    next check after `expires_at` unmasks them; the session stays shelved (its file still waits for VideoDB).
    Also for those a restart shelves as it reads them (their tokens are masked after that, as every record's)."""
    from pipeline import secrets

    api = {"max_sessions": 2, "silent_check_interval": 60}
    async with running(make_context, emulator, api=api, client_token_expires_in=1) as live:
        sid = (await live.call("POST", "/v1/sessions", json={"end_user_id": "on"}))[1]["session_id"]
        await hook(live, emulator, f"sessions/{sid}/start")  # live: it stays in memory
        assert (await status_of(live, sid, "active"))["status"] == "active"
        shelf = live.ctl.manager.shelf
        made = await shelve(live, 2)  # the second pushes the first out of memory
        first, second = made[0]["client_token"], made[1]["client_token"]
        assert list(shelf.ids) == [made[0]["session_id"]] and secrets.known(first)
        await shelf.check_once()
        assert secrets.known(first)  # not expired yet: a desktop client may still start it
        expires = iso_seconds(made[1]["expires_at"])
        assert expires is not None
        await asyncio.sleep(max(0.0, expires - time.time()) + 0.05)
        await shelf.check_once()
        assert not secrets.known(first) and made[0]["session_id"] in shelf.ids
    async with running(make_context, emulator, api={**api, "max_sessions": 1}) as live:  # only the live one stays
        shelf = live.ctl.manager.shelf
        assert [m["session_id"] for m in made] == list(shelf.ids)
        await shelf.check_once()
        assert not secrets.known(first) and not secrets.known(second)


class LoopLag:
    """The longest the event loop went without running this probe (every 2 ms asked), while in use."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.002)
            self.worst = max(self.worst, time.monotonic() - before)

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        await asyncio.sleep(0.01)  # a stall that has just ended is counted
        self._task.cancel()


def slow_disk(live: Live, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every record read from now on takes 0.5 s more (a slow or network disk); the ids read, as they finish."""
    store, read, done = live.ctl.manager.store, live.ctl.manager.store.load, []

    def load(sid: str) -> object:
        time.sleep(0.5)
        done.append(sid)
        return read(sid)

    monkeypatch.setattr(store, "load", load)
    return done


async def test_records_out_of_memory_are_read_off_the_event_loop(
        emulator: Emulator, make_context: Callable[..., Context], monkeypatch: pytest.MonkeyPatch) -> None:
    """Two more reads of a session's record once it left memory: when its Idempotency-Key is pushed out of those
    remembered (is it finished: its file goes), and when VideoDB says a shelved one can no longer start. Both
    read on the event loop, so a slow disk (or a record of megabytes) held every request and event meanwhile;
    now in a thread, one at a time."""
    monkeypatch.setattr(session_manager, "FORGOTTEN_KEYS", 1)
    api = {"max_sessions": 1, "silent_check_interval": 60}
    async with running(make_context, emulator, api=api) as live:
        m = live.ctl.manager
        made = []
        for key in ("k-a", "k-b"):  # each stopped before it started; b pushes a out of memory
            sid = (await live.call("POST", "/v1/sessions", json={"end_user_id": key},
                                   headers={"Idempotency-Key": key}))[1]["session_id"]
            assert (await live.call("POST", f"/v1/sessions/{sid}/stop"))[0] == 202
            made.append(sid)
        read = slow_disk(live, monkeypatch)
        async with LoopLag() as lag:  # c pushes b out of memory, and a's key out of those remembered
            assert (await live.call("POST", "/v1/sessions", json={"end_user_id": "c"}))[0] == 201
            await live.wait_for(lambda: read == [made[0]], timeout=3)
        assert lag.worst < 0.4, lag.worst  # a read takes 0.5 s
        assert list(m.forgotten_keys) == ["k-b"]
        emulator.registry.sessions.pop(made[1])
        async with LoopLag() as lag:
            for _ in range(2):  # missing twice: it can no longer start
                await m.shelf.check_once()
        assert lag.worst < 0.4, lag.worst  # a read takes 0.5 s
        assert read == made and made[1] not in m.shelf.ids
