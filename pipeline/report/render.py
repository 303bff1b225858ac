"""Render one session summary as a self-contained HTML page (inline SVG, CSS and a little JS).

Every piece of event text is hostile input (screen text can contain markup):
it only ever reaches the page through `esc()`, and the page's Content-Security-
Policy runs no script but its own (a per-page nonce) and loads nothing from the
network.
"""

from __future__ import annotations

import html
import math
import secrets
from datetime import UTC, datetime
from importlib import resources
from string import Template
from typing import Final

from pipeline.report.collect import MARK_CHANNELS, MAX_KEYWORDS, Collected, Lane, Mark, Session

LABELS: Final = {"transcript": "transcript", "audio_index": "audio index", "visual_index": "visual index",
                 "alert": "alert"}
GUTTER: Final = 240
TRACK: Final = 16
TRACK_GAP: Final = 4
LANE_GAP: Final = 12
TOP: Final = 58  # axis + lifecycle row
MAX_PAGE_MARKS: Final = 12_000  # marks drawn per page, all lanes and tracks together
TICKS: Final = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)


def esc(v: object) -> str:
    return html.escape(str(v), quote=True)


def clock(ms: int) -> str:
    """UTC wall-clock time of an event time (HH:MM:SS)."""
    try:
        return datetime.fromtimestamp(ms / 1000, UTC).strftime("%H:%M:%S")
    except (OverflowError, ValueError, OSError):
        return "?"


def day_clock(ms: int) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, ValueError, OSError):
        return "?"


def duration(ms: int) -> str:
    s = max(0, ms) // 1000
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else (f"{m}m {sec:02d}s" if m else f"{sec}s")


def offset(ms: int, t0: int) -> str:
    s = max(0, ms - t0) // 1000
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"+{h}:{m:02d}:{sec:02d}" if h else f"+{m}:{sec:02d}"


def _asset(name: str) -> str:
    return (resources.files("pipeline.report") / "static" / name).read_text(encoding="utf-8")


class _Scale:
    """Event time (ms) -> x pixel inside the plot area."""

    def __init__(self, t0: int, t1: int, width: int) -> None:
        self.t0, self.t1 = t0, max(t1, t0 + 1000)
        self.width = width

    def x(self, t: int) -> float:
        return GUTTER + (min(max(t, self.t0), self.t1) - self.t0) * self.width / (self.t1 - self.t0)


def _share(lengths: list[int], budget: int) -> int:
    """The most marks any one track may draw so that all of them draw at most `budget` (small tracks keep all)."""
    lengths = sorted(lengths)
    for i, n in enumerate(lengths):
        share = budget // (len(lengths) - i)
        if n > share:
            return max(1, share)
        budget -= n
    return max([1, *lengths])


def drawn_marks(s: Session) -> dict[str, list[Mark]]:
    """Lane name -> the marks it draws: past MAX_PAGE_MARKS on the page, the biggest tracks are thinned evenly.

    A mark's tooltip is up to ~2.5 KB once escaped: 8 lanes x 4 tracks x 1,500 quote-filled marks (a 63 MB
    input) made a 157 MB page and took 690 MB of memory; 33 lanes, the most, about four times that."""
    tracks = [t for ln in s.lanes.values() for t in ln.tracks.values()]
    cap = _share([len(t.marks) for t in tracks], MAX_PAGE_MARKS)
    return {ln.name: [m for t in ln.tracks.values() for m in t.marks[::max(1, math.ceil(len(t.marks) / cap))]]
            for ln in s.lanes.values()}


def _left_out(s: Session, drawn: dict[str, list[Mark]]) -> str:
    """Says how many marks the timeline does not draw, and why (nothing when it draws them all)."""
    seen = sum(ln.seen for ln in s.lanes.values())
    left = seen - sum(map(len, drawn.values()))
    if not left:
        return ""
    tracks = [t for ln in s.lanes.values() for t in ln.tracks.values()]
    shared = (" Memory for marks is shared by all sessions of one report: report fewer at a time to keep more."
              if any(len(t.marks) < t.seen and t.cap < t.base for t in tracks) else "")  # the budget thinned it
    return (f'<p class="note">{left} of {seen} marks are not drawn: crowded tracks are thinned evenly over the '
            f"session, to keep memory and the page bounded.{shared}</p>")


