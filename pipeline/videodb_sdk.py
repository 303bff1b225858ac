"""Calling the synchronous `videodb` SDK from asyncio, with one-line errors.

Shared by the videodb source, the capture-session controller and `pipeline
listen`. Every SDK call runs in a daemon worker thread (the SDK uses `requests`;
see sdk_threads.py for why not the default executor) and
any failure becomes a `VideoDBCallError` naming the call, with the API key
masked. `videodb` itself is imported lazily: it is slow to import.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pipeline import sdk_threads, secrets
from pipeline.errors import StageError
from pipeline.retry_after import retry_after
from pipeline.termsafe import visible

T = TypeVar("T")

#: Longest an SDK call may run, in seconds, from the moment a worker thread starts it; and, apart, longest it may
#: wait for a free worker thread (so at most twice this in all). The SDK's own 30 s timeout is per read, so a
#: VideoDB that trickles its answer held a call, and one of the few worker threads, for as long as it kept
#: sending. Past this the caller gets a VideoDBCallError; the thread finishes the call on its own (its answer is
#: dropped) and stays busy until then. One deadline for both waits let a call queued behind slow ones run for
#: what was left of it: under a burst, calls failed as "took longer than 60 s" a few seconds after VideoDB got
#: them (a create abandoned while VideoDB made the session).
CALL_DEADLINE = 60.0
#: Longest server text an error line quotes (a proxy's error page can be kilobytes of HTML).
MAX_REASON = 200
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.I | re.S)
_TAG = re.compile(r"<[^>]{0,500}>")
_HTML = re.compile(r"<(html|!doctype|body|head)\b", re.I)
_SPACE = re.compile(r"\s+")


class VideoDBCallError(StageError):
    """An SDK call failed; `fatal` when retrying cannot help (auth, other 4xx). `retry_after`: seconds
    VideoDB asked us to wait (its `Retry-After` on a 429 or 503), None when it said nothing. `overdue`: the call did
    not end within `CALL_DEADLINE`."""

    def __init__(self, message: str, *, call: str, status: int | None, fatal: bool,
                 retry_after: float | None = None, overdue: bool = False) -> None:
        super().__init__(message)
        self.call = call
        self.status = status
        self.fatal = fatal
        self.retry_after = retry_after
        self.overdue = overdue


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

    from pipeline.sdk_retry import without_retry_after_sleep

    kwargs: dict[str, Any] = {"api_key": settings.api_key, "log_level": logging.WARNING}
    if settings.base_url:
        kwargs["base_url"] = settings.base_url.rstrip("/")
    conn = videodb.connect(**kwargs)
    without_retry_after_sleep(conn)  # a Retry-After fails the call at once (see sdk_retry.py)
    return conn


def describe(exc: BaseException, api_key: str | None = None) -> tuple[str, int | None, bool]:
    """(why, HTTP status or None, fatal) for an exception raised by the SDK; secrets (and `api_key`) in the
    server's text are masked, once, before it is cut to one short line (a cut through an echoed key showed its
    start). An `api_key` shorter than secrets.MIN_LEN is not masked (nor registered): replacing it cut every
    word that held those letters ("fail***" for a key "ed")."""
    from videodb.exceptions import AuthenticationError, InvalidRequestError, RequestTimeoutError

    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    msg = secrets.mask(str(exc)).strip()  # the raw text: a cleanup first could break a secret apart (a PEM key)
    if api_key and len(api_key) >= secrets.MIN_LEN:  # one never registered (registered ones are masked above)
        msg = msg.replace(api_key, secrets.MASK)
    for prefix in ("Error: ", "Invalid request: "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    msg = _one_line(msg)
    if isinstance(exc, AuthenticationError):
        return f"authentication failed (HTTP {status or 401}: {msg}); check videodb.api_key", status, True
    if isinstance(exc, RequestTimeoutError):
        return "request timed out", status, False
    if isinstance(exc, InvalidRequestError):
        if status is None:
            if msg.startswith("Max retries exceeded"):  # urllib3 retried a GET answered 502/503/504
                return "VideoDB kept answering 502/503/504 (retried; max retries exceeded)", None, False
            return f"cannot reach the VideoDB API ({msg})", None, False
        if 200 <= status < 300:  # the call went through but its answer is not what the SDK reads
            return f"unreadable answer (HTTP {status}: {msg})", status, False
        return f"HTTP {status}: {msg}", status, 400 <= status < 500 and status not in (408, 429)
    return f"{type(exc).__name__}: {msg}", None, False


def _one_line(text: str) -> str:
    """Server text fit for a one-line error: an HTML page's title (else its text), whitespace collapsed,
    bounded, control characters shown as `\\xNN`."""
    if text.lstrip()[:1] == "<" or _HTML.search(text[:2000]):  # an HTML page, not a message that uses "<"
        title = _TITLE.search(text)
        text = title.group(1) if title else _TAG.sub(" ", text)
    text = _SPACE.sub(" ", text).strip()
    return visible(text if len(text) <= MAX_REASON else text[:MAX_REASON] + "...")


def call_error(who: str, call: str, exc: BaseException, api_key: str | None) -> VideoDBCallError:
    """The one-line error for a failed SDK call, API key masked (`describe` masks the server's text; the rest of
    the line is ours: masking it all again could only hide text the first pass wrote, `***` included)."""
    why, status, fatal = describe(exc, api_key)
    text = f"{who}: {call} failed: {why}"
    wait = None
    if status in (429, 503):  # VideoDB's rate limit, or busy: the SDK gives these back at once (sdk_retry.py)
        headers = getattr(getattr(exc, "response", None), "headers", None)
        wait = retry_after(headers.get("Retry-After") if headers is not None else None)
    return VideoDBCallError(text, call=call, status=status, fatal=fatal, retry_after=wait)


async def call(who: str, what: str, fn: Callable[..., T], /, *args: Any,
               api_key: str | None = None, **kwargs: Any) -> T:
    """Run `fn(*args, **kwargs)` in a thread; failures, a call that waits `CALL_DEADLINE` for a worker thread
    (it is then never made) and one not done within `CALL_DEADLINE` of starting become `VideoDBCallError`
    naming `what`."""
    deadline = CALL_DEADLINE
    loop = asyncio.get_running_loop()
    started = loop.create_future()

    def begin() -> T:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits for this call any more
            loop.call_soon_threadsafe(_settle, started)
        return fn(*args, **kwargs)

    job = sdk_threads.submit(begin)
    done = asyncio.wrap_future(job)
    limit = None
    try:
        await asyncio.wait((started, done), timeout=deadline, return_when=asyncio.FIRST_COMPLETED)
        if not started.done() and not done.done() and job.cancel():
            raise _overdue(who, what, deadline, started=False)
        async with asyncio.timeout(deadline) as limit:  # from the start of the call, not from the queue
            return await done
    except VideoDBCallError:
        raise
    except Exception as exc:
        if limit is not None and limit.expired():
            raise _overdue(who, what, deadline, started=True) from None
        raise call_error(who, what, exc, api_key) from None
    finally:
        done.cancel()  # cancelled while queued (the caller gave up): never run; a running one finishes unheard
        started.cancel()


def _settle(started: asyncio.Future[None]) -> None:
    if not started.done():
        started.set_result(None)


def _overdue(who: str, what: str, deadline: float, *, started: bool) -> VideoDBCallError:
    """The error of a call past `CALL_DEADLINE`: still running in its thread, or never started (every worker
    thread was busy with calls VideoDB is slow to answer; the queued one was cancelled)."""
    why = (f"took longer than {deadline:g} s (VideoDB answers too slowly; the call is left to finish on its own)"
           if started else f"no SDK worker thread came free within {deadline:g} s (all {sdk_threads.workers()} "
                           "are busy with calls VideoDB is slow to answer)")
    return VideoDBCallError(f"{who}: {what} failed: {why}", call=what, status=None, fatal=False, overdue=True)


async def client_token(who: str, conn: Any, expires_in: int, api_key: str | None) -> str:
    """`generate_client_token(expires_in)`; an answer without a token is a failed call (nobody could start
    a capture with it)."""
    token = await call(who, "generate_client_token", conn.generate_client_token, expires_in, api_key=api_key)
    if not isinstance(token, str) or not token:
        raise VideoDBCallError(f"{who}: generate_client_token failed: the answer holds no token",
                               call="generate_client_token", status=None, fatal=False)
    secrets.register(token)
    return token
