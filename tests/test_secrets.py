"""Masking secrets in log lines: the same text hidden as the plain definition, at a cost that does not grow
with the number of secrets (one client token per live capture session with the session API)."""

from __future__ import annotations

import asyncio
import os
import secrets as random_tokens
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import secrets
from pipeline.api import Context
from pipeline.emulator import Emulator
from tests.test_session_api import emulator as emulator  # the shared fixture
from tests.test_session_api import hook, running


@pytest.fixture(autouse=True)
def no_secrets() -> Iterator[None]:
    saved = {k: {n: set(v) if isinstance(v, set) else v for n, v in g.items()} for k, g in secrets._by_tail.items()}
    secrets._by_tail.clear()
    yield
    secrets._by_tail.clear()
    secrets._by_tail.update(saved)


def plainly_masked(text: str, known: set[str]) -> str:
    """The definition: every character inside an occurrence of a secret is hidden, each run of overlapping
    occurrences (touching ones are two runs) replaced by one MASK."""
    spans = sorted((i, i + len(s)) for s in known for i in range(len(text)) if text.startswith(s, i))
    runs: list[list[int]] = []
    for start, end in spans:
        if runs and start < runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], end)
        else:
            runs.append([start, end])
    out, done = "", 0
    for start, end in runs:  # a URL path keeps its slash
        out += text[done:start] + ("/" if text[start] == "/" else "") + secrets.MASK
        done = end
    return out + text[done:]


ALPHABET = "abXY-/"  # few letters: secrets overlap, nest and repeat in the texts
words = st.text(ALPHABET, min_size=4, max_size=9)


@settings(max_examples=400, deadline=None)
@given(st.sets(words, max_size=6), st.lists(st.one_of(words, st.text(ALPHABET, max_size=5)), max_size=8))
def test_masking_hides_what_the_plain_definition_hides(known: set[str], parts: list[str]) -> None:
    secrets._by_tail.clear()
    for s in known:
        secrets.register(s)
    text = "".join(parts)
    assert secrets.mask(text) == plainly_masked(text, known)


def test_forget_stops_masking_one_secret_only() -> None:
    secrets.register("ct-token-one")
    secrets.register("xx-token-one")  # same last characters
    secrets.forget("ct-token-one")
    assert not secrets.known("ct-token-one") and secrets.known("xx-token-one")
    assert secrets.mask("ct-token-one xx-token-one") == "ct-token-one ***"
    secrets.forget("xx-token-one")
    secrets.forget("never-registered")
    assert secrets._by_tail == {}


def test_secrets_sharing_end_and_length_come_and_go_one_by_one() -> None:
    """The one secret of an end and length is kept bare (nothing for the garbage collector), several in a set:
    each step between the two keeps exactly the registered ones masked, never a part or a neighbour of one."""
    a, b, c = "aaaa-same-end", "bbbb-same-end", "cccc-same-end"
    secrets.register(a)
    secrets.register(a)  # twice: still one
    assert secrets.mask(f"{a} {b} same-end aaaa-same-en") == f"*** {b} same-end aaaa-same-en"
    for s in (b, c):
        secrets.register(s)
    assert secrets.mask(f"{a}|{b}|{c}") == "***|***|***"
    secrets.forget(b)
    assert secrets.mask(f"{a}|{b}|{c}") == f"***|{b}|***"
    secrets.forget(a)  # one left: kept bare again
    assert not secrets.known(a) and secrets.known(c) and secrets.mask(f"{a}|{c}") == f"{a}|***"
    secrets.register(b)
    assert secrets.mask(f"{a}|{b}|{c}") == f"{a}|***|***"
    for s in (b, c, c):
        secrets.forget(s)
    assert secrets._by_tail == {} and secrets.mask(f"{a}|{b}|{c}") == f"{a}|{b}|{c}"


def test_thousands_of_client_tokens_cost_their_own_size_to_remember() -> None:
    """Each register() compiled a regex of every secret so far, and `re` kept up to 512 of them: 1,000 client
    tokens took over 30 MB (and the time grew with the square of their number; 2,000 sessions made through the
    session API cost 178 KB each in the benchmark instead of 30)."""
    tokens = ["ct-" + random_tokens.token_urlsafe(24) for _ in range(1000)]
    tracemalloc.start()
    try:
        for t in tokens:
            secrets.register(t)
        grown, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert grown < 1_000_000, grown  # ~ 1,000 x (a 35-character str and its set slot); before: 117 MB, 90 s
    line = f"capture session cap-1 started with {tokens[500]} on ws-2"
    assert secrets.mask(line) == "capture session cap-1 started with *** on ws-2"


