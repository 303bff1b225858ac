"""Sink `console`: one readable line per event, alerts highlighted."""

from __future__ import annotations

import os
import sys
from typing import Any

from pydantic import Field

from pipeline.api import Batch, Context, Event, Sink, SinkOptions
from pipeline.events import lifecycle_status, rtstream_label
from pipeline.termsafe import visible

_BOLD_RED, _DIM, _RESET = "\033[1;31m", "\033[2m", "\033[0m"


class ConsoleOptions(SinkOptions):
    max_text: int = Field(default=160, ge=10, description="truncate long texts to this many characters")
    color: bool | None = Field(default=None, description="ANSI colours; default: when stdout is a terminal "
                               "and NO_COLOR is not set")
    alerts_only: bool = Field(default=False, description="print only alerts and lifecycle changes")


class ConsoleSink(Sink):
    """Prints `[visual_index display:1] text…`, `[ALERT …]` lines and lifecycle changes."""

    name = "console"
    Options = ConsoleOptions

    def __init__(self, options: ConsoleOptions, context: Context, stream: Any = None) -> None:
        super().__init__(options, context)
        self.stream = stream or sys.stdout
        # https://no-color.org: a set NO_COLOR turns the default off; `color: true` still turns it on
        self.color = options.color if options.color is not None else (
            self.stream.isatty() and not os.environ.get("NO_COLOR"))
        self.printed = 0
        self.skipped = 0

    def line(self, event: Event) -> str | None:
        status = lifecycle_status(event)
        if status is not None:
            extra = ""
            data = event.get("data")
            if isinstance(data, dict):
                extra = " " + " ".join(f"{k}={data[k]}" for k in ("error", "exported_video_id", "player_url")
                                       if k in data)
            text = visible(f"[session {event.get('capture_session_id', '?')}] {status}{extra.rstrip()}")
            return f"{_DIM}{text}{_RESET}" if self.color else text
        ch = str(event.get("channel", "?"))
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        assert isinstance(data, dict)
        text = str(data.get("text", "")).replace("\n", " ")
        if len(text) > self.options.max_text:
            text = text[: self.options.max_text - 1] + "…"
        where = rtstream_label(event)
        if ch == "alert":
            sev = data.get("severity", "alert")
            matched = data.get("matched")
            tail = f" (matched: {', '.join(map(str, matched))})" if matched else ""
            out = visible(f"[ALERT {sev} {data.get('event_label', '?')} {where}] {text}{tail}")
            return f"{_BOLD_RED}{out}{_RESET}" if self.color else out
        if self.options.alerts_only:
            return None
        partial = "" if data.get("is_final", True) else " …"
        label = f"{ch} {where}" if where else ch
        return visible(f"[{label}]{partial} {text}")

    async def write(self, batch: Batch) -> None:
        lines = [ln for ln in map(self.line, batch) if ln is not None]
        self.printed += len(lines)
        self.skipped += len(batch) - len(lines)
        if lines:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()

    def report(self) -> dict[str, int]:
        """What was printed: the summary shows this instead of the events routed here."""
        out = {"written": self.printed}
        if self.skipped:
            out["skipped (alerts_only)"] = self.skipped
        return out
