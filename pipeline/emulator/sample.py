"""Generate config/samples/meeting-session.jsonl: the shipped scenario as a recorded session.

Why: replay demos and tests need a realistic recording in VideoDB's ws_listener.py
JSONL format (each event plus `ts`/`unix_ts`); deriving it from the scenario
keeps one source of truth. Run: `python -m pipeline.emulator.sample [OUT]`.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from pipeline.argparsing import Parser
from pipeline.emulator import scenario as sc
from pipeline.events import iso_ts
from pipeline.files import open_private

SAMPLE: Final = Path(__file__).resolve().parents[2] / "config" / "samples" / "meeting-session.jsonl"
#: When the recorded session became active (fixed, so the file is reproducible).
ACTIVE_AT: Final = datetime(2026, 3, 2, 10, 15, 0, tzinfo=UTC).timestamp()
SESSION_ID: Final = "cap-7f3a9c21-demo"
#: Seconds between a result's media end and its arrival at the listener, per channel.
LATENCY: Final = {"transcript": 0.35, "visual_index": 1.2, "audio_index": 0.8, "alert": 1.5,
                  sc.FAILED: 0.2}


def recorded_session(scn: sc.Scenario, active_at: float = ACTIVE_AT,
                     session_id: str = SESSION_ID) -> list[dict[str, Any]]:
    """Every event of one full session of `scn`, stamped as VideoDB's ws_listener.py would."""
    base_ms = round(active_at * 1000)
    timed: list[tuple[float, dict[str, Any]]] = [
        (active_at - 6.0, sc.lifecycle_event("created", session_id)),
        (active_at - 3.2, sc.lifecycle_event("starting", session_id)),
        (active_at, sc.lifecycle_event("active", session_id,
                                       {"rtstreams": [s.seed_shape() for s in scn.streams]})),
    ]
    failed = False
    for cue in scn.cues:
        timed.append((active_at + cue.at + LATENCY[cue.channel], sc.cue_event(scn, cue, base_ms, session_id)))
        if cue.channel == sc.FAILED:
            failed = True
            break
    if not failed:
        t = active_at + scn.end
        timed += [
            (t + 0.5, sc.lifecycle_event("stopping", session_id)),
            (t + 2.3, sc.lifecycle_event("stopped", session_id)),
            (t + 9.1, sc.lifecycle_event("exported", session_id, sc.export_data(session_id))),
        ]
    timed.sort(key=lambda te: te[0])
    return [{"ts": iso_ts(t), "unix_ts": round(t, 3), **ev} for t, ev in timed]


def main(argv: list[str]) -> int:
    """Write the sample (default path: config/samples/meeting-session.jsonl)."""
    parser = Parser(prog="python -m pipeline.emulator.sample",
                    description="Write the shipped scenario as a recorded session (JSONL).")
    parser.add_argument("out", nargs="?", type=Path, default=SAMPLE, metavar="OUT",
                        help="file to write (default: config/samples/meeting-session.jsonl)")
    out = parser.parse_args(argv).out
    lines = recorded_session(sc.load())
    with open_private(out, truncate=True) as fh:
        fh.write("".join(json.dumps(ev, ensure_ascii=False) + "\n" for ev in lines).encode())
    print(f"{out}: {len(lines)} events")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
