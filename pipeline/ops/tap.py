"""`pipeline tap URL`: follow the events at one point of a running pipeline in the terminal."""

from __future__ import annotations

import argparse
import sys
from typing import Any
from urllib.parse import urlencode

import orjson

from pipeline.ops.client import TOKEN_ENV, base_url, open_url, stop_on_ctrl_c


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipeline tap", description="follow the events at one point of a running "
                                "pipeline (started with --http or runtime.http)")
    p.add_argument("url", help="the pipeline's operator address, e.g. http://127.0.0.1:9464")
    p.add_argument("--at", default="source", help="source (default), a stage index (2), type (rules) or label "
                   "(stages[2]:rules), or a sink (jsonl, sinks[1]:jsonl)")
    p.add_argument("--channel", action="append", default=[], help="only these channels (repeat or comma-separate)")
    p.add_argument("--sample", type=float, default=1.0, help="fraction of events to show, 0.1 = one in ten")
    p.add_argument("--limit", type=int, help="stop after N events")
    p.add_argument("--json", action="store_true", help="raw JSON lines (for jq) instead of readable lines")
    p.add_argument("--token", help=f"bearer token (default: ${TOKEN_ENV})")
    return p


def _printer(as_json: bool) -> Any:
    if as_json:
        return lambda raw, event: raw
    from pipeline.api import Context
    from pipeline.deadletter import DeadLetter
    from pipeline.session import SessionLink
    from pipeline.stats import StageStats
    from stages.sinks.console import ConsoleOptions, ConsoleSink

    ctx = Context(pipeline="tap", stage="tap", dead_letter=DeadLetter("/dev/null"), session=SessionLink(),
                  stats=StageStats("tap", "sink"))
    console = ConsoleSink(ConsoleOptions(), ctx, stream=sys.stdout)
    return lambda raw, event: console.line(event) if isinstance(event, dict) else raw


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    stop_on_ctrl_c()
    query: list[tuple[str, str]] = [("at", args.at)]
    query += [("channel", c) for c in args.channel]
    if args.sample != 1.0:
        query.append(("sample", repr(args.sample)))
    if args.limit is not None:
        query.append(("limit", str(args.limit)))
    url = f"{base_url(args.url)}/tap?{urlencode(query)}"
    show = _printer(args.json)
    resp = open_url(url, args.token, timeout=None)
    kind, out = "message", sys.stdout
    try:
        for raw_line in resp:
            line = raw_line.decode("utf-8", "replace").rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
                if kind == "message":  # a JSON array: the events of one batch
                    lines = [show(orjson.dumps(e).decode(), e) for e in orjson.loads(data)]
                    out.write("".join(f"{t}\n" for t in lines if t is not None))
                    out.flush()
                elif kind == "hello":
                    print(f"pipeline tap: following {orjson.loads(data)['at']}", file=sys.stderr)
                elif kind == "dropped":
                    print(f"pipeline tap: this terminal fell behind; {orjson.loads(data)['dropped']} events "
                          "skipped so far", file=sys.stderr)
                elif kind == "end":
                    print(f"pipeline tap: {orjson.loads(data)['reason']}", file=sys.stderr)
                    return 0
            elif not line:
                kind = "message"
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `pipeline tap ... | head`
        return 0
    finally:
        resp.close()
    print("pipeline tap: the pipeline closed the stream", file=sys.stderr)
    return 0