async def test_a_session_api_token_is_masked_while_its_session_lives(
        emulator: Emulator, make_context: Callable[..., Context]) -> None:
    """Real SDK against the emulator: every client token was masked for the rest of the run, so a long run's
    masking grew with every session it ever made. Now those of an ended session are forgotten."""
    async with running(make_context, emulator) as live:
        answer = (await live.call("POST", "/v1/sessions", json={"end_user_id": "u"}))[1]
        sid, first = answer["session_id"], answer["client_token"]
        assert secrets.known(first)
        second = (await live.call("POST", f"/v1/sessions/{sid}/token"))[1]["client_token"]
        assert secrets.known(second) and secrets.known(first)  # the first is still valid at VideoDB
        await hook(live, emulator, f"sessions/{sid}/start")
        await live.wait_for(lambda: live.ctl.manager.get(sid).lifecycle.state == "active", timeout=10)
        assert secrets.known(second)
        assert (await live.call("POST", f"/v1/sessions/{sid}/stop"))[0] == 202
        await live.wait_for(lambda: live.ctl.manager.get(sid).lifecycle.done, timeout=10)
        assert not secrets.known(second) and not secrets.known(first)


async def test_every_token_handed_out_for_a_live_session_stays_masked(
        emulator: Emulator, make_context: Callable[..., Context]) -> None:
    """Two rotations at once: the token the first one handed out was forgotten by the second (it replaced it),
    though the client that got it could use it until it expired, and log it unmasked. Now the replaced ones
    stay masked, the last EARLIER_TOKENS of them (a restart's too), until the session ends."""
    from stages.controller.session_tokens import EARLIER_TOKENS

    async with running(make_context, emulator) as live:
        answer = (await live.call("POST", "/v1/sessions", json={"end_user_id": "u"}))[1]
        sid, first = answer["session_id"], answer["client_token"]
        both = await asyncio.gather(*(live.call("POST", f"/v1/sessions/{sid}/token") for _ in range(2)))
        handed = [first] + [body["client_token"] for status, body in both if status == 200]
        assert len(set(handed)) == 3, both
        assert [secrets.known(t) for t in handed] == [True] * 3
        for _ in range(EARLIER_TOKENS):  # bounded: the oldest are dropped
            handed.append((await live.call("POST", f"/v1/sessions/{sid}/token"))[1]["client_token"])

        def masked() -> bool:
            """The two oldest are dropped: the first and whichever of the two concurrent rotations came first."""
            known = [secrets.known(t) for t in handed]
            return not known[0] and sorted(known[1:3]) == [False, True] and known[3:] == [True] * EARLIER_TOKENS

        assert masked(), [secrets.known(t) for t in handed]
    for token in handed:
        secrets.forget(token)  # a new process: nothing it has not registered itself is masked
    async with running(make_context, emulator):
        assert masked(), [secrets.known(t) for t in handed]


@pytest.mark.parametrize("line", ["@" + "a" * 200_000, "x@y " + "ab1" * 70_000 + ":/"])
def test_masking_a_huge_line_with_an_at_sign_stays_linear(line: str) -> None:
    """The user-part pattern tried every letter of a long run as a URL scheme's start, each scanning to the
    run's end: 200,000 letters and an "@" took about 40 s (a 1 MB line, many minutes)."""
    began = time.perf_counter()
    assert secrets.mask(line) == line
    assert time.perf_counter() - began < 1.0
    long_scheme = "s" * 40 + "://user:pw@host"
    assert secrets.mask(long_scheme) == "s" * 40 + "://***@host"


