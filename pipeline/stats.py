"""Per-stage counters for the exit summary (Vector-style: in, out, dropped, errors)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class StageStats:
    """Counters one stage keeps; the runtime adds them up for the summary."""

    name: str
    kind: str
    received: int = 0
    sent: int = 0
    dropped: int = 0
    errors: int = 0


@dataclass(slots=True)
class GapStats:
    """Reconnects of a live source, seconds without a connection, events backfilled per channel."""

    reconnects: int = 0
    gap_seconds: float = 0.0
    backfilled: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str | None:
        """One exit-summary line, or None when the source never reconnected nor backfilled."""
        if not self.reconnects and not self.backfilled:
            return None
        per = ", ".join(f"{ch} {n}" for ch, n in sorted(self.backfilled.items())) or "none"
        return (f"  reconnects: {self.reconnects} (gaps {self.gap_seconds:.2f}s in total)"
                f"   backfilled: {per}")
