"""The status page's sign-in cookie: it proves the token was given, and for how long it does.

Why an expiry: the cookie was a fixed hash of the token, valid until the token changed, so one copied
from a browser (a shared machine, a backup of its profile) opened the meeting's content for ever. It now
carries the time it ends, signed with the token; past it, the page asks for the token again.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable

COOKIE = "videodb_pipeline_session"
TTL = 12 * 3600  # seconds a sign-in lasts


class SignInCookie:
    """Makes and checks `<ends>.<signature>` values for one token (the token is the key)."""

    def __init__(self, token: str, ttl: int = TTL, clock: Callable[[], float] = time.time) -> None:
        self._key = token.encode("utf-8", "surrogateescape")
        self.ttl = ttl
        self._clock = clock

    def _sign(self, ends: int) -> str:
        return hmac.new(self._key, b"status-page:%d" % ends, hashlib.sha256).hexdigest()

    def make(self) -> str:
        """A cookie value valid for `ttl` seconds from now."""
        ends = int(self._clock()) + self.ttl
        return f"{ends}.{self._sign(ends)}"

    def valid(self, value: str) -> bool:
        """Signed with this token and not ended (constant time in the signature, whose length is no secret);
        anything malformed is False."""
        ends_text, dot, signature = value.partition(".")
        if not dot or not ends_text.isascii() or not ends_text.isdigit() or len(ends_text) > 12:
            return False
        ends = int(ends_text)
        given = signature.encode("utf-8", "surrogateescape")  # (header bytes that are not UTF-8 stay bytes)
        return hmac.compare_digest(given, self._sign(ends).encode()) and self._clock() < ends
