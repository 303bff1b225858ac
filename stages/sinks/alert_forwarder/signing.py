"""Webhook signatures: `X-Pipeline-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.

Signing the timestamp with the body lets a receiver reject forged bodies and
replays older than its tolerance window; `verify` is the reference check.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Pipeline-Signature"


def sign(secret: bytes, body: bytes, t: int) -> str:
    """The header value for `body` signed at unix second `t`."""
    mac = hmac.new(secret, str(t).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def sign_now(secret: bytes, body: bytes) -> str:
    """The header value signed with the current time (called once per attempt, so retries stay fresh)."""
    return sign(secret, body, int(time.time()))


def verify(secret: bytes, body: bytes, header: str, *, tolerance: float = 300.0,
           now: float | None = None) -> bool:
    """True when `header` holds a valid `v1` for `body` with `t` within `tolerance` seconds of now."""
    t_value: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or not value.isascii():  # the header is the sender's: "²" or "é" must not raise
            continue
        if name == "t" and value.isdigit() and len(value) <= 20:
            t_value = int(value)
        elif name == "v1":
            candidates.append(value)
    if t_value is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - t_value) > tolerance:
        return False
    expected = sign(secret, body, t_value).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected, c) for c in candidates)
