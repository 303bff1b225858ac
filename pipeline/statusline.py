"""A periodic status line in the log, and a progress bar for replays on a terminal."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any

log = logging.getLogger("pipeline.status")


class Rates:
    """Events per second of the source since the previous call."""

    def __init__(self, view: Any) -> None:
        self.view = view
        self._t = time.monotonic()
        self._n = self._count()

    def _count(self) -> int:
        src = self.view.built.source
        return src.context.stats.received if src is not None else sum(
            s.stats.received for s in self.view.built.sinks[:1])

    def rate(self) -> float:
        now, n = time.monotonic(), self._count()
        dt = max(now - self._t, 1e-9)
        r = (n - self._n) / dt
        self._t, self._n = now, n
        return r


def status_fields(view: Any, rate: float) -> dict[str, Any]:
    """The status line's values (also attached to JSON log records as fields)."""
    snap = view.snapshot()
    src = view.built.source
    fields: dict[str, Any] = {"rate": round(rate, 1), "events": src.context.stats.received if src else 0}
    if snap["lag"] is not None:
        fields["lag"] = snap["lag"]
    if snap["quiet_for"] is not None:
        fields["quiet_for"] = snap["quiet_for"]
    fields["queues"] = {s["name"]: s["queue"] for s in snap["sinks"]}
    stuck = {s["name"]: s["writing_for"] for s in snap["sinks"] if s.get("writing_for") is not None}
    if stuck:
        fields["writing_for"] = stuck
    flushing = {s["name"]: s["flushing_for"] for s in snap["sinks"] if s.get("flushing_for") is not None}
    if flushing:
        fields["flushing_for"] = flushing
    live = snap["source"]
    if live is not None and live["connected"] is not None:
        fields["websocket"] = "connected" if live["connected"] else "disconnected"
        if live.get("disconnected_for") is not None:
            fields["disconnected_for"] = live["disconnected_for"]
        if live["reconnects"]:
            fields["reconnects"] = live["reconnects"]
    if snap["session"] is not None:
        fields["session"] = snap["session"]["state"] or "none"
    if snap.get("sessions") is not None:  # the session API's
        fields["sessions"] = snap["sessions"]["live"]
    fields["alerts"] = snap["alerts_fired"]
    if snap["videodb_alerts"] is not None:
        fields["videodb_alerts"] = snap["videodb_alerts"]
    fields["dead_lettered"] = snap["dead_lettered"]
    fields["lost"] = snap["lost"]
    fields["dead_letter_full"] = snap.get("dead_letter_full", 0)
    fields["errors"] = sum(s["errors"] for s in snap["sinks"]) + sum(s["errors"] for s in snap["stages"])
    return fields


def format_status(f: dict[str, Any]) -> str:
    parts = [f"{f['rate']:.0f} ev/s", f"{f.get('events') or 0} events"]
    if "lag" in f:
        parts.append(f"lag {f['lag']:.1f}s")
    if "quiet_for" in f:
        parts.append(f"no events for {f['quiet_for']:.0f}s")
    if f["queues"]:
        parts.append("queued " + " ".join(f"{k}={v}" for k, v in f["queues"].items()))
    for name, secs in f.get("writing_for", {}).items():
        parts.append(f"{name} writing one batch for {secs:.0f}s")
    for name, secs in f.get("flushing_for", {}).items():
        parts.append(f"{name} flushing for {secs:.0f}s")
    for key in ("websocket", "session"):
        if key in f:
            parts.append(f"{key} {f[key]}")
            if key == "websocket" and "disconnected_for" in f:
                parts[-1] += f" for {f['disconnected_for']:.0f}s"

    if "sessions" in f:
        parts.append(f"sessions {f['sessions']} live")
    if f.get("reconnects"):
        parts.append(f"reconnects {f['reconnects']}")
    parts.append(f"rule alerts {f['alerts']}")  # made by rules stages; VideoDB's own come next
    if "videodb_alerts" in f:
        parts.append(f"videodb alerts {f['videodb_alerts']}")
    if f["dead_lettered"]:
        parts.append(f"dead-lettered {f['dead_lettered']}")
    if f["lost"]:
        parts.append(f"LOST {f['lost']}")
    if f.get("dead_letter_full"):
        parts.append(f"NOT DEAD-LETTERED {f['dead_letter_full']} (file full)")
    if f["errors"]:
        parts.append(f"errors {f['errors']}")
    return "status: " + ", ".join(parts)


async def status_loop(view: Any, interval: float) -> None:
    rates = Rates(view)
    while True:
        await asyncio.sleep(interval)
        fields = status_fields(view, rates.rate())
        log.info(format_status(fields), extra={"fields": fields})


async def progress_loop(view: Any, interval: float = 0.25) -> None:
    """A rich progress bar (events, rate, ETA from the file size) while a replay runs on a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    src = view.built.source
    path = getattr(getattr(src, "options", None), "path", None)
    try:
        total = os.path.getsize(path) if path else None
    except OSError:
        total = None
    columns = (TextColumn("replay {task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TextColumn("{task.fields[events]} events, {task.fields[rate]:.0f} ev/s"), TimeRemainingColumn())
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
    with Progress(*columns, console=Console(file=sys.stderr), transient=True, redirect_stderr=True) as bar:
        old = [h.setStream(sys.stderr) for h in handlers]  # log lines print above the bar
        rates = Rates(view)
        task = bar.add_task(os.path.basename(str(path or "")), total=total, events=0, rate=0.0)
        try:
            while True:
                await asyncio.sleep(interval)
                pos = getattr(src, "position", None)
                bar.update(task, completed=pos if isinstance(pos, int) else None,
                           events=src.context.stats.received, rate=rates.rate())
        finally:
            for h, o in zip(handlers, old, strict=True):
                if o is not None:
                    h.setStream(o)
