"""The session API's smaller promises: per-session options, filters, counts and the 429/502/503 answers.

Real SDK against the emulator, real HTTP; the flows (many sessions, reconnects, kill -9) are in
test_session_api.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.api import Context
from pipeline.emulator import Emulator
from tests.test_session_api import TOKEN, cues, hook, running, session_calls
from tests.test_session_api import emulator as emulator  # the shared fixture
from tests.videodb_harness import API_KEY, scenario_file


def setup_calls(emu: Emulator, rtstream_ids: set[str]) -> list[str]:
    """The AI-pipeline calls made on these rtstreams, as `<kind>:<rtstream id>`."""
    out = []
    for c in emu.calls:
        parts = c["path"].split("/")
        if c["method"] == "POST" and len(parts) > 3 and parts[1] == "rtstream" and parts[2] in rtstream_ids:
            out.append(f"{parts[3]}:{parts[2]}")
    return out


async def test_per_session_on_active_and_metadata(emulator: Emulator, make_context: Callable[..., Context]) -> None:
    """`on_active` in a POST replaces the configured default for that session only; the configured
    `metadata` applies to every session, the request's keys added to it (and winning on a clash)."""
    emu = emulator
    async with running(make_context, emu, metadata={"app": "backend", "plan": "free"}) as live:
        status, own = await live.call("POST", "/v1/sessions", json={
            "end_user_id": "audio-only", "metadata": {"plan": "pro"}, "on_active": {"transcript": True}})
        assert status == 201, own
        status, dflt = await live.call("POST", "/v1/sessions", json={"end_user_id": "default"})
        assert status == 201, dflt
        sent = {c["body"]["end_user_id"]: c["body"].get("metadata") for c in session_calls(emu)}
        assert sent == {"audio-only": {"app": "backend", "plan": "pro"}, "default": {"app": "backend", "plan": "free"}}
        assert own["metadata"] == {"app": "backend", "plan": "pro"}
        for s in (own, dflt):
            await hook(live, emu, f"sessions/{s['session_id']}/start")
        mgr = live.ctl.manager

        def ids(s: dict[str, Any]) -> dict[str, str]:
            return {r["name"]: r["rtstream_id"] for r in mgr.get(s["session_id"]).record.get("rtstreams") or []}

        await live.wait_for(lambda: all(len(live.of(s["session_id"], "transcript")) >= 2 for s in (own, dflt))
                            and live.of(dflt["session_id"], "visual_index"))
        await asyncio.sleep(0.3)  # any index call for the audio-only session would have been made by now
        own_ids, dflt_ids = ids(own), ids(dflt)
        assert sorted(setup_calls(emu, set(own_ids.values()))) == sorted(
            f"transcription:{own_ids[n]}" for n in ("mic:default", "system_audio:default"))
        assert f"index:{dflt_ids['display:1']}" in setup_calls(emu, set(dflt_ids.values()))
        assert not live.of(own["session_id"], "visual_index")


async def test_status_filter_and_lifecycle_counts(emulator: Emulator, make_context: Callable[..., Context]) -> None:
    """`GET /v1/sessions?status=` filters; `events.capture_session` counts every lifecycle event of the
    session, also those that arrive before the create call has returned (`created`)."""
    emu = emulator
    async with running(make_context, emu) as live:
        a = (await live.call("POST", "/v1/sessions", json={"end_user_id": "a"}))[1]["session_id"]
        b = (await live.call("POST", "/v1/sessions", json={"end_user_id": "b"}))[1]["session_id"]
        await hook(live, emu, f"sessions/{a}/start")
        await live.wait_for(lambda: live.ctl.manager.get(a).lifecycle.state == "active")
        status, active = await live.call("GET", "/v1/sessions?status=active")
        assert status == 200 and [s["session_id"] for s in active["sessions"]] == [a] and active["count"] == 1
        status, created = await live.call("GET", "/v1/sessions?status=created")
        assert [s["session_id"] for s in created["sessions"]] == [b]
        assert (await live.call("GET", "/v1/sessions?status=exported"))[1] == {"sessions": [], "count": 0, "total": 0,
                                                                             "next_after": None}
        lifecycle = [e["event"] for e in live.of(a) if "event" in e]
        assert lifecycle[:3] == ["capture_session.created", "capture_session.starting", "capture_session.active"]
        _, one = await live.call("GET", f"/v1/sessions/{a}")
        assert one["events"]["capture_session"] == len(lifecycle)


