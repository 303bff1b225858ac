"""What each API-managed capture session leaves for the garbage collector to track and walk.

Full collections walk every tracked object; with thousands of sessions their per-session objects set the
pause (248 ms at 5,000 sessions). Counted in-process: real source, controller and session API, the real
SDK against an emulator in its own process (so only the pipeline's objects count).
"""

from __future__ import annotations

from bench import session_census

BOUND = 45  # tracked objects a streaming session may add here (58 before: deques, SDK objects, closures; 32 now)


def test_a_streaming_session_adds_few_gc_tracked_objects() -> None:
    got = session_census.measure(50, warm=5)
    per, by_type = got["per_session"], got["by_type"]
    assert 10 < per < BOUND, by_type  # above 10: the sessions were made, bound and streamed (records, _Seen...)
    assert by_type.get("ManagedSession") == 1 and by_type.get("_Seen") == 4  # 4 rtstreams streamed per session
    # the dedupe window, the rtstreams, the on_index hook and the masked client token: nothing tracked per session
    assert not {"deque", "array", "RTStream", "function", "cell", "set"} & {k for k, v in by_type.items() if v >= 0.5}
