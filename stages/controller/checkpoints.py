"""Which backfill checkpoint a restart may start from: one taken before anything a sink still holds in memory.

The controller takes a checkpoint every period; saving the newest would let a restart after `kill -9` skip events
a sink had not made durable yet (a parquet file completes every `roll_interval`, 5 minutes by default), and
VideoDB does not send them again. So checkpoints are kept until the sinks' oldest held event is past them.
"""

from __future__ import annotations

from collections import deque
from typing import Final

MAX_KEPT: Final = 8  # checkpoints held at most: each holds an entry per rtstream and channel (up to 100,000)


class Checkpoints:
    """Checkpoints as taken (monotonic time, value); `safe()` is the newest taken `margin` s before `held`."""

    def __init__(self, margin: float) -> None:
        self.margin = margin  # events the source passed just before a checkpoint reach the sinks within this
        self._taken: deque[tuple[float, dict[str, int]]] = deque()

    def add(self, at: float, checkpoint: dict[str, int]) -> None:
        """Keep `checkpoint`, taken at `at`. Past MAX_KEPT, the one between the oldest and the newest whose
        neighbours are closest in time goes: those kept stay evenly spread over the whole time a sink has held
        rows, so the one a restart starts from is at most two spacings before what the sink holds. Before, one
        was kept every 2 s for as long as a parquet file stayed open: 150 for the default 5 minutes, about
        800 MB at 40,000 streams (5.4 MB each)."""
        taken = self._taken
        taken.append((at, checkpoint))
        if len(taken) > MAX_KEPT:
            gone = min(range(1, len(taken) - 1), key=lambda i: taken[i + 1][0] - taken[i - 1][0])
            del taken[gone]

    def safe(self, now: float, held: float | None) -> dict[str, int] | None:
        """The newest checkpoint taken at least `margin` s before `now` and before `held` (when a sink holds
        events since then); None when there is none yet. Older ones are forgotten."""
        limit = now - self.margin if held is None else min(now, held) - self.margin
        taken = self._taken
        while len(taken) > 1 and taken[1][0] <= limit:
            taken.popleft()
        return taken[0][1] if taken and taken[0][0] <= limit else None