async def test_max_sessions_is_429(emulator: Emulator, make_context: Callable[..., Context]) -> None:
    async with running(make_context, emulator, api={"max_sessions": 1}) as live:
        assert (await live.call("POST", "/v1/sessions", json={"end_user_id": "a"}))[0] == 201
        status, err = await live.call("POST", "/v1/sessions", json={"end_user_id": "b"})
        assert status == 429 and "api.max_sessions=1" in err["error"] and err["status"] == 429
        assert len(session_calls(emulator)) == 1


async def test_no_connection_yet_is_503(emulator: Emulator, make_context: Callable[..., Context]) -> None:
    async with running(make_context, emulator, ingest=False, connect_timeout=0.2) as live:
        status, err = await live.call("POST", "/v1/sessions", json={"end_user_id": "a"})
        assert status == 503 and "retry" in err["error"]
        assert session_calls(emulator) == []


async def test_a_failed_videodb_call_is_502_naming_the_call(tmp_path: Path,
                                                            make_context: Callable[..., Context]) -> None:
    emu = Emulator(scenario_file(tmp_path, cues(), end=1000), speed=10, api_key=API_KEY, autostart=False)
    await emu.start()
    try:
        async with running(make_context, emu) as live:
            await asyncio.wait_for(live.ctl.context.session.wait_connection(), 10)
            await emu.stop()  # VideoDB unreachable from now on
            status, err = await live.call("POST", "/v1/sessions", json={"end_user_id": "a"})
            assert status == 502 and "generate_client_token" in err["error"] and API_KEY not in err["error"]
            assert (await live.call("GET", "/v1/sessions"))[1]["count"] == 0
    finally:
        await emu.stop()


async def test_each_emulated_session_plays_on_its_own_clock(emulator: Emulator,
                                                            make_context: Callable[..., Context]) -> None:
    """A session started later plays the scenario from its beginning, not from where an earlier one is."""
    emu = emulator
    async with running(make_context, emu) as live:
        a = (await live.call("POST", "/v1/sessions", json={"end_user_id": "a"}))[1]["session_id"]
        b = (await live.call("POST", "/v1/sessions", json={"end_user_id": "b"}))[1]["session_id"]
        await hook(live, emu, f"sessions/{a}/start")
        await live.wait_for(lambda: len(live.of(a, "transcript")) == 4)  # a has played its whole scenario
        await asyncio.sleep(0.5)
        await hook(live, emu, f"sessions/{b}/start")
        await live.wait_for(lambda: len(live.of(b, "transcript")) == 4)
        texts = {sid: [e["data"]["text"] for e in live.of(sid, "transcript")] for sid in (a, b)}
        assert texts[a] == texts[b] == [f"mic {i}" for i in range(4)]
        first = {sid: live.of(sid, "transcript")[0]["data"]["start"] for sid in (a, b)}
        assert first[b] - first[a] >= 500  # event times count from b's own playback start, 0.5 s+ later


def test_enrich_keeps_names_and_sessions_apart_per_session(make_context: Callable[..., Context]) -> None:
    """Two users' sessions on one connection: the same stream names, different rtstream ids."""
    from stages.processors.enrich import Enrich, EnrichOptions

    def active(sid: str, rid: str) -> dict[str, Any]:
        return {"event": "capture_session.active", "capture_session_id": sid, "status": "active",
                "data": {"rtstreams": [{"rtstream_id": rid, "name": "mic:default", "media_types": ["audio"]}]}}

    e = Enrich(EnrichOptions(), make_context())
    out = e.process([active("cap-a", "rts-a"), active("cap-b", "rts-b"),
                     {"channel": "transcript", "rtstream_id": "rts-b", "data": {"text": "b"}},
                     {"channel": "transcript", "rtstream_id": "rts-a", "data": {"text": "a"}}])
    assert [(x["capture_session_id"], x["rtstream_name"]) for x in out[2:]] == [
        ("cap-b", "mic:default"), ("cap-a", "mic:default")]


