"""Calling the synchronous `videodb` SDK from asyncio, with one-line errors.

Shared by the videodb source, the capture-session controller and `pipeline
listen`. Every SDK call runs in a worker thread (the SDK uses `requests`) and
any failure becomes a `VideoDBCallError` naming the call, with the API key
masked. `videodb` itself is imported lazily: it is slow to import.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pipeline import secrets
from pipeline.errors import StageError

T = TypeVar("T")


class VideoDBCallError(StageError):
    """An SDK call failed; `fatal` when retrying cannot help (auth, other 4xx)."""

    def __init__(self, message: str, *, call: str, status: int | None, fatal: bool) -> None:
        super().__init__(message)
        self.call = call
        self.status = status
        self.fatal = fatal


@dataclass(frozen=True)
class VideoDBSettings:
    """Resolved connection settings: the top-level `videodb:` block plus stage overrides."""

    api_key: str | None
    base_url: str | None
    collection_id: str

    @classmethod
    def resolve(cls, settings: Mapping[str, Any], **overrides: Any) -> VideoDBSettings:
        """`context.settings["videodb"]` with non-None `overrides` (api_key may be a SecretStr)."""
        base = dict(settings.get("videodb") or {})
        for name, value in overrides.items():
            if value is not None:
                base[name] = value.get_secret_value() if hasattr(value, "get_secret_value") else value
        key = base.get("api_key") or None
        if key:
            secrets.register(key)
        return cls(api_key=key, base_url=base.get("base_url") or None,
                   collection_id=base.get("collection_id") or "default")


def connect(settings: VideoDBSettings, who: str) -> Any:
    """A `videodb.Connection` (no network I/O happens here)."""
    if not settings.api_key:
        raise StageError(f"{who}: no VideoDB API key: set videodb.api_key (e.g. ${{VIDEO_DB_API_KEY}})")
    import videodb

    kwargs: dict[str, Any] = {"api_key": settings.api_key, "log_level": logging.WARNING}
    if settings.base_url:
        kwargs["base_url"] = settings.base_url.rstrip("/")
    return videodb.connect(**kwargs)


def describe(exc: BaseException) -> tuple[str, int | None, bool]:
    """(why, HTTP status or None, fatal) for an exception raised by the SDK."""
    from videodb.exceptions import AuthenticationError, InvalidRequestError, RequestTimeoutError

    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    msg = str(exc).strip()
    for prefix in ("Error: ", "Invalid request: "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if isinstance(exc, AuthenticationError):
        return f"authentication failed (HTTP {status or 401}: {msg}); check videodb.api_key", status, True
    if isinstance(exc, RequestTimeoutError):
        return "request timed out", status, False
    if isinstance(exc, InvalidRequestError):
        if status is None:
            return f"cannot reach the VideoDB API ({msg})", None, False
        return f"HTTP {status}: {msg}", status, 400 <= status < 500 and status not in (408, 429)
    return f"{type(exc).__name__}: {msg}", None, False


def call_error(who: str, call: str, exc: BaseException, api_key: str | None) -> VideoDBCallError:
    """The one-line error for a failed SDK call, API key masked."""
    why, status, fatal = describe(exc)
    text = secrets.mask(f"{who}: {call} failed: {why}")
    if api_key:
        text = text.replace(api_key, secrets.MASK)
    return VideoDBCallError(text, call=call, status=status, fatal=fatal)


async def call(who: str, what: str, fn: Callable[..., T], /, *args: Any,
               api_key: str | None = None, **kwargs: Any) -> T:
    """Run `fn(*args, **kwargs)` in a thread; failures become `VideoDBCallError` naming `what`."""
    try:
        return await in_daemon_thread(fn, *args, **kwargs)
    except Exception as exc:
        raise call_error(who, what, exc, api_key) from None


MAX_THREADS = min(32, (os.cpu_count() or 1) + 4)  # SDK calls running at once, per event loop
_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


async def in_daemon_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """`asyncio.to_thread`, but in a daemon thread of its own: a call a server never answers cannot hold up exit.

    The default executor's threads are joined when the loop closes and again when the interpreter
    exits, so one SDK request stuck on a silent server (its timeout is 30 s, retried) kept a stopped
    run alive far past drain_timeout. Cancelling the await abandons the call; its thread ends on its own.
    """
    loop = asyncio.get_running_loop()
    slots = _SLOTS.get(loop)
    if slots is None:
        slots = _SLOTS[loop] = asyncio.Semaphore(MAX_THREADS)
    async with slots:  # as many at once as the default executor ran: a thousand sessions polling stay bounded
        return await _run_in_daemon_thread(loop, fn, *args, **kwargs)


async def _run_in_daemon_thread(loop: asyncio.AbstractEventLoop, fn: Callable[..., T], /, *args: Any,
                                **kwargs: Any) -> T:
    fut: asyncio.Future[T] = loop.create_future()
    ctx = contextvars.copy_context()

    def settle(result: Any, exc: BaseException | None) -> None:
        if fut.done():  # cancelled meanwhile: nobody waits for it any more
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    def work() -> None:
        try:
            result, exc = ctx.run(fn, *args, **kwargs), None
        except BaseException as err:  # handed to the awaiting task as it is
            result, exc = None, err
        try:
            loop.call_soon_threadsafe(settle, result, exc)
        except RuntimeError:  # the loop closed while the call was running: nobody waits for it
            pass

    threading.Thread(target=work, name=f"videodb-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return await fut
