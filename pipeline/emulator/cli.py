"""`pipeline emulate`: run the local VideoDB emulator until SIGINT/SIGTERM.

First stdout line is `EMULATOR_URL=http://HOST:PORT` so scripts can read it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from pipeline.argparsing import Parser
from pipeline.errors import PipelineError
from pipeline.logs import log_options
from pipeline.net import is_loopback


def _port(text: str) -> int:
    """A TCP port, 0-65535 (99999 ended in an OverflowError traceback from bind)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0-65535, got {text!r}")
    return port


def _speed(text: str) -> float:
    """A finite speed >= 0 (`nan` was accepted)."""
    try:
        speed = float(text)
    except ValueError:
        speed = -1.0
    if not (0 <= speed < float("inf")):
        raise argparse.ArgumentTypeError(f"speed must be >= 0 and finite (0 = no waits), got {text!r}")
    return speed


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="pipeline emulate",
               description="Local VideoDB-compatible API + WebSocket playing a scenario.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback)")
    p.add_argument("--port", type=_port, default=0, help="port (default 0 = any free port)")
    p.add_argument("--scenario", default=None, help="YAML or JSONL scenario (default: config/scenarios/meeting.yaml)")
    p.add_argument("--speed", type=_speed, default=1.0, help="1 = scenario timing, 10 = 10x faster, 0 = no waits")
    p.add_argument("--drop-after", type=int, default=None, metavar="N",
                   help="close each WebSocket after N events (events produced meanwhile are not resent, as VideoDB)")
    p.add_argument("--queue-on-drop", action="store_true",
                   help="keep events produced while a connection is gone and send them after the re-bind")
    p.add_argument("--garbage-every", type=int, default=None, metavar="N",
                   help="send a non-JSON frame after every N events")
    p.add_argument("--api-key", default=None, help="accept only this API key (default: any non-empty key)")
    p.add_argument("--manual", action="store_true",
                   help="do not auto-start sessions; POST /_emulator/sessions/ID/start does")
    log_options(p, True)
    return p


def main(argv: list[str]) -> int:
    """Parse `argv` (without the program name), serve until a signal, return the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return asyncio.run(_serve(args))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


async def _serve(args: argparse.Namespace) -> int:
    from pipeline.emulator import Emulator

    emu = Emulator(args.scenario, speed=args.speed, drop_after=args.drop_after,
                   garbage_every=args.garbage_every, api_key=args.api_key, autostart=not args.manual,
                   queue_on_drop=args.queue_on_drop)
    await emu.start(args.host, args.port)
    print(f"EMULATOR_URL={emu.base_url}", flush=True)
    if not is_loopback(args.host):
        print(f"warning: emulator listening on {args.host}, reachable from other machines", file=sys.stderr)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await emu.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
