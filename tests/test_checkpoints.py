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


def test_checkpoints_kept_for_a_long_held_file_stay_few_and_span_the_whole_time() -> None:
    """Each checkpoint holds an entry per rtstream and channel (up to 100,000 with the session API), and one
    was kept every 2 s for as long as a sink held rows (a parquet file: 5 min by default, 150 checkpoints,
    up to 4,096): at 40,000 streams that was about 800 MB. At most MAX_KEPT are kept now, thinned evenly, so
    the one chosen is never after what a sink holds and at most a few spacings before it."""
    c = Checkpoints(margin=1.0)
    for t in range(150):
        c.add(float(t * 2), {"r transcript": t})
        assert len(c._taken) <= 16  # before: one per add, up to 4,096
    now = 300.0
    held = 200.0  # a file opened 100 s ago: checkpoints taken up to 199 s are safe
    got = c.safe(now, held)
    assert got is not None and got["r transcript"] * 2 <= held - 1.0
    assert got["r transcript"] * 2 >= held - 1.0 - 2 * 298.0 / (MAX_KEPT - 1), got
