"""`python -m bench.report_hostile OUT.jsonl SESSIONS LANES PER_TRACK`: an input made to fill `pipeline report`.

Why: the report's memory bound must hold for the worst input, not a realistic one: every session with as
many lanes and channels as it keeps, PER_TRACK marks on each track, texts at the 400-character cut with one
character outside the BMP (so Python stores all of it at 4 bytes a character), alerts with 20 new keywords of
80 such characters each (up to the 500 a session kept).
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson

CHANNELS = ("transcript", "audio_index", "visual_index", "alert")
T0 = 1_772_323_200_000


def round_of_marks(i: int, sessions: int, lanes: int) -> bytes:
    """The i-th mark of every track, one line each (time order)."""
    t = T0 + i * 1000
    out = []
    for s in range(sessions):
        for ln in range(lanes):
            for ch in CHANNELS:
                data = {"text": f"\U0001f600{i} " + "x" * 400, "start": t, "end": t + 900, "is_final": True}
                if ch == "alert":
                    matched = [f"\U0001f600{i}-{k}-" + "k" * 70 for k in range(20)]
                    data |= {"event_label": "L" * 80, "matched": matched, "severity": "critical"}
                out.append(orjson.dumps({"channel": ch, "capture_session_id": f"cap-{s:03d}",
                                         "rtstream_name": f"stream-{ln:02d}", "data": data}))
    return b"\n".join(out) + b"\n"


def main(argv: list[str]) -> None:
    path, sessions, lanes, per_track = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3])
    with open(path, "wb") as fh:
        for i in range(per_track):
            fh.write(round_of_marks(i, sessions, lanes))


if __name__ == "__main__":
    main(sys.argv[1:])
