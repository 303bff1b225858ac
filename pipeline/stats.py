"""Per-stage counters for the exit summary (Vector-style: in, out, dropped, errors)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class StageStats:
    """Counters one stage keeps; the runtime adds them up for the summary."""

    name: str
    kind: str
    received: int = 0
    sent: int = 0
    dropped: int = 0
    errors: int = 0
