"""Webhook bodies for one alert or a digest: generic JSON, Slack, Discord, or a user template.

Slack and Discord follow their incoming-webhook shapes (Slack: `text` fallback
plus Block Kit `blocks`; Discord: `content` plus one `embeds` entry) and stay
under their documented length limits. Screen and speech text is untrusted, so
Slack markup is escaped and Discord mentions are disabled.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pipeline.events import Event, data, event_time_ms, iso_ts, rtstream_label, text

from .idempotency import label
from .template import render

#: Discord embed colours by severity; unknown severities are grey.
COLORS = {"critical": 0xE01E5A, "error": 0xE01E5A, "warning": 0xECB22E, "info": 0x36C5F0}
GREY = 0x99AAB5
DIGEST_LINE = 200
DISCORD_EMBED_TOTAL = 6000  # Discord refuses (400) an embed whose title, description and fields sum past this


@dataclass(frozen=True, slots=True)
class Facts:
    """What a human needs to read about one alert."""

    label: str
    severity: str
    text: str
    stream: str
    session: str
    time_ms: int
    time: str
    origin: str
    matched: str
    iso: str = ""  # `time` when it is a real ISO-8601 instant (Discord refuses an embed timestamp that is not)

    @property
    def title(self) -> str:
        return f"{self.label} ({self.severity})" if self.severity else self.label

    @property
    def line(self) -> str:
        where = f" · {self.stream}" if self.stream else ""
        return cut(f"{self.time} · {self.label}{where}: {self.text}", DIGEST_LINE)


def _when(event: Event, ms: int) -> tuple[str, str]:
    """(shown time, ISO-8601 or ""): an event time no calendar holds (a nanosecond clock) is shown as the
    number it is, never an error that would dead-letter the alert (or a whole digest with it)."""
    if ms:
        try:
            iso = iso_ts(ms / 1000)
        except (OverflowError, ValueError, OSError):
            return str(ms), ""
        return iso, iso
    ts = event.get("ts")
    if not isinstance(ts, str) or not ts:
        return "", ""
    try:
        datetime.fromisoformat(ts)
    except ValueError:
        return ts[:64], ""
    return ts[:64], ts[:64]


def facts(event: Event) -> Facts:
    """Extract the display fields of an alert event (VideoDB's or the rules stage's)."""
    d = data(event)
    ms = event_time_ms(event)
    matched = d.get("matched")
    shown, iso = _when(event, ms)
    return Facts(
        label=label(event),
        severity=str(d.get("severity") or ""),
        text=text(event),
        stream=rtstream_label(event),
        session=str(event.get("capture_session_id") or ""),
        time_ms=ms,
        time=shown,
        origin=str(event.get("origin") or "videodb"),
        matched=", ".join(map(str, matched)) if isinstance(matched, list) else "",
        iso=iso,
    )


def cut(value: str, limit: int) -> str:
    """Truncate to `limit` characters with an ellipsis."""
    return value if len(value) <= limit else value[: limit - 1] + "…"


def slack_escape(value: str) -> str:
    """Escape Slack control characters so `<!channel>` in screen text cannot ping anyone."""
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def mrkdwn(value: str, limit: int = 3000) -> dict[str, str]:
    """A Slack mrkdwn text object with untrusted `value` escaped and cut to `limit`."""
    return {"type": "mrkdwn", "text": cut(slack_escape(value), limit)}


def header(value: str) -> dict[str, Any]:
    """A Slack header block (plain text, at most 150 characters)."""
    return {"type": "header", "text": {"type": "plain_text", "text": cut(value, 150), "emoji": True}}


def template_values(event: Event, f: Facts, key: str) -> dict[str, Any]:
    """Event keys plus computed `label`, `severity`, `text`, `stream`, `session`, `time`, `key`."""
    values = dict(event)
    values.setdefault("data", {})
    values.update(label=f.label, severity=f.severity, text=f.text, stream=f.stream,
                  session=f.session, time=f.time, key=key)
    return values


# -- one alert -------------------------------------------------------------------------------

def json_alert(event: Event, key: str) -> dict[str, Any]:
    return {"type": "alert", "idempotency_key": key, "alert": event}


def slack_alert(f: Facts) -> dict[str, Any]:
    fields = [(name, value) for name, value in (("Stream", f.stream), ("Session", f.session),
                                                 ("Event time", f.time), ("Matched", f.matched)) if value]
    blocks: list[dict[str, Any]] = [header(f":rotating_light: {f.title}")]
    if f.text:
        blocks.append({"type": "section", "text": mrkdwn(f.text)})
    if fields:
        blocks.append({"type": "section",
                       "fields": [mrkdwn(f"*{name}*\n{value}", 2000) for name, value in fields]})
    blocks.append({"type": "context", "elements": [mrkdwn(f"videodb-pipeline · {f.origin}")]})
    where = f" on {f.stream}" if f.stream else ""
    fallback = f"[{f.severity or 'alert'}] {f.label}{where}: {f.text}"
    return {"text": cut(slack_escape(fallback), 3000), "blocks": blocks}


def _discord_room(title: str, fields: list[dict[str, Any]]) -> int:
    """Characters left for an embed's description: 4096, less what the 6000 total leaves after the rest."""
    used = len(title) + sum(len(x["name"]) + len(x["value"]) for x in fields)
    return max(1, min(4096, DISCORD_EMBED_TOTAL - used))