def test_a_secret_too_short_to_mask_is_said_once_not_left_shown_silently(tmp_path: Path) -> None:
    """A `${...TOKEN}` of fewer than 4 characters was shown everywhere it was used without a word (the
    README promises such values are masked); now one warning names the place, never the value."""
    (tmp_path / "in.jsonl").write_text("")
    cfg = tmp_path / "p.yaml"
    cfg.write_text("name: p\nsource: {type: replay, path: in.jsonl}\n"
                   "sinks:\n  - {type: jsonl, path: \"o-${OUT_TOKEN}.jsonl\"}\n")
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", str(cfg)], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path, env={**os.environ, "OUT_TOKEN": "q9"})
    assert res.returncode == 0, res.stderr
    [line] = [x for x in res.stderr.splitlines() if "OUT_TOKEN" in x]
    assert line.endswith("p.yaml:4:25: ${OUT_TOKEN}: shorter than 4 characters, so it is not masked in logs "
                         "and errors") and "q9" not in line, line


def test_thousands_of_tokens_sharing_their_end_cost_one_lookup_where_it_occurs() -> None:
    """Tokens with a fixed suffix were each compared wherever that suffix occurs: 10,000 of them took 2 s to
    mask a 10 KB line holding it 2,000 times."""
    tokens = ["ct-" + random_tokens.token_urlsafe(18) + "_live" for _ in range(10_000)]
    for t in tokens:
        secrets.register(t)
    line = "x " + "key_live " * 2000 + tokens[7]
    began = time.perf_counter()
    assert secrets.mask(line) == "x " + "key_live " * 2000 + "***"
    assert time.perf_counter() - began < 0.5


async def test_the_tokens_of_a_session_stopped_before_it_started_stay_masked_while_it_can_start(
        emulator: Emulator, make_context: Callable[..., Context]) -> None:
    """Stopped through the API before it started, then pushed out of memory (or read back by a restart): VideoDB
    still has it `created` and a desktop client may start it with its token, which was no longer masked. Now it
    is, until VideoDB says the session can no longer start."""
    async with running(make_context, emulator, api={"max_sessions": 1, "silent_check_interval": 60}) as live:
        made = (await live.call("POST", "/v1/sessions", json={"end_user_id": "u0"}))[1]
        sid, first = made["session_id"], made["client_token"]
        second = (await live.call("POST", f"/v1/sessions/{sid}/token"))[1]["client_token"]
        assert (await live.call("POST", f"/v1/sessions/{sid}/stop"))[0] == 202
        assert (await live.call("POST", "/v1/sessions", json={"end_user_id": "u1"}))[0] == 201
        assert sid in live.ctl.manager.shelf.ids and sid not in live.ctl.manager.sessions
        assert secrets.known(first) and secrets.known(second)
        emulator.registry.sessions.pop(sid)
        for _ in range(2):  # missing twice: it can no longer start
            await live.ctl.manager.shelf.check_once()
        assert sid not in live.ctl.manager.shelf.ids
        assert not secrets.known(first) and not secrets.known(second)
    async with running(make_context, emulator, api={"max_sessions": 5}) as live:  # one stopped, read back
        made = (await live.call("POST", "/v1/sessions", json={"end_user_id": "u2"}))[1]
        assert (await live.call("POST", f"/v1/sessions/{made['session_id']}/stop"))[0] == 202
    secrets.forget(made["client_token"])
    async with running(make_context, emulator, api={"max_sessions": 5}) as live:
        assert not live.ctl.manager.get(made["session_id"]).live
        assert secrets.known(made["client_token"])


async def test_a_failed_calls_error_is_masked_once_and_a_short_api_key_does_not_cut_its_words(
        emulator: Emulator) -> None:
    """The error line of a failed SDK call: a key VideoDB echoes is masked, the line read as it was written. A key
    shorter than 4 characters is not masked (as everywhere else): replacing it turned the emulator's 401 into
    "list_capture_sessions fail***: authentication fail***" for a key "ed"."""
    from pipeline.videodb_sdk import VideoDBCallError, VideoDBSettings, call, connect

    async def error(key: str) -> str:
        conn = connect(VideoDBSettings.resolve({"videodb": {"api_key": key, "base_url": emulator.base_url}}), "t")
        with pytest.raises(VideoDBCallError) as err:
            await call("t", "list_capture_sessions", conn.list_capture_sessions, api_key=key)
        return str(err.value)

    assert await error("ed") == ("t: list_capture_sessions failed: authentication failed (HTTP 401: Unauthorized: "
                                 "invalid API key); check videodb.api_key")
    emulator.fault("GET", "/capture/session", status=500, body='{"message": "bad key sk-echoed-0123 given"}')
    assert "sk-echoed-0123" not in (line := await error("sk-echoed-0123")) and "bad key *** given" in line, line
