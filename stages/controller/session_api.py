"""The session API: an app backend creates, lists and stops its users' capture sessions over HTTP.

JSON in and out, a bearer token compared in constant time, a request body
limit, and one-line `{"error": ...}` answers for every 4xx/5xx. The work is
done by the `SessionManager`; this module only speaks HTTP.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from typing import Any, Final

import orjson
from aiohttp import web
from pydantic import ValidationError

from pipeline.config import explain, path_str
from pipeline.errors import StageError
from pipeline.http import listener
from pipeline.http.guard import SignInGuard
from pipeline.http.pace import Pacer
from pipeline.http.peer_log import PeerErrorLogger
from pipeline.net import is_loopback
from stages.controller import session_pages
from stages.controller.ai_pipelines import OnActive
from stages.controller.json_body import body_problem
from stages.controller.session_create import ApiProblem
from stages.controller.session_manager import SessionManager, fingerprint
from stages.controller.session_options import SessionApiOptions, split_host_port

log = logging.getLogger("pipeline.controller.sessions")

_CREATE_KEYS: Final = ("end_user_id", "metadata", "on_active")
_KEY: Final = re.compile(r"^[\x21-\x7e]{1,255}\Z")  # Idempotency-Key: printable ASCII, no spaces
_MAX_USER: Final = 256
BODY_TIMEOUT = 30.0  # seconds a request body may take to arrive (a client trickling it holds a connection)
HEADER_TIMEOUT = 15.0  # seconds a connection may stay open without a complete request (aiohttp's keep-alive)
MAX_CONNECTIONS = 256  # open connections at once; more get 503 (each one costs the pipeline a file descriptor)
SHUTDOWN_WAIT: Final = 5.0  # seconds a shutdown waits for requests under way (a create then finishes on its own)
REFUSED_RATE: Final = 100.0  # requests refused for the token answered a second, all clients together
REFUSED_BURST: Final = 100.0  # ... at once before that rate applies
MAX_DEPTH: Final = 32  # JSON nesting a body may have (orjson writes at most 254 levels, and a listing adds 3)


class SessionApi:
    """aiohttp server over a SessionManager; `url` is valid once started."""

    def __init__(self, manager: SessionManager, options: SessionApiOptions, who: str) -> None:
        self.manager = manager
        self.options = options
        self.who = who
        self._token = options.token.get_secret_value().encode()
        self._guard = SignInGuard(who="session API")
        # requests refused for the token wait their turn (no client asks so often but by mistake or in an attack);
        # those with it are not slowed
        self._refused = Pacer(REFUSED_RATE, REFUSED_BURST)
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._handling: set[asyncio.Task[Any]] = set()  # requests under way (cancelled at SHUTDOWN_WAIT)
        self.url = ""

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=self.options.max_body_bytes)
        app.router.add_post("/v1/sessions", self.create)
        app.router.add_get("/v1/sessions", self.list)
        app.router.add_get("/v1/sessions/{sid}", self.show)
        app.router.add_post("/v1/sessions/{sid}/stop", self.stop)
        app.router.add_post("/v1/sessions/{sid}/token", self.token)
        host, port = split_host_port(self.options.listen)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_WAIT,
                                     keepalive_timeout=HEADER_TIMEOUT, logger=PeerErrorLogger())
        await self._runner.setup()
        try:
            self._listener = await listener.listen(self._runner, host, port, MAX_CONNECTIONS)
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise StageError(f"{self.who}: api.listen {self.options.listen}: cannot listen: "
                             f"{exc.strerror or exc}") from None
        bound = self._listener.sockets[0].getsockname()[1]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{bound}"
        if not is_loopback(host):
            log.warning("%s: session API listening on %s, reachable from other machines", self.who, self.url)
        log.info("%s: session API on %s/v1/sessions", self.who, self.url)

    async def close(self) -> None:
        self.manager.closing()  # creates waiting for the WebSocket answer 503 at once, not after connect_timeout
        if self._listener is not None:
            self._listener.close()  # no new connections; the runner's shutdown ends the open ones
            self._listener = None
        if self._handling:  # aiohttp would wait SHUTDOWN_WAIT, then as long again for a handler it asked to end
            await asyncio.wait(set(self._handling), timeout=SHUTDOWN_WAIT)
            for task in self._handling:
                task.cancel()  # a create already at VideoDB goes on by itself (it is shielded) and saves its record
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- plumbing ------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        task = asyncio.current_task()
        if task is not None:
            self._handling.add(task)
        try:
            try:
                self._authenticate(request)
            except ApiProblem:  # as costly to answer as any request: a flood of them took most of the loop
                await self._refused.turn()
                raise
            return await handler(request)
        except ApiProblem as exc:
            return _error(exc.status, exc.message, exc.retry_after)
        except web.HTTPException as exc:
            if exc.status == 413:
                return _error(413, f"request body larger than api.max_body_bytes={self.options.max_body_bytes}")
            return _error(exc.status, f"{exc.reason}: {request.method} {request.path}")
        finally:
            self._handling.discard(task)  # type: ignore[arg-type]

    def _authenticate(self, request: web.Request) -> None:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        given_bytes = given.strip().encode("utf-8", "surrogateescape")  # header bytes that are not UTF-8 stay bytes
        if given_bytes:  # a guess: a few a minute per address, then 429 before it is looked at
            wait = self._guard.retry_after(request.remote)
            if wait:
                raise ApiProblem(429, f"too many wrong tokens from your address; try again in {wait} s",
                                 retry_after=wait)
        if scheme.lower() != "bearer" or not hmac.compare_digest(given_bytes, self._token):
            if given_bytes:
                self._guard.failed(request.remote)
            raise ApiProblem(401, "missing or wrong bearer token (send Authorization: Bearer <api.token>)")

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        try:
            async with asyncio.timeout(BODY_TIMEOUT):
                raw = await request.read()  # over client_max_size: HTTPRequestEntityTooLarge (413)
        except TimeoutError:
            raise ApiProblem(408, f"request body not received within {BODY_TIMEOUT:g}s") from None
        if not raw.strip():
            return {}
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiProblem(400, f"body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiProblem(400, f"body must be a JSON object, got {type(body).__name__}")
        problem = body_problem(body, raw, MAX_DEPTH)
        if problem is not None:
            raise ApiProblem(400, problem)
        return body

    # --- handlers ------------------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        unknown = [k for k in body if k not in _CREATE_KEYS]
        if unknown:
            raise ApiProblem(400, f"unknown field {unknown[0]!r} (expected {', '.join(_CREATE_KEYS)})")
        user = body.get("end_user_id")
        if not isinstance(user, str) or not user.strip() or len(user) > _MAX_USER:
            raise ApiProblem(400, f"end_user_id: expected a non-empty string of at most {_MAX_USER} characters")
        if not user.isprintable():  # "\u200b", "\n": an id no one can see or read back as it was sent
            raise ApiProblem(400, "end_user_id: expected printable characters (no control, format or "
                                  "invisible ones such as a line break or U+200B)")
        metadata = body.get("metadata")
        if metadata is None:
            metadata = {}
        elif not isinstance(metadata, dict):
            raise ApiProblem(400, "metadata: expected a JSON object")
        on_active = None
        if body.get("on_active") is not None:
            try:
                on_active = OnActive.model_validate(body["on_active"])
            except ValidationError as exc:
                raise ApiProblem(400, _first_error(exc, body["on_active"])) from None
        key = request.headers.get("Idempotency-Key")
        if key is not None and not _KEY.match(key):
            raise ApiProblem(400, "Idempotency-Key: expected 1-255 printable ASCII characters without spaces")
        s, created = await self.manager.create(user, metadata, on_active, key, fingerprint(body))
        view = s.view(with_token=True)
        headers = {} if created else {"Idempotent-Replayed": "true"}
        return _json(view, 201, headers)

    async def list(self, request: web.Request) -> web.Response:
        body = session_pages.page(self.manager.sessions, request.query, self.manager.run)
        return web.Response(body=body, content_type="application/json")

    async def show(self, request: web.Request) -> web.Response:
        return _json(self.manager.get(request.match_info["sid"]).view())

    async def stop(self, request: web.Request) -> web.Response:
        s = await self.manager.stop(request.match_info["sid"])
        return _json(s.view(), 202)

    async def token(self, request: web.Request) -> web.Response:
        return _json(await self.manager.new_token(request.match_info["sid"]))


def _first_error(exc: ValidationError, data: Any) -> str:
    """`on_active.<key path>: <what was expected>`, in the words of a config error (an unknown key with a
    did-you-mean), not pydantic's (`Extra inputs are not permitted`)."""
    errors = explain(OnActive, exc, data) or [((), "invalid")]
    path, message = errors[0]
    return f"{path_str(('on_active', *path))}: {message}"


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


def _error(status: int, message: str, retry_after: int | None = None) -> web.Response:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return _json({"error": message, "status": status}, status, headers or None)
