"""`pipeline tap URL`: follow the events at one point of a running pipeline in the terminal."""

from __future__ import annotations

import argparse
import http.client
import sys
from typing import Any
from urllib.parse import urlencode

import orjson

from pipeline.argparsing import Parser
from pipeline.errors import ConfigError
from pipeline.logs import log_options
from pipeline.ops.client import TOKEN_ENV, base_url, open_url, stop_on_ctrl_c
from pipeline.termsafe import visible

ANSWER_TIMEOUT = 10.0  # seconds to connect and get the stream's headers
#: seconds without a byte before the pipeline counts as gone (it sends a keep-alive every 15 s when idle)
STALL_TIMEOUT = 60.0


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="pipeline tap", description="follow the events at one point of a running "
               "pipeline (started with --http or runtime.http)")
    p.add_argument("url", help="the pipeline's operator address, e.g. http://127.0.0.1:9464")
    p.add_argument("--at", default="source", help="source (default), a stage index (2), type (rules) or label "
                   "(stages[2]:rules), or a sink (jsonl, sinks[1]:jsonl)")
    p.add_argument("--channel", action="append", default=[], help="only these channels (repeat or comma-separate)")
    p.add_argument("--sample", type=float, default=1.0, help="fraction of events to show, 0.1 = one in ten")
    p.add_argument("--limit", type=int, help="stop after N events")
    p.add_argument("--json", action="store_true", help="raw JSON lines (for jq) instead of readable lines")
    p.add_argument("--token", help=f"bearer token (default: ${TOKEN_ENV})")
    log_options(p, True)
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
    resp = open_url(url, args.token, timeout=ANSWER_TIMEOUT)
    if resp.headers.get_content_type() != "text/event-stream":
        resp.close()
        raise ConfigError(f"{url}: the answer is not a pipeline's tap stream (is this the pipeline's --http "
                          f"address?): Content-Type {resp.headers.get_content_type()}")
    sock = getattr(getattr(resp.fp, "raw", None), "_sock", None)  # the stream may idle, up to the keep-alive
    if sock is not None:
        sock.settimeout(STALL_TIMEOUT)
    try:
        return _follow(resp, show, url)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `pipeline tap ... | head`
        return 0
    except (http.client.HTTPException, ConnectionError):  # cut mid-chunk, reset: it went away
        print("pipeline tap: the pipeline closed the stream", file=sys.stderr)
        return 0
    except TimeoutError:
        print(f"pipeline tap: nothing from {base_url(args.url)} for {STALL_TIMEOUT:.0f} s (not even a keep-alive): "
              "the pipeline stopped answering", file=sys.stderr)
        return 0
    except (ValueError, TypeError, KeyError) as exc:  # orjson's JSONDecodeError is a ValueError
        raise ConfigError(f"{url}: the answer is not a pipeline's tap stream (is this the pipeline's --http "
                          f"address?): {exc}") from None
    finally:
        resp.close()


def _follow(resp: Any, show: Any, url: str) -> int:
    """Print the stream's events until it ends; 0 when the pipeline says so or closes the stream."""
    kind, out = "message", sys.stdout
    for raw_line in resp:
        line = raw_line.decode("utf-8", "replace").rstrip("\n")
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
            if kind == "message":  # a JSON array: the events of one batch
                batch = orjson.loads(data)
                if not isinstance(batch, list):
                    raise TypeError(f"expected a JSON array of events, got {type(batch).__name__}")
                lines = [show(orjson.dumps(e).decode(), e) for e in batch]
                out.write("".join(f"{t}\n" for t in lines if t is not None))
                out.flush()
            elif kind == "hello":
                print(f"pipeline tap: following {visible(str(_field(data, 'at')))}", file=sys.stderr)
            elif kind == "dropped":
                print(f"pipeline tap: this terminal fell behind; {_field(data, 'dropped')} events "
                      "skipped so far", file=sys.stderr)
            elif kind == "end":
                print(f"pipeline tap: {visible(str(_field(data, 'reason')))}", file=sys.stderr)
                return 0
        elif not line:
            kind = "message"
    print("pipeline tap: the pipeline closed the stream", file=sys.stderr)
    return 0


def _field(data: str, key: str) -> Any:
    """`key` of a JSON object message (KeyError/TypeError/ValueError when it is not one)."""
    value = orjson.loads(data)
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    return value[key]
