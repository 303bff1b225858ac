"""Small network helpers shared by the emulator and the sinks."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_is_loopback(url: str) -> bool:
    return is_loopback(urlsplit(url).hostname or "")


VIDEODB_URL_EXAMPLE = "https://api.videodb.io"


def http_url(url: str, example: str) -> str:
    """`url` stripped, if it is an http(s) URL with a host and a valid port; else ValueError saying so.

    Why here: a URL that can never work (no scheme, a broken [IPv6] host, port 99999) would otherwise
    only fail at its first connect, and connects are retried with backoff.
    """
    url = url.strip()
    try:
        parts = urlsplit(url)
    except ValueError:  # a broken [IPv6] host
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL such as {example}, got {url!r}")
    try:
        port = parts.port
    except ValueError:  # not a number from 0 to 65535
        port = 0
    if port == 0:
        raise ValueError(f"the port must be a number from 1 to 65535, got {url!r}")
    return url
