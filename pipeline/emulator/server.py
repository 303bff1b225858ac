"""The emulator server: VideoDB API + WebSocket + `/_emulator/*` test hooks on one aiohttp app.

Why: the real SDK, the controller and the demo run offline against it, and
tests assert what the controller did through the recorded calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from pipeline.emulator import scenario as sc
from pipeline.emulator.hub import Hub
from pipeline.emulator.player import Player
from pipeline.emulator.routes import Api, ApiError, Handler
from pipeline.emulator.state import EXPORT_OUTCOMES, Registry
from pipeline.errors import StageError

_HOOKS = "/_emulator"
#: API calls kept for `/_emulator/calls` and tests: the newest ones (kept without end, an emulator left
#: running beside a pipeline grew by every status poll, for as long as it ran)
CALLS_KEPT = 100_000


@dataclass
class Fault:
    """An injected API fault on requests matching `method` whose path contains `path`.

    With `status`: after `delay` s the request gets `status` and `body` (raw text, e.g. a proxy's HTML page or
    broken JSON) and is not handled. Without: it is handled (a session is made), then its answer waits
    `delay` s (a slow VideoDB, or an answer its caller never reads). `times`: requests it hits (None: all).
    `headers`: sent with the fault's answer, e.g. `{"Retry-After": "7"}` on a 429 (VideoDB's rate limit)."""

    method: str
    path: str
    status: int | None = None
    body: str | None = None
    delay: float = 0.0
    times: int | None = None
    content_type: str = "application/json"
    headers: dict[str, str] | None = None
    hits: int = 0

    def take(self, method: str, path: str) -> bool:
        if method != self.method or self.path not in path or self.times == 0:
            return False
        if self.times is not None:
            self.times -= 1
        self.hits += 1
        return True
_BODY = web.RequestKey("emulator_body", dict)  # the parsed JSON body, read once by the middleware


class Emulator:
    """A local VideoDB-compatible server playing a scenario to the SDK.

    `speed`: 1 = the scenario's timing, 10 = ten times faster, 0 = as fast as possible.
    `drop_after`/`garbage_every`: fault injection per WebSocket connection.
    `queue_on_drop`: keep events produced while a connection is gone and send them after
    the re-bind (lossless; VideoDB does not do this). Default: not sent, as VideoDB; they
    stay readable over REST (`get_transcript`, `get_scenes`, see routes.py).
    `api_key`: when set, any other key gets a 401 (the SDK raises AuthenticationError).
    `autostart`: a created session goes starting -> active by itself (else POST
    `/_emulator/sessions/{id}/start`). `settle`/`setup_timeout`: scenario time starts
    once no pipeline setup call came for `settle` s (or `setup_timeout` s after active).
    `export_outcome`: how every new session's export ends, `exported`, `failed` (VideoDB's
    `export_status: failed`: the session stays `stopped` and no event follows) or `never`
    (`exporting` for ever); per session: POST `/_emulator/sessions/{id}/export {"outcome": ...}`.
    """

    def __init__(self, scenario: str | Path | None = None, *, speed: float = 1.0,
                 drop_after: int | None = None, garbage_every: int | None = None,
                 api_key: str | None = None, autostart: bool = True, queue_on_drop: bool = False,
                 settle: float = 0.3, setup_timeout: float = 10.0, export_outcome: str = "exported") -> None:
        if speed < 0:
            raise StageError(f"emulator: speed must be >= 0, got {speed}")
        for name, n in (("drop_after", drop_after), ("garbage_every", garbage_every)):
            if n is not None and n < 1:
                raise StageError(f"emulator: {name} must be >= 1, got {n}")
        if export_outcome not in EXPORT_OUTCOMES:
            raise StageError(f"emulator: export_outcome must be one of {', '.join(EXPORT_OUTCOMES)}, "
                             f"got {export_outcome!r}")
        self.scenario = sc.load(scenario)
        self.api_key = api_key or None
        self.hub = Hub(drop_after=drop_after, garbage_every=garbage_every, queue_on_drop=queue_on_drop)
        self.registry = Registry()
        self.player = Player(self.registry, self.hub, speed=speed, autostart=autostart,
                             settle=settle, setup_timeout=setup_timeout)
        self.api = Api(self.registry, self.hub, self.player, self.scenario, export_outcome)
        self.calls: deque[dict[str, Any]] = deque(maxlen=CALLS_KEPT)
        self.faults: list[Fault] = []
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    @property
    def emitted(self) -> deque[dict[str, Any]]:
        """The events generated for delivery, the last 10,000: `{"connection_id", "event", "live"}` (`live`:
        it was sent)."""
        return self.player.emitted

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on host:port (port 0 = a free port); `base_url` is valid afterwards."""
        app = web.Application(middlewares=[self._middleware], client_max_size=4 * 1024 * 1024)
        for method, path, handler in self.api.routes():
            app.router.add_route(method, path, self._wrap(handler))
        app.router.add_get("/ws", self.hub.handle)
        app.router.add_get(f"{_HOOKS}/calls", self._calls)
        app.router.add_get(f"{_HOOKS}/events", self._events)
        app.router.add_get(f"{_HOOKS}/sessions", self._sessions)
        app.router.add_post(f"{_HOOKS}/sessions/{{sid}}/start", self._hand_start)
        app.router.add_post(f"{_HOOKS}/sessions/{{sid}}/stop", self._hand_stop)
        app.router.add_post(f"{_HOOKS}/sessions/{{sid}}/export", self._export_outcome)
        app.router.add_post(f"{_HOOKS}/ws/drop", self._drop)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)  # faults hang
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise StageError(f"emulator: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        bound = self._runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{shown}:{bound}"
        self.api.ws_url = f"ws://{shown}:{bound}/ws"

    async def stop(self) -> None:
        """Cancel playback, close sockets, stop listening."""
        for s in self.registry.sessions.values():
            if s.task is not None:
                s.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await s.task
        await self.hub.close_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def fault(self, method: str, path: str, *, status: int | None = None, body: str | None = None,
              delay: float = 0.0, times: int | None = None, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> Fault:
        """Make matching API requests slow and/or fail (see `Fault`); the first matching fault applies."""
        f = Fault(method.upper(), path, status, body, delay, times, content_type, headers)
        self.faults.append(f)
        return f

    async def wait_finished(self) -> None:
        """Return once a session exists and every session is exported (or failed)."""
        await self.registry.finished.wait()

    # --- plumbing ------------------------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/ws" or request.path.startswith(_HOOKS):
            return await handler(request)
        call: dict[str, Any] = {"method": request.method, "path": request.path, "body": None,
                                "at": time.monotonic()}
        self.calls.append(call)
        fault = next((f for f in self.faults if f.take(request.method, request.path)), None)
        if fault is not None and fault.status is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            call["status"] = fault.status
            call["fault"] = True
            text = fault.body if fault.body is not None else _fault_body(fault.status)
            return web.Response(text=text, status=fault.status, content_type=fault.content_type,
                                headers=fault.headers)
        try:
            if request.can_read_body:
                try:
                    call["body"] = await request.json()
                    if isinstance(call["body"], dict):
                        request[_BODY] = call["body"]
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise ApiError(400, "body is not JSON") from None
            self._authenticate(request)
            response = await handler(request)
        except ApiError as exc:
            response = _fail(exc.status, exc.message)
        except web.HTTPException as exc:
            response = _fail(exc.status, f"{exc.reason}: {request.method} {request.path}")
        call["status"] = response.status
        if fault is not None and fault.delay:
            await asyncio.sleep(fault.delay)  # handled; the answer is late
        return response

    def _authenticate(self, request: web.Request) -> None:
        token = request.headers.get("x-access-token", "")
        if not token:
            raise ApiError(401, "Unauthorized: x-access-token header is missing")
        if token in self.api.client_tokens:  # a client token authenticates until it expires
            if (why := self.api.token_problem(token)) is not None:
                raise ApiError(401, f"Unauthorized: {why}")
            return
        if self.api_key is not None and not hmac.compare_digest(token, self.api_key):
            raise ApiError(401, "Unauthorized: invalid API key")

    @staticmethod
    def _wrap(handler: Handler) -> Any:
        async def run(request: web.Request) -> web.Response:
            data = await handler(request, request.get(_BODY, {}))
            return web.json_response({"success": True, "data": data})
        return run

    async def _calls(self, request: web.Request) -> web.Response:
        return web.json_response(list(self.calls))

    async def _events(self, request: web.Request) -> web.Response:
        """Every produced event, flat: rtstream_id, channel, start, text, live, plus the event itself."""
        return web.json_response([_produced(r) for r in self.emitted])

    async def _sessions(self, request: web.Request) -> web.Response:
        return web.json_response([s.shape() for s in self.registry.sessions.values()])

    async def _hand_start(self, request: web.Request) -> web.Response:
        return await self._hand(request, start=True)

    async def _hand_stop(self, request: web.Request) -> web.Response:
        return await self._hand(request, start=False)

    async def _export_outcome(self, request: web.Request) -> web.Response:
        """`{"outcome": "exported"|"failed"|"never"}`: how this session's export will end."""
        s = self.registry.sessions.get(request.match_info["sid"])
        if s is None:
            return _fail(404, f"capture session {request.match_info['sid']} not found")
        with contextlib.suppress(ValueError):
            body = await request.json()
            outcome = body.get("outcome") if isinstance(body, dict) else None
            if outcome in EXPORT_OUTCOMES and s.export is None and not s.export_failed:
                s.export_outcome = outcome
                return web.json_response({"success": True, "data": s.shape()})
        return _fail(400, f"expected {{\"outcome\": one of {', '.join(EXPORT_OUTCOMES)}}} before the export ends")

    async def _drop(self, request: web.Request) -> web.Response:
        """Close the open WebSocket connections, or with `{"connection_id": ...}` that one (404 if it is not
        open), as a lost network would: the pipeline reconnects. Answers `{"dropped": [connection ids]}`."""
        cid: str | None = None
        if request.can_read_body:
            try:
                body = await request.json()
            except ValueError:
                body = None
            if not isinstance(body, dict) or not isinstance(body.get("connection_id", ""), str):
                return _fail(400, 'expected no body or {"connection_id": "ws-..."}')
            cid = body.get("connection_id") or None
        if cid is not None and cid not in self.hub.live:
            return _fail(404, f"no open WebSocket connection {cid}")
        return web.json_response({"success": True, "data": {"dropped": await self.hub.drop(cid)}})

    async def _hand(self, request: web.Request, *, start: bool) -> web.Response:
        s = self.registry.sessions.get(request.match_info["sid"])
        if s is None:
            return _fail(404, f"capture session {request.match_info['sid']} not found")
        token, body = None, None
        if request.can_read_body:  # the desktop client's start: `{"client_token": ...}` is checked when given
            with contextlib.suppress(ValueError):
                body = await request.json()
                token = body.get("client_token") if isinstance(body, dict) else None
        if token is not None and (why := self.api.token_problem(str(token))) is not None:
            return _fail(401, f"Unauthorized: {why}")
        if start:
            s.start_requested = True
        else:  # `{"lifecycle_lost": true}`: the events of the stop (and after) never reach the WebSocket
            s.stop_requested = True
            s.lifecycle_lost = s.lifecycle_lost or (isinstance(body, dict) and body.get("lifecycle_lost") is True)
        s.wake.set()
        return web.json_response({"success": True, "data": s.shape()})


def _produced(rec: dict[str, Any]) -> dict[str, Any]:
    ev = rec["event"]
    data = ev.get("data") if isinstance(ev.get("data"), dict) else {}
    return {"rtstream_id": ev.get("rtstream_id"), "channel": ev.get("channel") or ev.get("event"),
            "start": data.get("start", data.get("timestamp")), "text": data.get("text"),
            "live": rec["live"], "connection_id": rec["connection_id"], "event": ev}


def _fault_body(status: int) -> str:
    """The JSON error body of an injected fault without its own body."""
    return json.dumps({"success": False, "message": f"emulator: injected HTTP {status}"})


def _fail(status: int, message: str) -> web.Response:
    return web.json_response({"success": False, "message": message}, status=status)