async def test_a_failed_session_is_shown_and_the_pipeline_runs_on(tmp_path: Path,
                                                                 make_context: Callable[..., Context]) -> None:
    emu = Emulator(scenario_file(tmp_path, [*cues(2), {"at": 3, "event": "capture_session.failed",
                                                       "error": "screen permission revoked"}], end=1000),
                   speed=10, api_key=API_KEY, autostart=False)
    await emu.start()
    try:
        async with running(make_context, emu) as live:
            bad = (await live.call("POST", "/v1/sessions", json={"end_user_id": "a"}))[1]["session_id"]
            ok = (await live.call("POST", "/v1/sessions", json={"end_user_id": "b"}))[1]["session_id"]
            await hook(live, emu, f"sessions/{bad}/start")
            await live.wait_for(lambda: live.ctl.manager.get(bad).lifecycle.state == "failed")
            status, shown = await live.call("GET", f"/v1/sessions/{bad}")
            assert status == 200 and shown["status"] == "failed" and "screen permission revoked" in shown["error"]
            assert not live.ctl.context.session.exit_requested and not live.ingest.done()  # no exit code 3 here
            await hook(live, emu, f"sessions/{ok}/start")  # the next user's session still works
            await live.wait_for(lambda: len(live.of(ok, "transcript")) == 2)
    finally:
        await emu.stop()


