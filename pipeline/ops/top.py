"""`pipeline top URL`: a live terminal table of a running pipeline, refreshed every second."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from pipeline.argparsing import Parser
from pipeline.errors import ConfigError
from pipeline.logs import log_options
from pipeline.ops.client import TOKEN_ENV, Busy, base_url, open_url, read_json, stop_on_ctrl_c
from pipeline.termsafe import visible

#: What every status snapshot has (`/api/status`); an answer without them is not a pipeline's
KEYS = ("pipeline", "ready", "stages", "sinks", "alerts", "uptime", "alerts_fired", "dead_lettered")


def _seconds(text: str) -> float:
    """`--interval`: a number of seconds a clock can wait (inf or 1e300 ended in a traceback from sleep)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 86400:  # (NaN compares False)
        raise argparse.ArgumentTypeError(f"expected seconds between 0 and 86400 (1 day), got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="pipeline top", description="live table of a running pipeline's stages "
               "and sinks: rates, queue depths, lag, errors, alerts")
    p.add_argument("url", help="the pipeline's operator address, e.g. http://127.0.0.1:9464")
    p.add_argument("--interval", type=_seconds, default=1.0, help="seconds between refreshes (default 1)")
    p.add_argument("--once", action="store_true", help="print one table (rates over one interval) and exit")
    p.add_argument("--token", help=f"bearer token (default: ${TOKEN_ENV})")
    log_options(p, True)
    return p


class Rates:
    """Per-second rates from two snapshots' counters."""

    def __init__(self) -> None:
        self.prev: dict[str, float] = {}
        self.t = 0.0

    def update(self, now: float, values: dict[str, float]) -> dict[str, float]:
        dt = now - self.t
        out = {k: max(0.0, (v - self.prev[k]) / dt) if self.prev and k in self.prev and dt > 0 else 0.0
               for k, v in values.items()}
        self.prev, self.t = values, now
        return out


def _secs(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1000:.1f}ms" if s < 1 else f"{s:.1f}s"


def _latency(sink: dict[str, Any]) -> Any:
    """The latency cell: `writing 42s` while a batch has been in the sink that long (`flushing 42s`: the
    runtime's flush), else the last batch's latency with its age once it is a few seconds old
    (`12.0ms, 300s ago`)."""
    from rich.text import Text

    if sink.get("writing_for") is not None:
        return Text(f"writing {sink['writing_for']:.0f}s", style="yellow")
    if sink.get("flushing_for") is not None:
        return Text(f"flushing {sink['flushing_for']:.0f}s", style="yellow")
    if sink.get("latency_age") is not None and sink.get("latency") is not None:
        return Text(f"{_secs(sink['latency'])}, {sink['latency_age']:.0f}s ago")
    return Text(_secs(sink.get("latency")))


def _clock(event: dict[str, Any]) -> str:
    """HH:MM:SS (UTC) of the event's receipt stamp."""
    ts = event.get("ts")
    if isinstance(ts, str):
        return ts[11:19]
    unix = event.get("unix_ts")
    try:
        return time.strftime("%H:%M:%S", time.gmtime(unix)) if isinstance(unix, int | float) else ""
    except (OverflowError, OSError, ValueError):  # it came with the event: 1e300 is no time
        return ""


