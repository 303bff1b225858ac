"""`HOST:PORT` for the operator endpoint: parsing, and whether it is loopback-only."""

from __future__ import annotations

DEFAULT_HOST = "127.0.0.1"


def parse_address(value: str) -> tuple[str, int]:
    """`127.0.0.1:9464`, `[::1]:9464`, `:9464` or `9464` (loopback) -> (host, port)."""
    text = str(value).strip()
    host, port_s = DEFAULT_HOST, text
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1:].startswith(":"):
            raise ValueError(f"expected HOST:PORT like 127.0.0.1:9464, got {value!r}")
        host, port_s = text[1:end], text[end + 2:]
    elif ":" in text:
        host, _, port_s = text.rpartition(":")
        host = host or DEFAULT_HOST
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"expected HOST:PORT like 127.0.0.1:9464 (port 0-65535), got {value!r}")
    return host, int(port_s)
