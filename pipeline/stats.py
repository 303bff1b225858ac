"""Per-stage counters for the exit summary (Vector-style: in, out, dropped, errors)."""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("pipeline")


@dataclass(slots=True)
class StageStats:
    """Counters one stage keeps; the runtime adds them up for the summary."""

    name: str
    kind: str
    received: int = 0
    sent: int = 0
    dropped: int = 0
    errors: int = 0
    #: the `report()` counts of this stage's earlier instances, which config reloads replaced
    before: Counter[str] = field(default_factory=Counter)
    report_failed: bool = False  # its report() raised (said once)

    def counts_of(self, stage: Any) -> dict[str, int]:
        """`stage.report()`, its whole numbers only: a plugin's that raises, or holds other values, costs only
        those counters, never the exit summary or a scrape of /metrics (one warning when it raises)."""
        try:
            report = stage.report()
            return {str(k): v for k, v in report.items() if type(v) is int}
        except Exception as exc:
            if not self.report_failed:
                self.report_failed = True
                log.warning("%s: report() raised %s: %s; its counters are left out", self.name,
                            type(exc).__name__, exc)
            return {}

    def report_of(self, stage: Any) -> dict[str, int]:
        """The run's counters of `stage` (this stage's instance now): `counts_of()` and `whole_run()`."""
        return self.whole_run(self.counts_of(stage))

    def retire(self, report: dict[str, int]) -> None:
        """A reload replaces the instance that made `report`: keep its counts for the rest of the run."""
        self.before.update({k: v for k, v in report.items() if type(v) is int})

    def whole_run(self, report: dict[str, int]) -> dict[str, int]:
        """The current instance's `report()` plus what its predecessors counted: the run's counts."""
        if not self.before:
            return report
        out = dict(report)
        for k, v in self.before.items():
            now = out.get(k, 0)
            out[k] = now + v if type(now) is int else now
        return out


@dataclass(slots=True)
class GapStats:
    """Reconnects of a live source, seconds without a connection, events backfilled per channel."""

    reconnects: int = 0
    gap_seconds: float = 0.0  # outages that ended
    backfilled: Counter[str] = field(default_factory=Counter)
    down_since: float | None = None  # monotonic time the current outage began (None: connected)

    def seconds(self) -> float:
        """Seconds without a connection so far, the current outage included (live views read this: they showed
        nothing of an outage until it ended)."""
        ongoing = time.monotonic() - self.down_since if self.down_since is not None else 0.0
        return self.gap_seconds + ongoing

    def outage(self) -> float | None:
        """Seconds the current outage has lasted, None while connected."""
        return None if self.down_since is None else time.monotonic() - self.down_since

    def end_outage(self) -> float:
        """The current outage is over (reconnected, or the source stopped): add it to the total; its seconds."""
        gap = self.outage() or 0.0
        self.gap_seconds += gap
        self.down_since = None
        return gap

    def summary(self) -> str | None:
        """One exit-summary line, or None when the source never reconnected nor backfilled."""
        if not self.reconnects and not self.backfilled:
            return None
        per = ", ".join(f"{ch} {n}" for ch, n in sorted(self.backfilled.items())) or "none"
        return (f"  reconnects: {self.reconnects} (gaps {self.gap_seconds:.2f}s in total)"
                f"   backfilled: {per}")


#: Buckets (seconds) for receipt -> sink-written latency and for event lag (now - event time).
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LAG_BUCKETS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 86400.0)


class Histogram:
    """A cumulative-on-read histogram fed once per batch (`n` events that share one value).

    Why not prometheus_client's: this one has no lock and no labels, and the metrics
    endpoint reads it at scrape time, so nothing but one bisect runs per batch.
    """

    __slots__ = ("bounds", "count", "counts", "last", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0
        self.last = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n
        self.count += n
        self.last = value

    def cumulative(self) -> list[tuple[str, int]]:
        """(`le`, count) pairs as Prometheus wants them, ending with +Inf."""
        out, total = [], 0
        for bound, c in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += c
            out.append((bound, total))
        return out
