"""Reading an HTTP `Retry-After` header (RFC 9110 10.2.3): delta-seconds or an HTTP-date.

Shared by the alert forwarder (how long to wait before a retry) and the session API (how long
VideoDB asked us to wait, passed on to our own clients).
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` as seconds to wait (delta-seconds or HTTP-date), None when absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():  # str.isdigit() takes "²" and "٣" too: only ASCII digits are delta-seconds
        return float(value) if value.isascii() else None
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))