def test_api_config_errors_are_one_line_each(tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg = tmp_path / "api.yaml"
    cfg.write_text("""name: api
videodb: {api_key: k-test-0123456789}
source: {type: videodb}
controller:
  type: capture_session
  session_id: cap-1
  status_poll_interval: 0
  api: {listen: "localhost", token: short, max_body_bytes: 10}
sinks: [{type: console}]
""")
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", str(cfg)], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    lines = res.stderr.splitlines()
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    for needle in ("controller.api.listen: expected host:port", "controller.api.token: use a token of at least 16",
                   "controller.api.max_body_bytes: expected a number >= 1024",
                   "controller.status_poll_interval: expected a number > 0"):  # 0: 1,000 listings a second
        assert sum(needle in line for line in lines) == 1, (needle, lines)
    assert "short" not in res.stderr  # the token is a secret, even a bad one
    cfg.write_text(cfg.read_text().replace('listen: "localhost", token: short, max_body_bytes: 10',
                                           "token: api-token-0123456789").replace("status_poll_interval: 0", ""))
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", str(cfg)], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert res.returncode == 2 and "session_id and api exclude each other" in res.stderr, res.stderr


async def test_a_replayed_create_says_so_in_a_header(emulator: Emulator, make_context: Callable[..., Context]) -> None:
    async with running(make_context, emulator) as live:
        hdr = {"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": "k-1"}
        seen = []
        for _ in range(2):
            async with live.http.post(f"{live.url}/v1/sessions", json={"end_user_id": "a"}, headers=hdr) as r:
                seen.append((r.status, r.headers.get("Idempotent-Replayed"), r.content_type))
        assert seen == [(201, None, "application/json"), (201, "true", "application/json")]


async def test_a_failed_token_call_leaves_no_orphan_session(emulator: Emulator,
                                                            make_context: Callable[..., Context]) -> None:
    """The client token does not depend on the session: asked for first, its failure creates nothing, so a
    retry with the same Idempotency-Key makes exactly one session (before: one orphan at VideoDB per try)."""
    async with running(make_context, emulator) as live:
        mgr, opts = live.ctl.manager, live.ctl.options
        mgr.opts = opts.model_copy(update={"client_token_expires_in": 0})  # VideoDB refuses the token call (400)
        hdr = {"Idempotency-Key": "retry-me"}
        status, err = await live.call("POST", "/v1/sessions", json={"end_user_id": "a"}, headers=hdr)
        assert status == 502 and "generate_client_token" in err["error"]
        assert session_calls(emulator) == []
        mgr.opts = opts
        status, made = await live.call("POST", "/v1/sessions", json={"end_user_id": "a"}, headers=hdr)
        assert status == 201 and made["client_token"].startswith("ct-")
        assert len(session_calls(emulator)) == 1


async def test_an_idempotency_key_outlives_its_session_in_memory(emulator: Emulator,
                                                                  make_context: Callable[..., Context]) -> None:
    """A finished session beyond max_sessions leaves memory; a late retry of its POST still gets it, from its
    file (before: a second capture session at VideoDB, or 429 once the live sessions filled the limit)."""
    async with running(make_context, emulator, api={"max_sessions": 1}) as live:
        body, hdr = {"end_user_id": "a"}, {"Idempotency-Key": "late-retry"}
        status, a = await live.call("POST", "/v1/sessions", json=body, headers=hdr)
        assert status == 201
        path = f"/v1/sessions/{a['session_id']}"

        async def reaches(status: str) -> None:
            for _ in range(200):
                if (await live.call("GET", path))[1]["status"] == status:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(f"session a is not {status}: {(await live.call('GET', path))[1]}")

        await hook(live, emulator, f"sessions/{a['session_id']}/start")  # the desktop client starts it
        await reaches("active")
        assert (await live.call("POST", f"{path}/stop"))[0] == 202
        await reaches("exported")
        assert (await live.call("POST", "/v1/sessions", json={"end_user_id": "b"}))[0] == 201  # a leaves memory
        assert a["session_id"] not in live.ctl.manager.sessions
        async with live.http.post(live.url + "/v1/sessions", json=body,
                                  headers={**hdr, "Authorization": f"Bearer {TOKEN}"}) as r:
            again = await r.json()
            assert r.status == 201 and r.headers.get("Idempotent-Replayed") == "true", again
        assert again["session_id"] == a["session_id"] and again["client_token"] == a["client_token"]
        assert again["status"] == "exported"
        assert len(session_calls(emulator)) == 2
        status, err = await live.call("POST", "/v1/sessions", json={"end_user_id": "z"}, headers=hdr)
        assert status == 409 and "different request body" in err["error"]



async def test_a_replayed_key_read_from_a_slow_disk_leaves_the_loop_free(
        emulator: Emulator, make_context: Callable[..., Context], monkeypatch: Any) -> None:
    """A keyed session out of memory, its record on a disk that takes 0.5 s to read (network storage, a busy
    disk): the retry of its create is answered from the file read in a thread, and the event loop (every other
    request, every event) runs on meanwhile (before: the read ran on the loop and held all of it)."""
    import time

    async with running(make_context, emulator, api={"max_sessions": 1}) as live:
        body, hdr = {"end_user_id": "a"}, {"Idempotency-Key": "slow-retry"}
        status, a = await live.call("POST", "/v1/sessions", json=body, headers=hdr)
        assert status == 201
        sid = a["session_id"]
        assert (await live.call("POST", f"/v1/sessions/{sid}/stop"))[0] == 202  # before it started
        status, b = await live.call("POST", "/v1/sessions", json={"end_user_id": "b"})  # a leaves memory
        assert status == 201
        m = live.ctl.manager
        assert sid not in m.sessions and m.forgotten_keys["slow-retry"] == sid
        read = m.store.load

        def slow_load(session_id: str) -> Any:
            time.sleep(0.5)  # the disk is slow: the real read follows
            return read(session_id)

        monkeypatch.setattr(m.store, "load", slow_load)
        began = time.monotonic()
        replay = asyncio.create_task(live.call("POST", "/v1/sessions", json=body, headers=hdr))
        await asyncio.sleep(0.05)  # the replay is reading the file
        assert (await live.call("GET", f"/v1/sessions/{b['session_id']}"))[0] == 200
        assert time.monotonic() - began < 0.45  # answered while the read (0.5 s) goes on
        assert not replay.done()
        status, again = await replay
        assert (status, again["session_id"], again["client_token"]) == (201, sid, a["client_token"])
        # its file gone (the shelf dropped it): two retries at once make one new session, whichever read first;
        # the other, its read done after that create, is answered with it (not a second one)
        m.store.drop(sid)
        assert (await live.call("POST", f"/v1/sessions/{b['session_id']}/stop"))[0] == 202  # room for one
        made = len(session_calls(emulator))
        answers = await asyncio.gather(*(live.call("POST", "/v1/sessions", json=body, headers=hdr) for _ in range(2)))
        assert [status for status, _ in answers] == [201, 201], answers
        assert answers[0][1]["session_id"] == answers[1][1]["session_id"] != sid
        assert len(session_calls(emulator)) == made + 1
