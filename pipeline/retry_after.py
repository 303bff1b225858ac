"""Reading an HTTP `Retry-After` header (RFC 9110 10.2.3): delta-seconds or an HTTP-date.

Shared by the alert forwarder (how long to wait before a retry) and the session API (how long
VideoDB asked us to wait, passed on to our own clients).
"""

from __future__ import annotations

import time
from datetime import UTC
from email.utils import parsedate_to_datetime


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` as seconds to wait (delta-seconds or HTTP-date), None when absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():  # str.isdigit() takes "²" and "٣" too: only ASCII digits are delta-seconds
        return float(value) if value.isascii() else None
    try:
        date = parsedate_to_datetime(value)
        # an HTTP-date is always UTC; the asctime form and "-0000" parse without a zone, which .timestamp()
        # took as local time (hours off outside UTC: a 10 s wait read as 0 s, or as hours, past max_retry_time)
        when = (date if date.tzinfo else date.replace(tzinfo=UTC)).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))
