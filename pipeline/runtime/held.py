"""What a sink still holds that a `kill -9` would lose, as the local runtime reads it (`Sink.holding_since`).

Two uses: a restart's backfill checkpoint is saved before the oldest such event, and kept outputs (a rule's
alerts, a closed window's `metrics`) are forgotten only once no sink holds the batch they went out with. A
sink that answers `holding_since` is not flushed for the latter (a parquet sink would complete its open files
for each window that closed: a file per window `slide`; an alert forwarder's flush waits for its webhook);
they wait until it no longer holds them.
"""

from __future__ import annotations

import math

from pipeline.api import Sink


def says_what_it_holds(sink: Sink) -> bool:
    """Whether the sink's class answers `holding_since` (the base class says it holds nothing)."""
    return type(sink).holding_since is not Sink.holding_since


def holding_time(sink: Sink, *, strict: bool = False) -> float | None:
    """`sink.holding_since()` as a finite float, None when it holds nothing. A plugin's bug (an exception, NaN,
    an infinity, a str) must not stop what depends on it: None too, or with `strict` a ValueError (the caller
    then treats the sink as one that does not say)."""
    try:
        t = sink.holding_since()
        t = float(t) if isinstance(t, int | float) and not isinstance(t, bool) else t
    except Exception as exc:  # (an int beyond a float's range: OverflowError)
        if strict:
            raise ValueError(f"holding_since() raised {type(exc).__name__}") from None
        return None
    # a NaN would make min() NaN whatever the others hold; an infinity is no time a clock gives
    if t is None or (isinstance(t, float) and math.isfinite(t)):
        return t
    if strict:
        raise ValueError(f"holding_since() answered {t!r}")
    return None


def unheld_upto(wrote_at: dict[int, float], upto: int, since: float | None) -> int:
    """The highest batch <= `upto` whose kept outputs a sink no longer holds: below the first kept batch whose
    write returned at or after `since` (when the sink's oldest held event came), all of `upto` when it holds
    nothing. `wrote_at`: batch -> monotonic time its write to the sink returned (kept batches only)."""
    if since is None:
        return upto
    first = min((b for b, t in wrote_at.items() if b <= upto and t >= since), default=None)
    return upto if first is None else first - 1