def render(snap: dict[str, Any], rates: dict[str, float]) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    def cell(v: Any) -> Text:  # a plain string would be parsed as rich markup: `[/bold]` in event text raises
        return Text(visible(str(v)))

    ready = snap["ready"]
    head = Text()
    head.append(visible(f"pipeline {snap['pipeline']}  "), style="bold")
    head.append("ready" if not ready else visible("NOT READY: " + "; ".join(f"{k} {v}" for k, v in ready.items())),
                style="green" if not ready else "yellow")
    src = snap.get("source") or {}
    if src.get("connected") is not None:
        down = f" for {_secs(src['disconnected_for'])}" if src.get("disconnected_for") is not None else ""
        head.append("  websocket " + ("connected" if src["connected"] else "DISCONNECTED" + down),
                    style="green" if src["connected"] else "red")
        if src.get("reconnects"):
            head.append(f" ({src['reconnects']} reconnects)")
    if snap.get("session"):
        head.append(visible(f"  session {snap['session']['state'] or 'none'}"))
    if snap.get("sessions"):
        head.append(f"  sessions {snap['sessions']['live']} live")
    head.append(f"  lag {_secs(snap.get('lag'))}")
    if snap.get("quiet_for") is not None:
        head.append(f" (no events for {snap['quiet_for']:.0f}s)", style="yellow")
    head.append(f"  up {snap['uptime']:.0f}s")
    head.append(f"  rule alerts {snap['alerts_fired']}")
    if isinstance(snap.get("videodb_alerts"), int):  # (absent from an older pipeline's status)
        head.append(f"  videodb alerts {snap['videodb_alerts']}")
    head.append(f"  dead-lettered {snap['dead_lettered']}", style="red" if snap["dead_lettered"] else "")
    if snap.get("lost"):  # (absent from an older pipeline's status)
        head.append(f"  LOST {snap['lost']}", style="bold red")
    if snap.get("dead_letter_full"):
        head.append(f"  NOT DEAD-LETTERED {snap['dead_letter_full']} (file full)", style="bold red")

    t = Table(expand=True, header_style="bold")
    t.add_column("stage", no_wrap=True, min_width=16)
    for col in ("in/s", "out/s", "in", "out", "drop", "queue", "latency", "err"):
        t.add_column(col, justify="right", no_wrap=True)
    for st in snap["stages"]:
        t.add_row(cell(st["name"]), f"{rates.get('in:' + st['name'], 0):.1f}",
                  f"{rates.get('out:' + st['name'], 0):.1f}", str(st["in"]), str(st["out"]), str(st["dropped"]),
                  "", "", Text(str(st["errors"]), style="red" if st["errors"] else ""))
    for k in snap["sinks"]:
        t.add_row(cell(k["name"]), f"{rates.get('in:' + k['name'], 0):.1f}",
                  f"{rates.get('out:' + k['name'], 0):.1f}", str(k["in"]), str(k["written"]), "",
                  str(k["queue"]), _latency(k),
                  Text(str(k["errors"]), style="red" if k["errors"] else ""))
    parts: list[Any] = [head, t]
    if snap["alerts"]:
        a = Table(title="last rule alerts", expand=True, show_header=False, title_justify="left")
        for alert in snap["alerts"][-5:][::-1]:
            d = alert.get("data") or {}
            a.add_row(cell(_clock(alert)), cell(d.get("severity", "")), cell(d.get("event_label", "")),
                      cell(str(d.get("text", ""))[:120]))
        parts.append(a)
    return Group(*parts)


def counters(snap: dict[str, Any]) -> dict[str, float]:
    values: dict[str, float] = {}
    for st in snap["stages"]:
        values["in:" + st["name"]] = st["in"]
        values["out:" + st["name"]] = st["out"]
    for k in snap["sinks"]:
        values["in:" + k["name"]] = k["in"]
        values["out:" + k["name"]] = k["written"]
    return values


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    stop_on_ctrl_c()
    from rich.console import Console
    from rich.live import Live

    url = base_url(args.url) + "/api/status"

    rates = Rates()

    def fetch() -> Any:
        """The next table; a ConfigError when the address does not answer like a pipeline."""
        with open_url(url, args.token, timeout=5.0) as resp:
            snap: dict[str, Any] = read_json(resp, url, dict, KEYS)
        try:
            return render(snap, rates.update(time.monotonic(), counters(snap)))
        except (KeyError, TypeError, ValueError, AttributeError):  # the keys are there, their values are not
            raise ConfigError(f"{url}: the answer is not a pipeline's status (is this the pipeline's --http "
                              "address?)") from None

    view = fetch()
    console = Console()
    if args.once:  # two samples `interval` apart, so the rates mean something
        time.sleep(max(0.1, args.interval))
        console.print(fetch())
        return 0
    try:
        with Live(view, console=console, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(max(0.1, args.interval))
                try:
                    view = fetch()
                except Busy:  # all its connections taken for now: the last table stays, asked again next time
                    continue
                except ConfigError:  # it answered before: the pipeline ended (as `pipeline tap` ends with it)
                    break
                live.update(view)
    except KeyboardInterrupt:
        return 0
    print(f"pipeline top: {base_url(args.url)} stopped answering: the pipeline ended (its last state is above)",
          file=sys.stderr)
    return 0
