"""Which client tokens of an API-managed session are masked in logs.

Every token handed out for a session stays valid at VideoDB until it expires, so a desktop client
may still hold (and log) one that a later `POST /v1/sessions/{id}/token` replaced. The record keeps
the current token (`client_token`) and up to EARLIER_TOKENS replaced ones (`earlier_tokens`, oldest
first; a restart masks them again). They are all masked until the session has finished, or, stopped
before it started and pushed out of memory, until it can no longer start; masking stays bounded
by the sessions that may still run, not by every token a long run made.
"""

from __future__ import annotations

from typing import Any, Final

from pipeline import secrets

#: Replaced tokens remembered per session; older ones are dropped (and no longer masked).
EARLIER_TOKENS: Final = 3


def tokens(record: dict[str, Any]) -> list[str]:
    """The session's tokens handed out and remembered: the replaced ones, then the current one."""
    earlier = record.get("earlier_tokens")
    out = [t for t in earlier if isinstance(t, str)] if isinstance(earlier, list) else []
    current = record.get("client_token")
    return [*out, current] if isinstance(current, str) else out


def mask(record: dict[str, Any]) -> None:
    for token in tokens(record):
        secrets.register(token)


def forget(record: dict[str, Any]) -> None:
    forget_all(tokens(record))


def forget_all(held: list[str]) -> None:
    for token in held:
        secrets.forget(token)


def replace(record: dict[str, Any], token: str) -> None:
    """`token` is the session's token now; the one it replaces stays masked (it is still valid)."""
    held = tokens(record)
    record["earlier_tokens"] = held[-EARLIER_TOKENS:]
    forget_all([t for t in held[:-EARLIER_TOKENS] if t != token])
    record["client_token"] = token
