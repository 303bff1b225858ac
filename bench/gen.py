"""Deterministic synthetic capture sessions in the seed's JSONL format, and keyword sets.

Why: every benchmark must read the same realistic input (session lifecycle,
partial and final transcripts, long visual-index descriptions, audio index,
VideoDB alerts), reproducibly from a seed, at any size. Files are cached under
`bench/out/` by (n, seed).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson

from pipeline.files import ensure_private_dir, open_private

#: Where generated inputs and benchmark outputs go; `BENCH_OUT` moves it (the smoke tests do).
OUT: Final = Path(os.environ.get("BENCH_OUT") or Path(__file__).resolve().parent / "out")
SEED: Final = 20260301
#: 2026-03-01T00:00:00Z; a million events at ~2.6 s apart span about a month.
T0: Final = 1772323200.0
EVENTS_PER_SESSION: Final = 2500

_PEOPLE = ["Priya", "Marco", "Dana", "Lena", "Tom", "Aisha", "Kenji", "Sofia"]
_APPS = ["VS Code", "Slack", "Jira", "Chrome", "a terminal", "GitHub", "Figma", "Google Docs", "Notion",
         "Grafana", "the AWS console", "Zoom", "Outlook", "a Jupyter notebook", "Postman", "Datadog"]
_OBJECTS = ["the release board", "a pull request", "the deployment pipeline", "a Python file", "the error log",
            "a spreadsheet of Q3 numbers", "the onboarding doc", "a design mockup", "the API reference",
            "a stack trace", "the billing dashboard", "a code review", "the test report", "a login form",
            "the sprint backlog", "a customer ticket", "the staging cluster", "a database query"]
_VERBS = ["is editing", "is scrolling through", "is reading", "opens", "switches to", "is typing in",
          "highlights a section of", "closes", "shares", "is reviewing", "comments on", "searches in"]
_DETAILS = ["with 3 unread messages", "showing 14 tickets in To Do", "with a red failing check",
            "next to a chat window", "in dark mode", "with two split panes", "at 125% zoom",
            "with a modal dialog asking for a password", "while a notification pops up",
            "with line numbers 120 to 160 visible", "showing a graph of p99 latency",
            "with the cursor on a function called handle_upload", "showing a merge conflict",
            "with a pinned channel called #incidents", "showing the word deadline in bold"]
_SPEECH = " ".join([
    "okay so I think we should move the deadline to Thursday because the migration is not done yet "
           "can you share your screen and walk us through the error we saw yesterday in staging "
           "the customer asked about pricing again and I told them we would follow up next week "
           "let me open the terminal and run the tests one more time before we merge this "
           "I am not sure the budget covers another contractor for the next quarter honestly "
           "we should write that down in the doc so nobody forgets the rollout plan for Europe "
           "did anyone look at the latency dashboard after the deploy on Monday morning "
           "sorry my connection dropped for a second what was the last thing you said about the launch "
           "the password for the shared account is in the vault please do not paste it in chat "
           "great let us take the action items and meet again on Friday at ten"]).split()
_SOUNDS = ["Discussion about scheduling a team meeting", "Two speakers debating a release date",
           "Keyboard typing and a notification chime", "A speaker presenting quarterly numbers",
           "Background music and a muffled conversation", "Someone describing a bug in the checkout flow",
           "Laughter, then a question about the budget", "A long pause followed by screen sharing",
           "The group agreeing on next steps for the launch", "A customer call about a billing problem"]
_LABELS = ["slack_opened", "password_prompt", "code_on_screen", "competitor_mentioned"]
_SYLL = ["ka", "lo", "mir", "ven", "dax", "or", "zu", "tel", "quin", "bar", "sto", "rel", "nix", "pa", "vor",
         "em", "ul", "sar", "fin", "gro", "ti", "wex", "jol", "ark"]
#: Keywords that do occur in generated texts (about what a real rule set would watch for).
REAL_KEYWORDS: Final = ["password", "terminal", "slack", "deadline", "pull request", "stack trace", "budget",
                        "pricing", "merge conflict", "error", "vault", "customer", "latency", "login",
                        "jira", "code review", "incidents", "rollout", "contractor", "billing"]
#: How many of REAL_KEYWORDS a generated keyword set uses: enough for a steady trickle of alerts.
HOT_KEYWORDS: Final = 6


def _visual(rng: random.Random) -> str:
    parts = [f"User {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} in {rng.choice(_APPS)} {rng.choice(_DETAILS)}"]
    for _ in range(rng.choice((0, 1, 1, 2, 3, 4))):
        parts.append(f"{rng.choice(_PEOPLE)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_DETAILS)}")
    return ". ".join(parts) + "."


def _speech(rng: random.Random, lo: int, hi: int) -> str:
    start = rng.randrange(len(_SPEECH))
    n = rng.randint(lo, hi)
    words = [_SPEECH[(start + i) % len(_SPEECH)] for i in range(n)]
    return " ".join(words).capitalize() + rng.choice((".", "?", ".", "..."))


def texts(rng: random.Random, size: int = 4096) -> dict[str, list[str]]:
    """Pools of realistic texts per channel (transcript 20-170 chars, visual 60-500, audio 40-200)."""
    visual = [_visual(rng) for _ in range(size)]
    for i in range(0, size, 50):  # index prompts may ask for JSON
        visual[i] = orjson.dumps({"app": rng.choice(_APPS), "activity": rng.choice(_VERBS),
                                  "object": rng.choice(_OBJECTS)}).decode()
    return {"transcript": [_speech(rng, 4, 30) for _ in range(size)],
            "visual_index": visual,
            "audio_index": [f"{rng.choice(_SOUNDS)}; {_speech(rng, 3, 20).lower()}" for _ in range(size)]}


def iso(unix: float) -> str:
    dt = datetime.fromtimestamp(unix, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def events(n: int, seed: int = SEED) -> Iterator[dict[str, Any]]:
    """`n` events of back-to-back capture sessions, each with lifecycle, stamped like the seed listener."""
    rng = random.Random(seed)
    pool = texts(rng)
    t = T0
    produced = 0
    session = 0
    while produced < n:
        session += 1
        sid = f"cap-{seed % 10000:04d}-{session:06d}"
        streams = [(f"rts-mic-{session}", "mic:default", ["audio"]),
                   (f"rts-sys-{session}", "system_audio:default", ["audio"]),
                   (f"rts-dsp-{session}", "display:1", ["video"])]
        life: list[dict[str, Any]] = [
            {"event": f"capture_session.{s}", "capture_session_id": sid, "status": s} for s in
            ("created", "starting", "active")]
        life[2]["data"] = {"rtstreams": [{"rtstream_id": r, "name": nm, "media_types": m} for r, nm, m in streams]}
        body = max(1, min(EVENTS_PER_SESSION, n - produced - 6))
        seq = [*life, *(_event(rng, pool, streams) for _ in range(body))]
        seq += [{"event": f"capture_session.{s}", "capture_session_id": sid, "status": s}
                for s in ("stopping", "stopped", "exported")]
        seq[-1]["data"] = {"exported_video_id": f"v_{session:08d}",
                           "stream_url": f"https://stream.videodb.io/v3/published/manifests/v_{session:08d}.m3u8",
                           "player_url": "https://console.videodb.io/player"}
        for ev in seq:
            if produced >= n:
                return
            t += rng.uniform(0.2, 5.0)
            data = ev.get("data")
            if isinstance(data, dict) and "_span" in data:
                span = data.pop("_span")
                end = int(t * 1000)
                if "event_label" in data:
                    data["timestamp"] = end
                else:
                    data["start"], data["end"] = end - span, end
            yield {"ts": iso(t), "unix_ts": round(t, 3), **ev}
            produced += 1


def _event(rng: random.Random, pool: dict[str, list[str]], streams: list[tuple[str, str, list[str]]]
           ) -> dict[str, Any]:
    r = rng.random()
    if r < 0.55:
        rid, name, _ = streams[0] if rng.random() < 0.7 else streams[1]
        data: dict[str, Any] = {"text": rng.choice(pool["transcript"]), "is_final": rng.random() >= 0.3,
                                "_span": rng.randint(800, 6000)}
        return {"channel": "transcript", "rtstream_id": rid, "rtstream_name": name, "data": data}
    if r < 0.85:
        rid, name, _ = streams[2]
        ch = "visual_index" if rng.random() < 0.9 else "scene_index"
        return {"channel": ch, "rtstream_id": rid, "rtstream_name": name,
                "data": {"text": rng.choice(pool["visual_index"]), "_span": rng.randint(2000, 10000)}}
    if r < 0.998:
        rid, name, _ = streams[rng.randrange(2)]
        return {"channel": "audio_index", "rtstream_id": rid, "rtstream_name": name,
                "data": {"text": rng.choice(pool["audio_index"]), "_span": rng.randint(5000, 20000)}}
    rid, _name, _ = streams[2]
    return {"channel": "alert", "rtstream_id": rid,
            "data": {"event_label": rng.choice(_LABELS), "text": rng.choice(pool["visual_index"]), "_span": 0}}


def dataset(n: int, seed: int = SEED) -> Path:
    """Path of a cached JSONL file with `n` generated events (written once)."""
    ensure_private_dir(OUT)
    path = OUT / f"events-{n}-{seed}.jsonl"
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp")
    with open_private(tmp, truncate=True) as fh:
        buf = bytearray()
        for ev in events(n, seed):
            buf += orjson.dumps(ev, option=orjson.OPT_APPEND_NEWLINE)
            if len(buf) > 1 << 20:
                fh.write(buf)
                buf.clear()
        fh.write(buf)
    tmp.replace(path)
    return path


def keywords(n: int, seed: int = SEED) -> list[str]:
    """`n` keywords: the real ones texts contain first, then invented product/code names (about 10% phrases).

    Why: a large rule set is mostly names that rarely appear, so alert volume stays comparable across sizes
    and the benchmark measures the matcher, not alert building.
    """
    rng = random.Random(seed + n)
    out = list(REAL_KEYWORDS[: min(n, HOT_KEYWORDS)])
    seen = set(out)
    while len(out) < n:
        word = "".join(rng.choice(_SYLL) for _ in range(rng.randint(2, 4)))
        kw = f"{word} {rng.choice(_SYLL)}{rng.randint(1, 99)}" if rng.random() < 0.1 else word
        if kw not in seen:
            seen.add(kw)
            out.append(kw)
    return out
