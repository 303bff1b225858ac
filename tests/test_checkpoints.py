"""Which backfill checkpoint a restart may start from (stages/controller/checkpoints.py)."""

from __future__ import annotations

from stages.controller.checkpoints import MAX_KEPT, Checkpoints


def test_the_saved_checkpoint_stays_before_what_a_sink_holds_and_the_oldest_is_kept_past_the_cap() -> None:
    c = Checkpoints(margin=1.0)
    for t in range(MAX_KEPT + 10):
        c.add(float(t * 2), {"r transcript": t})
    now = float((MAX_KEPT + 10) * 2)
    assert c.safe(now, held=0.5) is None  # nothing taken a margin before the held rows
    assert c.safe(now, held=1.0) == {"r transcript": 0}  # the oldest survived the cap
    assert c.safe(now, held=None) == {"r transcript": MAX_KEPT + 9}  # nothing held: one period behind
