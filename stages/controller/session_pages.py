"""One page of `GET /v1/sessions`: at most `limit` sessions and about MAX_PAGE_BYTES, after a cursor.

Listing every session in one answer cost the event loop ~70 ms at 10,000 sessions (and a session's
metadata may be large), so an answer holds one page. Sessions are listed in the order the pipeline
took them in (its registry's order): each gets a growing number when added, and the cursor is that
number, so a session added while a client pages comes after every other one, and one evicted meanwhile
moves nothing. The numbers restart with the registry (a restart), so a cursor names its registry.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

import orjson

from stages.controller.session_create import ApiProblem
from stages.controller.sessions import ManagedSession

DEFAULT_LIMIT: Final = 1000
MAX_LIMIT: Final = 10_000
MAX_PAGE_BYTES: Final = 1 << 20  # a page ends once its sessions reach this size (it holds at least one)
_CURSOR: Final = re.compile(r"^([0-9a-f]{8})\.([0-9]{1,18})\Z")


def page(sessions: Mapping[str, ManagedSession], query: Mapping[str, str], run: str) -> bytes:
    """The JSON answer: `sessions`, `count` (on this page), `total` (matching, all pages), `next_after`.

    `run` names the registry the session numbers belong to (8 hex digits, new with every registry)."""
    limit = _limit(query.get("limit"))
    after = _after(query.get("after"), run)
    status = query.get("status")
    parts: list[orjson.Fragment] = []
    size, last, more = 0, 0, False
    total = 0 if status is not None else len(sessions)
    for s in sessions.values():
        if status is not None:  # every match counts towards `total`, so a filtered listing looks at them all
            if (s.lifecycle.state or s.record.get("status")) != status:
                continue
            total += 1
        if more or s.seq <= after:
            continue
        if len(parts) >= limit:
            more = True
        else:
            part = orjson.dumps(s.view())
            if parts and size + len(part) > MAX_PAGE_BYTES:
                more = True
            else:
                parts.append(orjson.Fragment(part))
                size += len(part)
                last = s.seq
        if more and status is None:
            break
    return orjson.dumps({"sessions": parts, "count": len(parts), "total": total,
                         "next_after": f"{run}.{last}" if more else None})


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6 and 1 <= int(raw) <= MAX_LIMIT):
        raise ApiProblem(400, f"limit: expected a whole number from 1 to {MAX_LIMIT}, got {raw[:40]!r}")
    return int(raw)


def _after(raw: str | None, run: str) -> int:
    """The number of the last session the client has seen (0: from the start)."""
    if raw is None or raw == "":
        return 0
    m = _CURSOR.match(raw)
    if m is None:
        raise ApiProblem(400, f"after: {raw[:40]!r} is not a cursor (pass the previous page's next_after)")
    if m.group(1) != run:
        raise ApiProblem(400, "after: this cursor is from before the pipeline restarted; "
                              "list again from the first page")
    return int(m.group(2))
