"""The operator endpoint: an aiohttp server in the pipeline's own event loop.

/metrics, /healthz and /ready are open (no meeting content). /tap, the status page
and its /api/status carry screen text, speech and alerts, so they need the bearer
token when one is configured, and are refused on a non-loopback address without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import hmac
import logging
import struct
import termios
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from pipeline.channels import known_channels, unknown_channel
from pipeline.http import listener
from pipeline.http.cookie import COOKIE, SignInCookie
from pipeline.http.guard import SignInGuard
from pipeline.http.metrics import exposition, registry_for
from pipeline.http.pace import Pacer
from pipeline.http.peer_log import PeerErrorLogger
from pipeline.http.tap import TapBudget, TapClient, TapError, TapHub
from pipeline.http.view import View
from pipeline.net import is_loopback

log = logging.getLogger("pipeline.http")
STATIC = Path(__file__).parent / "static"
KEEPALIVE = 15.0  # seconds between SSE comments on an idle tap
COALESCE = 0.01  # after a wake-up, gather this long: fewer, larger writes when events flow fast
HEARTBEAT = 0.5  # seconds between event-loop heartbeats (for /healthz)
UNHEALTHY_AFTER = 5.0  # loop late by this much: /healthz answers 503
MAX_LIMIT = 1_000_000
MAX_TAP_CLIENTS = 16  # each one costs serialization per batch: a bound a peer cannot raise
#: a connection with no request under way is closed after this long (aiohttp's default is an hour: idle or
#: never-finished connections would each hold a file descriptor of the pipeline for that long)
IDLE_TIMEOUT = 15.0
#: open connections at once (Prometheus, a few taps and browsers); more get 503: each costs a file descriptor, and
#: /metrics is open to anyone who reaches the port
MAX_CONNECTIONS = 64
#: at a stop, how long a request under way may take to finish (a tap stream sends its `end` at once), then as long
#: again for it to be cancelled: a peer that stopped reading held each of them for aiohttp's 2 s given before
STOP_GRACE = 0.25
#: a tap client none of whose bytes went out for this long stopped reading (a laptop gone to sleep): it is let go,
#: or it would hold one of the MAX_TAP_CLIENTS places until the pipeline ends (`pipeline tap` gives up after 60 s)
STALLED_WRITE = 60.0
#: Share of the pipeline's time /metrics may take (a scrape costs the event loop most of a millisecond, and the
#: endpoint is open to anyone who reaches the port); beyond it scrapes are answered 429. Prometheus every few
#: seconds, or a dashboard every second, never come near it.
SCRAPE_SHARE = 0.05
SCRAPE_BURST = 0.05  # seconds of it that may be saved up


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body, default=str), status=status, content_type="application/json")


class OperatorServer:
    """Serves one pipeline's view; `start()` binds, `stop()` ends every tap stream and closes."""

    def __init__(self, view: View, hub: TapHub, host: str, port: int, token: str | None) -> None:
        self.view = view
        self.hub = hub
        self.host = host
        self.port = port
        self.token = token
        self.registry = registry_for(view)
        self.scrape_budget = TapBudget(SCRAPE_SHARE, SCRAPE_BURST)
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._closing = asyncio.Event()
        self._heartbeat: asyncio.Task[None] | None = None
        self._cookie = SignInCookie(token) if token else None
        self.guard = SignInGuard()
        self.pacer = Pacer()
        self._token_digest = _digest(token or "")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4096, middlewares=[self.pacer.middleware])
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/tap", self.tap)
        app.router.add_get("/api/status", self.status)
        app.router.add_get("/", self.page)
        app.router.add_post("/login", self.login)
        app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=STOP_GRACE,
                                      handler_cancellation=True, keepalive_timeout=IDLE_TIMEOUT,
                                      lingering_time=0,  # a body left unread (a 408) is not waited for: closed
                                      logger=PeerErrorLogger())
        await self._runner.setup()
        try:
            self._listener = await listener.listen(self._runner, self.host, self.port, MAX_CONNECTIONS)
        except OSError as exc:
            await self._runner.cleanup()
            from pipeline.errors import ConfigError

            raise ConfigError(f"runtime.http: cannot listen on {self.host}:{self.port}: "
                              f"{exc.strerror or exc}") from None
        if self.port == 0 and self._listener.sockets:
            self.port = self._listener.sockets[0].getsockname()[1]
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat(), name="http-heartbeat")
        if not is_loopback(self.host) and not self.token:
            log.warning("operator endpoint on non-loopback %s without runtime.http_token: /tap and the status "
                        "page are disabled, /metrics /healthz /ready are served", self.host)
        log.info("operator endpoint: %s/ (metrics at /metrics)", self.url)

    async def stop(self) -> None:
        self._closing.set()
        for clients in list(self.hub.clients.values()):
            for c in clients:
                c.wake.set()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._listener is not None:
            self._listener.close()  # no new connections; the runner's cleanup ends the open ones
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _beat(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(HEARTBEAT)
            self.view.loop_lag = max(0.0, loop.time() - t0 - HEARTBEAT)
            self.view.heartbeat = time.monotonic()

    # -- access ---------------------------------------------------------------------------
    def _denied(self, request: web.Request, *, page: bool = False) -> web.Response | None:
        """None when the request may see meeting content, else the response that says why not."""
        if not self.token:
            if is_loopback(self.host):
                host = request.headers.get("Host")
                if host is None or _names_loopback(host):  # (browsers always send one)
                    return None
                # a web page whose own name now resolves to 127.0.0.1 (DNS rebinding) must not read meeting content
                return _json({"error": f"Host {host[:100]!r} is not a loopback name: without "
                                       "runtime.http_token only http://127.0.0.1, [::1] or localhost are "
                                       "served"}, 403)
            return _json({"error": "set runtime.http_token to serve /tap and the status page on a "
                                   "non-loopback address"}, 403)
        cookie = request.cookies.get(COOKIE, "")
        if cookie and self._cookie is not None and self._cookie.valid(cookie):  # (signed by the token)
            return None
        auth = request.headers.get("Authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if given:
            wait = self.guard.retry_after(request.remote)
            if wait:
                return _too_many(_json({"error": _TOO_MANY.format(wait)}, 429), wait)
            if _same(given, self._token_digest):
                return None
            self.guard.failed(request.remote)
        if page:
            return web.Response(text=_LOGIN, status=401, content_type="text/html",
                                headers={"WWW-Authenticate": "Bearer"})
        return _json({"error": "missing or wrong bearer token"}, 401)

    async def login(self, request: web.Request) -> web.Response:
        peer = request.remote
        wait = self.guard.retry_after(peer)
        if wait:  # before the form is read: a right token then tells a guesser nothing
            return _too_many(web.Response(text=_TOO_MANY.format(wait), status=429), wait)
        self.guard.failed(peer)  # until it turns out right: forms arriving meanwhile count it
        try:  # a request under way is not idle: a body never sent in full held its connection for good
            async with asyncio.timeout(IDLE_TIMEOUT):
                form = await request.post()
        except TimeoutError:
            return web.Response(text=f"the sign-in form did not arrive within {IDLE_TIMEOUT:g} s", status=408)
        given = str(form.get("token", ""))
        if self._cookie is None or not _same(given, self._token_digest):
            return web.Response(text=_LOGIN, status=401, content_type="text/html")
        self.guard.forgive(peer)
        resp = web.Response(status=303, headers={"Location": "/"})
        resp.set_cookie(COOKIE, self._cookie.make(), httponly=True, samesite="Strict", path="/",
                        max_age=str(self._cookie.ttl))
        return resp

    # -- endpoints ------------------------------------------------------------------------
    async def metrics(self, request: web.Request) -> web.Response:
        budget = self.scrape_budget
        if not budget.available():
            resp = _json({"error": "scraped too often: the pipeline's time comes first; retry in a second"}, 429)
            resp.headers["Retry-After"] = "1"
            return resp
        cpu = time.thread_time()
        body = exposition(self.registry)
        budget.charge(time.thread_time() - cpu)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def healthz(self, request: web.Request) -> web.Response:
        late = time.monotonic() - self.view.heartbeat - HEARTBEAT
        lag = max(self.view.loop_lag, late)
        if lag > UNHEALTHY_AFTER:
            return _json({"status": "unhealthy", "loop_lag_seconds": round(lag, 3),
                          "reason": "the event loop is blocked"}, 503)
        return _json({"status": "ok", "loop_lag_seconds": round(lag, 4)})

    async def ready(self, request: web.Request) -> web.Response:
        missing = self.view.ready()
        if missing:
            return _json({"ready": False, "not_ready": missing}, 503)
        return _json({"ready": True})

    async def status(self, request: web.Request) -> web.Response:
        denied = self._denied(request)
        if denied is not None:
            return denied
        snap = self.view.snapshot()
        snap["points"] = [p.label for p in self.hub.points]
        return _json(snap)

    async def page(self, request: web.Request) -> web.StreamResponse:
        denied = self._denied(request, page=True)
        if denied is not None:
            return denied
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def tap(self, request: web.Request) -> web.StreamResponse:
        denied = self._denied(request)
        if denied is not None:
            return denied
        try:
            client = self._client(request.query)
        except TapError as exc:
            return _json({"error": str(exc)}, 400)
        if self.hub.client_count >= MAX_TAP_CLIENTS:
            return _json({"error": f"{MAX_TAP_CLIENTS} tap clients are attached already; try again later"}, 503)
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        if request.method == "HEAD":  # headers only: a stream's body was sent after them, and it took a tap place
            return web.Response(headers=headers)
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        self.hub.attach(client)
        try:
            hello = {"at": client.point.label, "points": [p.label for p in self.hub.points],
                     "pipeline": self.view.name}
            write = _Writer(resp, request.transport)
            await write(b"event: hello\ndata: " + orjson.dumps(hello) + b"\n\n")
            await self._stream(client, write)
        except (ConnectionResetError, ConnectionError):
            pass
        except TimeoutError:  # it stopped reading: closed, nothing more is written to it
            if request.transport is not None:
                request.transport.abort()
        finally:
            self.hub.detach(client)
        return resp

    def _client(self, q: Any) -> TapClient:
        point = self.hub.resolve(q.get("at", "source"))
        channels = [c.strip() for v in q.getall("channel", []) for c in v.split(",") if c.strip()]
        known = self._known_channels()
        for name in channels:  # a misspelled channel would show nothing, without a word
            if name not in known:
                raise TapError(unknown_channel(name, known))
        try:
            sample = float(q.get("sample", "1"))
            limit = int(q["limit"]) if "limit" in q else None
        except ValueError:
            raise TapError("sample must be a number in (0, 1] and limit a whole number") from None
        if not 0 < sample <= 1:
            raise TapError(f"sample must be in (0, 1] (0.1 = one event in ten), got {sample:g}")
        if limit is not None and not 1 <= limit <= MAX_LIMIT:
            raise TapError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
        return TapClient(point, channels or None, sample, limit)

    def _known_channels(self) -> frozenset[str]:
        """The channels the running config may emit (after a reload: the reloaded one's)."""
        cfg = getattr(getattr(self.view.rt, "reloader", None), "current", None) or self.view.built.config
        specs = [s for s in (cfg.source, cfg.controller, *cfg.stages, *cfg.sinks) if s is not None]
        return known_channels(specs, cfg.channels)

    async def _stream(self, client: TapClient, write: _Writer) -> None:
        """Send what the client's buffer holds; tell it when it missed events; end at `limit` or shutdown."""
        reported = 0
        loop = asyncio.get_running_loop()
        idle = [0]  # keep-alive ticks since the last message (a timer, not a timeout per wait)

        def tick() -> None:
            idle[0] += 1
            client.wake.set()
            timer[0] = loop.call_later(KEEPALIVE, tick)

        timer = [loop.call_later(KEEPALIVE, tick)]
        try:
            await self._send(client, write, idle, reported)
        finally:
            timer[0].cancel()

    async def _send(self, client: TapClient, write: _Writer, idle: list[int], reported: int) -> None:
        while True:
            await client.wake.wait()
            if not client.pending and idle[0] and not (client.done or self._closing.is_set()):
                idle[0] = 0
                client.wake.clear()
                await write(b": keep-alive\n\n")
                continue
            await asyncio.sleep(COALESCE)
            client.wake.clear()
            idle[0] = 0
            parts: list[bytes] = []
            if client.dropped > reported:
                reported = client.dropped
                parts.append(b"event: dropped\ndata: " + orjson.dumps({"dropped": reported}) + b"\n\n")
            for chunk in client.take():  # one message per batch: a JSON array of events (copied once, by join)
                parts += (b"data: ", chunk, b"\n\n")
            finished = client.done or self._closing.is_set()
            if finished:
                parts.append(b"event: end\ndata: " + orjson.dumps(
                    {"reason": "limit reached" if client.done else "pipeline stopped"}) + b"\n\n")
            if parts:
                budget, cpu = self.hub.budget, time.thread_time()
                await write(b"".join(parts))
                # sending costs about what serializing does (copies, the kernel's share): the same budget. A
                # write that waited for a slow client also counts what ran meanwhile, so at most one burst
                budget.charge(min(time.thread_time() - cpu, budget.burst))
            if finished:
                return


class _Writer:
    """Writes to one tap client; TimeoutError once it has taken none of what waits for it for STALLED_WRITE
    seconds (what waits shrinks as it reads: a slow client on a slow link goes on)."""

    def __init__(self, resp: web.StreamResponse, transport: asyncio.Transport | None) -> None:
        self.resp, self.transport = resp, transport

    async def __call__(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        write = loop.create_task(self.resp.write(data))
        waiting, since = -1, loop.time()
        try:
            while not (await asyncio.wait({write}, timeout=STALLED_WRITE / 4))[0]:
                now = _unsent(self.transport)
                if now != waiting:
                    waiting, since = now, loop.time()
                elif loop.time() - since >= STALLED_WRITE:
                    raise TimeoutError
            write.result()
        finally:
            write.cancel()


def _unsent(transport: asyncio.Transport | None) -> int:
    """Bytes written to `transport` that its peer has not taken yet: its buffer, and the kernel's send queue
    (which the transport sees shrink only in large steps), where the system tells (Linux)."""
    if transport is None:
        return 0
    waiting = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            waiting += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    return waiting


_TOO_MANY = "too many wrong tokens from your address; try again in {} s"


def _too_many(resp: web.Response, wait: int) -> web.Response:
    resp.headers["Retry-After"] = str(wait)
    return resp


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def _same(given: str, digest: bytes) -> bool:
    """Whether `given` is the secret of `digest`, in constant time (of equal-length digests: no length leaks).
    Header bytes that are not UTF-8 reach us as surrogates: they stay bytes (they made a 500 and a traceback)."""
    return hmac.compare_digest(_digest(given), digest)


def _names_loopback(host_header: str) -> bool:
    """True when a Host header names a loopback address or `localhost` (any port)."""
    try:
        name = urlsplit("//" + host_header).hostname
    except ValueError:
        return False
    return name is not None and is_loopback(name)


_LOGIN = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>pipeline: sign in</title>
<link rel="stylesheet" href="/static/style.css"></head><body class="login">
<form method="post" action="/login"><h1>Pipeline status</h1>
<p>This page shows meeting content. Enter the pipeline's <code>runtime.http_token</code>.</p>
<input type="password" name="token" autofocus aria-label="token"> <button type="submit">Sign in</button>
</form></body></html>"""