def discord_alert(f: Facts) -> dict[str, Any]:
    fields = [{"name": name, "value": cut(value, 1024), "inline": inline}
              for name, value, inline in (("Stream", f.stream, True), ("Session", f.session, True),
                                          ("Matched", f.matched, False)) if value]
    title = cut(f.title, 256)
    embed: dict[str, Any] = {"title": title, "description": cut(f.text, _discord_room(title, fields)),
                             "fields": fields, "color": COLORS.get(f.severity.lower(), GREY)}
    if f.iso:
        embed["timestamp"] = f.iso
    where = f" on {f.stream}" if f.stream else ""
    return {"content": cut(f"**{f.title}**{where}", 2000), "embeds": [embed],
            "allowed_mentions": {"parse": []}}


# -- a digest of many alerts -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Digest:
    """Summary of alerts folded into one message because the rate limit was reached."""

    count: int
    labels: dict[str, int]
    first: str
    last: str
    members: list[Facts]

    @classmethod
    def of(cls, events: list[Event]) -> Digest:
        members = sorted((facts(e) for e in events), key=lambda f: f.time_ms)
        labels = dict(Counter(f.label for f in members).most_common())
        return cls(len(members), labels, members[0].time, members[-1].time, members)

    @property
    def summary(self) -> str:
        top = ", ".join(f"{name} x{n}" for name, n in list(self.labels.items())[:10])
        return f"{self.count} alerts (rate-limited digest): {top}"

    def lines(self, limit: int, budget: int, render_line: Callable[[Facts], str] | None = None) -> str:
        """Up to `limit` member lines within `budget` characters, then "… and N more"."""
        out: list[str] = []
        used = 0
        for f in self.members[:limit]:
            line = render_line(f) if render_line else f.line
            if used + len(line) + 1 > budget - 40:
                break
            out.append(line)
            used += len(line) + 1
        if len(out) < self.count:
            out.append(f"… and {self.count - len(out)} more")
        return "\n".join(out)


def json_digest(events: list[Event], keys: list[str], key: str, dg: Digest) -> dict[str, Any]:
    return {"type": "digest", "idempotency_key": key, "count": dg.count, "labels": dg.labels,
            "first_time": dg.first, "last_time": dg.last, "member_keys": keys, "alerts": events}


def slack_digest(dg: Digest, items: int) -> dict[str, Any]:
    body = dg.lines(items, 3000, lambda f: "• " + slack_escape(f.line))
    blocks: list[dict[str, Any]] = [
        header(f":bell: {dg.count} alerts (digest)"),
        {"type": "section", "text": {"type": "mrkdwn", "text": body}},
        {"type": "context", "elements": [mrkdwn(f"{dg.first} → {dg.last} · videodb-pipeline")]},
    ]
    return {"text": cut(slack_escape(dg.summary), 3000), "blocks": blocks}


def discord_digest(dg: Digest, items: int) -> dict[str, Any]:
    fields = [{"name": cut(name, 100), "value": f"x{n}", "inline": True}  # 25 x 100: room is left for the text
              for name, n in list(dg.labels.items())[:25]]
    severities = [f.severity.lower() for f in dg.members]
    color = next((COLORS[s] for s in ("critical", "error", "warning", "info") if s in severities), GREY)
    title = cut(f"{dg.count} alerts (digest)", 256)
    embed: dict[str, Any] = {"title": title, "description": dg.lines(items, _discord_room(title, fields)),
                             "fields": fields, "color": color}
    if dg.members[-1].iso:
        embed["timestamp"] = dg.members[-1].iso
    return {"content": cut(f"**{dg.count} alerts** between {dg.first} and {dg.last}", 2000),
            "embeds": [embed], "allowed_mentions": {"parse": []}}


# -- entry point -----------------------------------------------------------------------------

def build(fmt: str, events: list[Event], keys: list[str], key: str, *,
          template: str | None = None, digest_items: int = 20) -> dict[str, Any]:
    """The JSON body for `events` (one alert, or a digest when several) in format `fmt`."""
    if len(events) == 1:
        event = events[0]
        if fmt == "json":
            return json_alert(event, key)
        f = facts(event)
        if fmt == "slack":
            return slack_alert(f)
        if fmt == "discord":
            return discord_alert(f)
        return {"text": render(template or "", template_values(event, f, key))}
    dg = Digest.of(events)
    if fmt == "json":
        return json_digest(events, keys, key, dg)
    if fmt == "slack":
        return slack_digest(dg, digest_items)
    if fmt == "discord":
        return discord_digest(dg, digest_items)
    ordered = sorted(zip(events, keys, strict=True), key=lambda pair: event_time_ms(pair[0]))
    shown = [render(template or "", template_values(e, facts(e), k)) for e, k in ordered[:digest_items]]
    more = f"\n… and {dg.count - len(shown)} more" if dg.count > len(shown) else ""
    return {"text": f"{dg.summary}\n" + "\n".join(shown) + more}
