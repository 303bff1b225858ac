"""`pipeline listen [--clear] [DIR] [--base-url URL]`: the seed's ws_listener.py, on the videodb source.

Same files and contract users script against: `WS_ID=<id>` as the first
stdout line; `videodb_events.jsonl`, `videodb_ws_id`, `videodb_ws_pid` in the
output directory (argument > $VIDEODB_EVENTS_DIR > $XDG_STATE_HOME/videodb);
files 0600 in a 0700 directory, symlinks refused; `--clear` empties the events
file on the first connect only; reconnects with backoff; SIGINT/SIGTERM exit
0 and remove the pid file. Frames that are not JSON objects go to
`videodb_dead_letter.jsonl` instead of the events file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import cast

from pipeline.api import Batch, Context
from pipeline.argparsing import Parser
from pipeline.deadletter import DeadLetter
from pipeline.errors import PipelineError, StageError
from pipeline.files import ensure_private_dir, open_private
from pipeline.logs import TextFormatter, formatter, log_options
from pipeline.net import VIDEODB_URL_EXAMPLE, http_url
from pipeline.session import SessionLink
from pipeline.stats import StageStats

log = logging.getLogger("pipeline.listen")

EVENTS_FILE = "videodb_events.jsonl"
DEAD_LETTER_FILE = "videodb_dead_letter.jsonl"
STOP_GRACE_SECONDS = 5.0


def output_dir(arg: str | None, env: Mapping[str, str] | None = None) -> Path:
    """Argument, else $VIDEODB_EVENTS_DIR, else ${XDG_STATE_HOME:-~/.local/state}/videodb."""
    env = os.environ if env is None else env
    if arg:
        return Path(arg).expanduser()
    if env.get("VIDEODB_EVENTS_DIR"):
        return Path(env["VIDEODB_EVENTS_DIR"]).expanduser()
    state = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state).expanduser() / "videodb"


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="pipeline listen",
               description="Dump VideoDB WebSocket events to videodb_events.jsonl "
                           "(prints WS_ID=<connection id> first).")
    p.add_argument("dir", nargs="?", help="output directory (default: $VIDEODB_EVENTS_DIR or "
                                          "${XDG_STATE_HOME:-~/.local/state}/videodb)")
    p.add_argument("--clear", action="store_true", help="empty the events file on the first connect")
    p.add_argument("--base-url", default=os.environ.get("VIDEO_DB_BASE_URL"),
                   help="VideoDB API URL (default: $VIDEO_DB_BASE_URL or https://api.videodb.io)")
    p.add_argument("--collection-id", default="default", help="collection to connect the WebSocket for")
    p.add_argument("--max-retries", type=int, default=None, help="give up after N failed reconnects "
                                                                 "(default: retry forever)")
    log_options(p, True)
    return p


def _setup_logging(level: str, fmt: str) -> None:
    """Run as `python -m pipeline.listen`: logs to stderr as asked (`pipeline listen` has set them up already)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(formatter("json") if fmt == "json"
                             else TextFormatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(level.upper())


def _preview(batch: Batch) -> str:
    """`[channel] text` lines, like VideoDB's ws_listener.py prints them."""
    lines = []
    for ev in batch:
        data = ev.get("data")
        text = data.get("text") if isinstance(data, dict) else None
        if text:
            lines.append(f"[{ev.get('channel') or ev.get('event') or 'unknown'}] {str(text)[:80]}\n")
    return "".join(lines)


async def listen(out: Path, *, api_key: str, base_url: str | None, collection_id: str = "default",
                 clear: bool = False, max_retries: int | None = None) -> int:
    """Run until a signal (exit 0) or until the source gives up (StageError)."""
    from stages.sources.videodb import PID_FILE, VideoDBSource, VideoDBSourceOptions

    ensure_private_dir(out)
    events = open_private(out / EVENTS_FILE)
    dead = DeadLetter(out / DEAD_LETTER_FILE)
    ctx = Context(pipeline="listen", stage="listen", dead_letter=dead, session=SessionLink(),
                  stats=StageStats("listen", "source"), out_dir=out,
                  settings={"videodb": {"api_key": api_key, "base_url": base_url, "collection_id": collection_id}})
    source = VideoDBSource(VideoDBSourceOptions(state_dir=str(out), max_retries=max_retries), ctx)
    first = True

    async def on_connection(conn_id: str) -> None:
        nonlocal first
        if first and clear:
            os.ftruncate(events.fileno(), 0)
            log.info("cleared %s", out / EVENTS_FILE)
        if first:
            print(f"WS_ID={conn_id}", flush=True)
        first = False
        log.info("connected (ws_id=%s)", conn_id)

    ctx.session.on_connection(on_connection)

    async def pump() -> None:
        batches = cast(AsyncGenerator[Batch, None], source.batches())
        try:
            async for batch in batches:
                events.write("".join(json.dumps(ev) + "\n" for ev in batch).encode())
                preview = _preview(batch)
                if preview:
                    sys.stdout.write(preview)
                    sys.stdout.flush()
        finally:
            await batches.aclose()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(pump())
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            log.info("shutdown requested")
            await source.stop()
            done, _ = await asyncio.wait({task}, timeout=STOP_GRACE_SECONDS)
            if not done:
                task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # raises the source's StageError, if it gave up
        return 0
    finally:
        stopper.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        events.close()
        dead.close()
        with contextlib.suppress(OSError):
            (out / PID_FILE).unlink(missing_ok=True)
        if dead.count:
            log.warning("%d unparseable frame(s) written to %s", dead.count, dead.path)
        if dead.full:
            log.warning("%d unparseable frame(s) not written: %s", dead.full, dead.full_reason)


def main(argv: list[str]) -> int:
    """Entry point of `pipeline listen` and `python -m pipeline.listen`."""
    args = parser().parse_args(argv)
    _setup_logging(args.log_level, args.log_format)
    api_key = os.environ.get("VIDEO_DB_API_KEY")
    if args.base_url:
        try:
            args.base_url = http_url(args.base_url, VIDEODB_URL_EXAMPLE)
        except ValueError as exc:
            print(f"pipeline listen: --base-url: {exc}", file=sys.stderr)
            return 2
    try:
        if not api_key:
            raise StageError("VIDEO_DB_API_KEY is not set")
        return asyncio.run(listen(output_dir(args.dir), api_key=api_key, base_url=args.base_url,
                                  collection_id=args.collection_id, clear=args.clear,
                                  max_retries=args.max_retries))
    except PipelineError as exc:
        print(f"pipeline listen: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