def _tracks(lane: Lane) -> list[str]:
    return [ch for ch in MARK_CHANNELS if ch in lane.tracks]


def timeline(s: Session, gap_ms: int, drawn: dict[str, list[Mark]]) -> str:
    """The SVG: an axis, lifecycle markers, then one lane per rtstream with a track per channel."""
    t0, t1 = s.t_min or 0, s.t_max or 0
    span_s = max(1, (t1 - t0) // 1000)
    width = int(min(6000, max(900, span_s * 6)))
    sc = _Scale(t0, t1, width)
    lanes = sorted(s.lanes.values(), key=lambda ln: ln.name)
    height = TOP + sum(len(_tracks(ln)) * (TRACK + TRACK_GAP) + LANE_GAP for ln in lanes) + 10
    total = GUTTER + width + 20
    out = [f'<svg class="timeline" width="{total}" height="{height}" '
           f'viewBox="0 0 {total} {height}" role="img" aria-label="timeline">',
           '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
           'patternTransform="rotate(45)"><rect width="6" height="6" fill="#f3f4f6"/>'
           '<line x1="0" y1="0" x2="0" y2="6" stroke="#d1d5db" stroke-width="3"/></pattern></defs>']
    most = max(4, width // 110)  # tick labels that fit
    # an event far off the rest (a unix_ts in ms by mistake) spans centuries: whole days, still `most` ticks
    step = next((t for t in TICKS if span_s / t <= most), -(-span_s // (most * 86400)) * 86400) * 1000
    first = -(-t0 // step) * step
    for t in range(first, t1 + 1, step) if step else ():
        x = sc.x(t)
        out.append(f'<line class="grid" x1="{x:.1f}" y1="22" x2="{x:.1f}" y2="{height - 6}"/>'
                   f'<text class="tick" x="{x:.1f}" y="16">{esc(clock(t))}</text>')
    for a, b in s.longest_gaps(gap_ms)[0]:
        x0, x1 = sc.x(a), sc.x(b)
        out.append(f'<rect class="gap" x="{x0:.1f}" y="24" width="{max(2.0, x1 - x0):.1f}" height="{height - 30}" '
                   f'data-tip="{esc(f"no events for {duration(b - a)} ({clock(a)} to {clock(b)})")}"/>')
    for a, b in s.backfill_spans:
        x0, x1 = sc.x(a), sc.x(b)
        out.append(f'<rect class="backfill-span" x="{x0:.1f}" y="38" width="{max(4.0, x1 - x0):.1f}" height="6" '
                   f'data-tip="{esc(f"backfilled events {clock(a)} to {clock(b)}")}"/>')
    out.append(f'<text class="lane-name" x="8" y="{TOP - 14}">session</text>')
    for t, status in s.lifecycle.marks:
        x = sc.x(t)
        out.append(f'<g class="life" data-tip="{esc(f"{status} at {clock(t)}")}">'
                   f'<line x1="{x:.1f}" y1="{TOP - 22}" x2="{x:.1f}" y2="{height - 6}"/>'
                   f'<circle cx="{x:.1f}" cy="{TOP - 18}" r="4"/></g>')
    y = TOP
    for ln in lanes:
        tracks = _tracks(ln)
        lane_h = len(tracks) * (TRACK + TRACK_GAP)
        out.append(f'<g class="lane" data-lane="{esc(ln.name)}">'
                   f'<rect class="lane-bg" x="0" y="{y - 3}" width="{total}" height="{lane_h + 2}"/>'
                   f'<text class="lane-name" x="8" y="{y + 12}"><title>{esc(ln.name)}</title>'
                   f'{esc(ln.name if len(ln.name) <= 22 else ln.name[:21] + "…")}</text>')
        rows = {ch: y + i * (TRACK + TRACK_GAP) for i, ch in enumerate(tracks)}
        for ch, ry in rows.items():
            out.append(f'<text class="track-name" x="{GUTTER - 8}" y="{ry + 12}">{LABELS[ch]}</text>')
        for m in drawn[ln.name]:
            ry = rows[m.channel]
            x0 = sc.x(m.start)
            cls = f"m {m.channel}" + (" backfill" if m.backfill else "")
            when = clock(m.start)
            head = f"{m.label} · " if m.label else ""
            tip = f"{LABELS[m.channel]} · {ln.name} · {when}{' · backfilled' if m.backfill else ''}\n{head}{m.text}"
            if m.channel == "alert":
                cx, cy = x0, ry + TRACK / 2
                out.append(f'<path id="m{m.id}" class="{cls}" d="M{cx:.1f} {cy - 7:.1f}l7 7-7 7-7-7z" '
                           f'data-tip="{esc(tip)}"/>')
            else:
                w = max(3.0, sc.x(m.end) - x0 - 1)
                out.append(f'<rect id="m{m.id}" class="{cls}" x="{x0:.1f}" y="{ry}" width="{w:.1f}" '
                           f'height="{TRACK}" rx="2" data-tip="{esc(tip)}"/>')
        out.append("</g>")
        y += lane_h + LANE_GAP
    out.append("</svg>")
    return "".join(out)


def _talk(s: Session) -> str:
    lanes = sorted((ln for ln in s.lanes.values() if "transcript" in ln.tracks), key=lambda ln: -ln.talk_ms)
    if not lanes:
        return '<p class="none">No final transcripts.</p>'
    top = max(ln.talk_ms for ln in lanes) or 1
    rows = "".join(
        f'<tr class="talk-row"><td>{esc(ln.name)}</td><td class="num">{esc(duration(ln.talk_ms))}</td>'
        f'<td class="num">{ln.words}</td><td class="bar-cell"><div class="bar" '
        f'style="width:{100 * ln.talk_ms / top:.1f}%"></div></td></tr>' for ln in lanes)
    return ('<table><thead><tr><th>stream</th><th>talk time</th><th>words</th><th></th></tr></thead>'
            f"<tbody>{rows}</tbody></table>")


def _alerts(s: Session, t0: int, marks: dict[str, list[Mark]]) -> str:
    if not s.alerts:
        return '<p class="none">No alerts.</p>'
    rows = []
    drawn = {m.id for ms in marks.values() for m in ms if m.channel == "alert"}
    for a in sorted(s.alerts, key=lambda a: a.time):
        when = (f'<a class="jump" href="#m{a.mark}" data-mark="m{a.mark}">{esc(offset(a.time, t0))}</a>'
                if a.mark in drawn else esc(offset(a.time, t0)))  # thinned off a crowded timeline: no link
        chips = "".join(f'<span class="chip">{esc(m)}</span>' for m in a.matched)
        sev = esc(a.severity or "-")
        rows.append(
            f'<tr class="alert-row"><td class="num">{when}<div class="sub">{esc(clock(a.time))}</div></td>'
            f'<td><b>{esc(a.label)}</b><div class="sub">{esc(a.origin)}</div></td>'
            f'<td><span class="sev sev-{sev if sev in ("info", "warning", "critical") else "other"}">{sev}</span></td>'
            f'<td>{esc(a.lane)}</td><td>{chips}</td><td class="text">{esc(a.text)}</td></tr>')
    more = (f'<p class="note">{s.alerts_total - len(s.alerts)} more alerts not listed.</p>'
            if s.alerts_total > len(s.alerts) else "")
    return ('<table class="alerts"><thead><tr><th>when</th><th>alert</th><th>severity</th><th>stream</th>'
            f'<th>matched</th><th>text</th></tr></thead><tbody>{"".join(rows)}</tbody></table>{more}')


def _keywords(s: Session) -> str:
    if not s.keywords:
        return '<p class="none">No matched keywords (they come from <code>rules</code> alerts).</p>'
    items = sorted(s.keywords.items(), key=lambda kv: (-kv[1], kv[0]))
    more = (f'<p class="note">{s.keywords_uncounted} more matches of keywords past the first {MAX_KEYWORDS:,} '
            "distinct ones are not counted here.</p>" if s.keywords_uncounted else "")
    return '<div class="chips">' + "".join(
        f'<span class="chip kw">{esc(k)} <b>{n}</b></span>' for k, n in items) + f"</div>{more}"


def _lifecycle(s: Session, t0: int) -> str:
    if not s.lifecycle.marks:
        return '<p class="none">No lifecycle events.</p>'
    entries = sorted(s.lifecycle.marks, key=lambda m: m[0])  # equal times keep arrival order
    rows = "".join(f'<tr><td class="num">{esc(offset(t, t0))}</td><td class="num">{esc(day_clock(t))}</td>'
                   f"<td>{esc(status)}</td></tr>" for t, status in entries)
    left = s.lifecycle.seen - len(entries)
    more = f'<p class="note">{left} more lifecycle events not listed (thinned evenly).</p>' if left else ""
    return (f"<table><thead><tr><th>when</th><th>UTC</th><th>status</th></tr></thead><tbody>{rows}</tbody>"
            f"</table>{more}")


def _gaps(s: Session, gap_ms: int, t0: int) -> str:
    gaps, total = s.longest_gaps(gap_ms)
    items = [f"<li>no events for <b>{esc(duration(b - a))}</b> from {esc(clock(a))} ({esc(offset(a, t0))})</li>"
             for a, b in gaps]
    if total > len(gaps):
        items.append(f"<li>… and {total - len(gaps)} shorter stretches without events not listed</li>")
    items += [f"<li>backfilled events from {esc(clock(a))} to {esc(clock(b))}</li>" for a, b in s.backfill_spans]
    if not items:
        return f'<p class="none">No stretch of {esc(duration(gap_ms))} or more without events; nothing backfilled.</p>'
    return f'<ul class="gaps">{"".join(items)}</ul>'


def _cards(s: Session) -> str:
    talk = sum(ln.talk_ms for ln in s.lanes.values())
    total = sum(s.counts.values())
    cards = [("events", str(total)), ("duration", duration((s.t_max or 0) - (s.t_min or 0))),
             ("streams", str(len(s.lanes))), ("talk time", duration(talk)), ("alerts", str(s.alerts_total)),
             ("backfilled", str(s.backfill))]
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{esc(v)}</div><div class="k">{esc(k)}</div></div>' for k, v in cards
    ) + "</div>"


def _legend() -> str:
    return '<div class="legend">' + "".join(
        f'<span><i class="sw {ch}"></i>{LABELS[ch]}</span>' for ch in MARK_CHANNELS) + (
        '<span><i class="sw backfill"></i>backfilled</span><span><i class="sw gap"></i>no events</span>'
        '<span><i class="sw life"></i>lifecycle</span></div>')


def render(s: Session, c: Collected, gap_ms: int) -> str:
    """The whole page for one session."""
    t0 = s.t_min or 0
    drawn = drawn_marks(s)
    svg = timeline(s, gap_ms, drawn)
    counts = ", ".join(f"{esc(k)} {n}" for k, n in sorted(s.counts.items()))
    dead = f", {c.dead_letters} dead-letter record{'s' * (c.dead_letters != 1)} left out" if c.dead_letters else ""
    body = f"""
<header><h1>Capture session <span class="sid">{esc(s.id)}</span></h1>
<p class="meta">{esc(day_clock(t0))} to {esc(clock(s.t_max or 0))} UTC · {counts}</p></header>
{_cards(s)}
<section><h2>Timeline</h2>{_legend()}{_left_out(s, drawn)}<div class="scroll" id="timeline">{svg}</div>
<p class="hint">Hover a mark for its text; click an alert's time below to find it here.</p></section>
<div class="cols">
<section><h2>Talk time per stream</h2>{_talk(s)}</section>
<section><h2>Keywords matched</h2>{_keywords(s)}</section>
</div>
<section><h2>Alerts</h2>{_alerts(s, t0, drawn)}</section>
<div class="cols">
<section><h2>Lifecycle</h2>{_lifecycle(s, t0)}</section>
<section><h2>Gaps and backfills</h2>{_gaps(s, gap_ms, t0)}</section>
</div>
<footer>Built by <code>pipeline report</code> from {len(c.files)} file(s), {c.lines} lines
({c.duplicates} duplicates and {c.skipped} unreadable lines skipped{dead}). Times are event times, UTC.</footer>
<div id="tip" hidden></div>"""
    nonce = secrets.token_urlsafe(16)
    return Template(_asset("template.html")).substitute(
        title=esc(f"Session {s.id}"), nonce=nonce, css=_asset("report.css"), js=_asset("report.js"), body=body)
