"""The videodb SDK's HTTP retries, minus its sleeps on VideoDB's `Retry-After`.

The SDK mounts urllib3's `Retry` (one retry of a GET answered 502/503/504). urllib3 also retries a GET answered
413, 429 or 503 that carries `Retry-After`, sleeping it first in the calling thread, uncapped: `Retry-After:
86400` held one of the few SDK worker threads for a day (a few such answers and no SDK call found a thread),
and the call failed only at its deadline, without the `retry_after` our own retries wait (capped, and holding
no thread). So an answer that says when to come back is never retried inside the SDK: the call fails at once
with it. The SDK's quick retry of a 502/503/504 without `Retry-After` is kept.

Not `respect_retry_after_header=False`: with it urllib3 asks again at once after a 503 that asked for a wait
(sooner than VideoDB asked), and a second 503 fails as "Max retries exceeded", its `Retry-After` lost. Not a
cap on the sleep: a capped sleep still holds a thread per call, and asks again sooner than asked.
"""

from __future__ import annotations

import inspect
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry


class NoRetryAfterSleep(Retry):
    """urllib3's `Retry`, except that an answer carrying `Retry-After` is not retried (so never slept on)."""

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        return not has_retry_after and super().is_retry(method, status_code, has_retry_after)


def without_retry_after_sleep(conn: Any) -> None:
    """Give every HTTP adapter of the SDK connection `conn` our `Retry`, all its other settings kept."""
    params = inspect.signature(Retry.__init__).parameters
    for adapter in conn.session.adapters.values():
        old = getattr(adapter, "max_retries", None)
        if isinstance(adapter, HTTPAdapter) and isinstance(old, Retry) and not isinstance(old, NoRetryAfterSleep):
            adapter.max_retries = NoRetryAfterSleep(**{k: v for k, v in vars(old).items() if k in params})
