"""A worker's stream buffers are emptied when flow resumes after a suspension, not on every resume.

Why: faust suspends the flow into the streams' buffers when a rebalance starts
(emptying them then) and resumes it once the new assignment is restored, and
each resume empties the buffers again. But faust resumes more than once per
rebalance: when it starts reading the changelogs, and again once the tables are
restored, right after it resumed the ingest partitions and sought them to the
committed offsets. Records fetched during that seek were already in the
agent's buffer (behind a batch at the sinks), and that second resume threw
them away: the consumer had moved past them and faust's read offsets were just
reset, so nothing noticed. They came again only when the partition's next
record arrived (and an idle partition kept them until the next rebalance; 19
to 50 of 103 events in `bench.faust_churn 3 0s slow 2 --only 1`, in 4 runs of
16).

So a resume empties the buffers only when the flow was suspended; a resume of a
flow already running keeps what the buffers hold (records of the current
assignment, which the stream still checks against the consumer generation).

faust is imported by the caller, so `import pipeline.cli` stays fast.
"""

from __future__ import annotations

from typing import Any


def keeping_flow_control(base: type[Any]) -> type[Any]:
    """`base` (mode's FlowControlEvent), whose resume() empties the managed buffers only after a suspend()."""

    class FlowControl(base):  # type: ignore[misc,valid-type]
        def resume(self) -> None:
            if self.is_active():  # running already: nothing stale is buffered, keep it
                return
            super().resume()

    return FlowControl
