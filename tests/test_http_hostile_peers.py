"""The operator endpoint against hostile peers: guessed tokens, bytes that are not UTF-8, odd methods."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import aiohttp
import pytest

from pipeline.http import pace
from pipeline.http.guard import SignInGuard
from tests.operator_harness import config, replay_file, served

TOKEN = "s3cret-token"


async def raw(base: str, request: bytes, wait: float = 5) -> bytes:
    """What the server answers `request` (sent as these bytes) before it closes the connection, or within
    `wait` seconds."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    got = b""
    try:
        async with asyncio.timeout(wait):
            while chunk := await reader.read(65536):
                got += chunk
    except TimeoutError:
        pass
    writer.close()
    return got


@pytest.mark.parametrize("header", [b"Authorization: Bearer \xff\xfe", b"Cookie: videodb_pipeline_session=\xff\xfe"])
async def test_credentials_that_are_not_utf8_are_refused_not_a_traceback(
        tmp_path: Path, header: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """A token or cookie holding bytes that are not UTF-8 made the comparison raise: a 500, and an ERROR with
    a 15-line traceback in the pipeline's log for every such request from anyone who reaches the port."""
    events = replay_file(tmp_path / "in.jsonl", 10)
    async with served(config(tmp_path, events, extra_runtime=f", http_token: {TOKEN}")) as (_rt, base):
        with caplog.at_level(logging.DEBUG):
            answer = await raw(base, b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n" + header
                               + b"\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def as_peer(address: str) -> aiohttp.ClientSession:
    """A client whose connections come from `address` (any 127.x.y.z reaches a loopback server on Linux)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))


async def sign_in(http: aiohttp.ClientSession, base: str, token: str) -> tuple[int, str | None]:
    async with http.post(base + "/login", data={"token": token}, allow_redirects=False) as r:
        await r.read()
        return r.status, r.headers.get("Retry-After")


async def status(http: aiohttp.ClientSession, base: str, token: str) -> tuple[int, str | None]:
    async with http.get(base + "/api/status", headers={"Authorization": f"Bearer {token}"}) as r:
        await r.read()
        return r.status, r.headers.get("Retry-After")


async def test_guessing_the_token_is_slowed_to_ten_tries_a_minute_per_address(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """/login and the bearer token took wrong guesses as fast as a client sent them (4,452 a second from one
    address): a short token fell in hours. An address now gets 10 wrong tokens a minute, then 429 with
    Retry-After, also for the right token (answered before it is looked at, so a right guess tells nothing).
    Other addresses, and right tokens, are not affected. The log says so once, not once per refusal."""
    events = replay_file(tmp_path / "in.jsonl", 10)
    cfg = config(tmp_path, events, extra_runtime=f", http_token: {TOKEN}")
    async with served(cfg) as (rt, base), as_peer("127.0.0.2") as guesser, as_peer("127.0.0.3") as user:
        for _ in range(10):
            assert await sign_in(user, base, TOKEN) == (303, None)  # right tokens cost nothing
            assert await status(user, base, TOKEN) == (200, None)
        for i in range(10):
            guess = sign_in if i % 2 else status
            assert (await guess(guesser, base, f"guess-{i}"))[0] == 401
        for guess in (sign_in, status):
            for token in ("guess-10", TOKEN):
                code, retry = await guess(guesser, base, token)
                assert code == 429 and retry is not None and 1 <= int(retry) <= 60, (code, retry)
        assert await sign_in(user, base, TOKEN) == (303, None)
        assert await sign_in(user, base, "typo") == (401, None)
        later = time.monotonic() + int(retry)  # one try is given back after Retry-After
        rt.http_server.guard.clock = lambda: later
        assert await sign_in(guesser, base, TOKEN) == (303, None)
        assert (await status(guesser, base, "guess-11"))[0] == 401
        assert (await status(guesser, base, TOKEN))[0] == 429
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "too many wrong tokens (latest from 127.0.0.2" in warnings[0], warnings


def test_the_table_of_addresses_stays_bounded_and_so_do_their_guesses() -> None:
    """One entry per address guessing would grow without bound under many source addresses (an IPv6 /64
    holds 2^64): at most MAX_PEERS are kept; beyond, new addresses share one allowance, so a guesser with
    20,000 addresses gets no more tries than MAX_PEERS + 1 addresses would. An address whose allowance is
    whole again is forgotten, and its place goes to the next."""
    now = [0.0]
    guard = SignInGuard(attempts=3, window=60, max_peers=100, clock=lambda: now[0])
    allowed = 0
    for i in range(20_000):
        address = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        for _ in range(5):
            if not guard.retry_after(address):
                allowed += 1
                guard.failed(address)
    assert len(guard) <= 101 and allowed == 101 * 3, (len(guard), allowed)
    now[0] += 60
    assert not guard.retry_after("192.0.2.1")
    guard.failed("192.0.2.1")
    assert len(guard) == 1
    for i in range(3):  # an IPv6 host picks any address of its /64: they share one allowance
        guard.failed(f"2001:db8::{i:x}")
    assert guard.retry_after("2001:db8::ffff:1") and not guard.retry_after("2001:db8:0:1::1")


async def test_head_on_the_tap_is_headers_only(tmp_path: Path) -> None:
    """HEAD /tap streamed events after its headers (3 MB in 17 s; a response to HEAD has no body: a proxy
    reads them as its next answer), and each such request took one of the 16 tap places while it lasted."""
    events = replay_file(tmp_path / "in.jsonl", 10)
    async with served(config(tmp_path, events, extra_runtime=f", http_token: {TOKEN}")) as (rt, base):
        answer = await raw(base, b"HEAD /tap HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + TOKEN.encode()
                           + b"\r\n\r\nGET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", wait=2)
        assert rt.tap_hub.client_count == 0
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in head, answer[:300]
    assert rest.startswith(b"HTTP/1.1 200 ") and b'{"status":"ok",' in rest and rest.endswith(b"}"), rest[:300]


async def test_requests_take_their_turn_so_the_pipeline_comes_first(tmp_path: Path) -> None:
    """Each answer costs the pipeline's event loop about 70 µs, and /healthz, /metrics and 404s are open: eight
    clients asking back to back took 80% of the loop (a 300,000-event replay ran 1.74 s instead of 0.98 s).
    Requests now wait their turn, all clients together (RATE a second after a burst of BURST): 8 connections
    asking BURST + RATE * 0.6 times take 0.6 s at least (they took 0.1 s); every request is still answered."""
    events = replay_file(tmp_path / "in.jsonl", 10)
    n = int(pace.BURST + pace.RATE * 0.6)
    connector = aiohttp.TCPConnector(limit=8)
    async with served(config(tmp_path, events)) as (_rt, base), aiohttp.ClientSession(connector=connector) as http:
        codes: list[int] = []

        async def ask(path: str) -> None:
            async with http.get(base + path) as r:
                await r.read()
                codes.append(r.status)

        t0 = time.monotonic()
        await asyncio.gather(*(ask("/healthz" if i % 2 else f"/nothing-{i}") for i in range(n)))
        took = time.monotonic() - t0
    assert sorted(set(codes)) == [200, 404] and len(codes) == n
    assert took >= 0.6 * 0.95, took


async def test_the_sign_in_cookie_ends_and_cannot_be_made_to_last(tmp_path: Path) -> None:
    """The cookie was a fixed hash of the token, without Max-Age: one copied from a browser opened the
    meeting's content for as long as the token stayed. It now ends (Max-Age, and the end it carries, signed)."""
    import hashlib
    import hmac

    from pipeline.http.cookie import COOKIE, TTL, SignInCookie

    events = replay_file(tmp_path / "in.jsonl", 10)
    async with served(config(tmp_path, events, extra_runtime=f", http_token: {TOKEN}")) as (_rt, base), \
            aiohttp.ClientSession() as http:
        async with http.post(base + "/login", data={"token": TOKEN}, allow_redirects=False) as r:
            assert r.status == 303
            given = r.cookies[COOKIE]
        assert given["max-age"] == str(TTL) and given["httponly"]

        async def with_cookie(value: str) -> int:
            async with http.get(base + "/api/status", headers={"Cookie": f"{COOKIE}={value}"}) as resp:
                return resp.status

        assert await with_cookie(given.value) == 200
        ends, signature = given.value.split(".")
        assert abs(int(ends) - time.time() - TTL) < 60
        old_style = hmac.new(TOKEN.encode(), b"status-page", hashlib.sha256).hexdigest()
        ended = SignInCookie(TOKEN, clock=lambda: time.time() - TTL - 1).make()
        other_token = SignInCookie(TOKEN + "x").make()
        for value in (old_style, ended, f"{int(ends) + 10**6}.{signature}", other_token, f"{ends}.", "."):
            assert await with_cookie(value) == 401, value


async def test_requests_whose_clients_leave_while_waiting_give_their_turn_back() -> None:
    """A request waiting its turn took it for good: a client opening a connection, asking and closing it in a
    loop (its waiting request is cancelled) built a debt of turns that every later request paid, /healthz and
    Prometheus too (500 such requests at 100 a second: the next one waited 5 s). Now the turn goes back."""
    from aiohttp import web

    pacer = pace.Pacer(rate=100, burst=1)

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response()

    waiting = [asyncio.ensure_future(pacer.middleware(None, handler)) for _ in range(500)]  # type: ignore[arg-type]
    await asyncio.sleep(0)  # each has taken its turn and waits for it
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert pacer.wait() < 0.05
