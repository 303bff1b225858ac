"""One webhook POST with timeouts, retries, exponential backoff with jitter and `Retry-After`.

Retried: connection errors, timeouts, 5xx, 408 and 429. Not retried: other
4xx, redirects (a signed body is never re-sent to another host) and TLS
certificate failures. The outcome says how many attempts and why it failed,
with URL tokens masked.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline import secrets
from pipeline.retry_after import retry_after

from .signing import SIGNATURE_HEADER

if TYPE_CHECKING:
    import aiohttp

    from pipeline.api import Log

_jitter = random.Random()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long one request may take and how hard to retry it."""

    timeout: float = 10.0
    max_attempts: int = 5
    max_retry_time: float = 300.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0

    def backoff(self, attempt: int) -> float:
        """Exponential delay after failed attempt `attempt` (1-based), jittered to 50-100%."""
        base = min(self.backoff_max, self.backoff_initial * 2 ** (attempt - 1))
        return base * _jitter.uniform(0.5, 1.0)


@dataclass(frozen=True, slots=True)
class Outcome:
    """Result of delivering one message: ok, last HTTP status, attempts made, failure reason."""

    ok: bool
    status: int | None
    attempts: int
    reason: str = ""


def retryable_status(status: int) -> bool:
    return status >= 500 or status in (408, 429)


def clean(message: str, url: str) -> str:
    """An error text safe for logs and the dead-letter file: URL and registered secrets masked."""
    return secrets.mask(message.replace(url, secrets.mask_url(url)))[:500]


async def _snippet(resp: aiohttp.ClientResponse) -> str:
    """The first 300 bytes of an error body, for the reason; "" when it stalls or is cut off.

    The body is the receiver's: it may never come (a stalled proxy) or end in a reset, and that must
    leave a retryable status retryable.
    """
    import aiohttp  # lazy, as in post(): this module is imported by `pipeline validate`

    try:
        raw = await resp.content.read(300)
    except (aiohttp.ClientError, TimeoutError, OSError):
        return ""
    snippet = " ".join(raw.decode("utf-8", "replace").split())
    return f": {snippet}" if snippet else ""


async def post(session: aiohttp.ClientSession, url: str, body: bytes, headers: Mapping[str, str],
               policy: RetryPolicy, *, sign: Callable[[bytes], str] | None = None,
               log: Log | None = None) -> Outcome:
    """POST `body` until delivered, a permanent failure, `max_attempts` or `max_retry_time`."""
    import aiohttp  # lazy: keeps `import pipeline.cli` fast

    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=policy.timeout)
    attempt = 0
    while True:
        attempt += 1
        sent = dict(headers)
        if sign is not None:
            sent[SIGNATURE_HEADER] = sign(body)
        status: int | None = None
        wait: float | None = None
        try:
            async with session.post(url, data=body, headers=sent, timeout=timeout,
                                    allow_redirects=False) as resp:
                status = resp.status
                if 200 <= status < 300:
                    return Outcome(True, status, attempt)
                reason = f"HTTP {status}{await _snippet(resp)}"
                if 300 <= status < 400:
                    reason = f"HTTP {status} redirect not followed (configure the final URL)"
                retry = retryable_status(status)
                wait = retry_after(resp.headers.get("Retry-After")) if retry else None
        except TimeoutError:
            reason, retry = f"timeout after {policy.timeout:g}s", True
        except aiohttp.ClientConnectorCertificateError as exc:
            reason, retry = f"TLS error: {exc}", False
        except (aiohttp.ClientError, OSError) as exc:
            reason, retry = f"connection error: {type(exc).__name__}: {exc}", True
        reason = clean(reason, url)
        if not retry:
            return Outcome(False, status, attempt, reason)
        if attempt >= policy.max_attempts:
            return Outcome(False, status, attempt, f"{reason} (gave up after {attempt} attempts)")
        delay = wait if wait is not None else policy.backoff(attempt)
        elapsed = time.monotonic() - started
        if elapsed + delay > policy.max_retry_time:
            return Outcome(False, status, attempt,
                           f"{reason} (gave up after {attempt} attempts: next retry in {delay:.1f}s "
                           f"would exceed max_retry_time {policy.max_retry_time:g}s)")
        if log is not None:
            log.info("alert_forwarder: %s: attempt %d failed (%s), retrying in %.2fs",
                     secrets.mask_url(url), attempt, reason, delay)
        await asyncio.sleep(delay)
