"""How long a sink may take to start and to close: at run start, at a worker's start and stop, at a reload.

Why: a sink's start() may connect to a peer (a Kafka broker, a plugin's service) that never answers. Awaited
bare, that held the run before it read anything, deaf to SIGTERM, with no line saying why. Each start now has
the sink's own `start_timeout` option, or SINK_START_TIMEOUT, and gives way to a stop request.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pipeline.api import Sink
from pipeline.errors import ConfigError, PipelineError, StageError

#: how long a sink may take to start (a sink's own `start_timeout` option wins): a run waits this long before
#: it fails, a reload before it keeps the previous options
SINK_START_TIMEOUT = 30.0
#: close() of a sink without a `shutdown_timeout` option gets this long; every close gets CLOSE_GRACE more
DEFAULT_CLOSE_TIMEOUT = 10.0
#: also all that close() of a sink whose start was abandoned gets
CLOSE_GRACE = 2.0


def start_timeout(sink: Sink) -> float:
    """The sink's `start_timeout` option when it has one, else SINK_START_TIMEOUT (seconds)."""
    return float(getattr(sink.options, "start_timeout", None) or SINK_START_TIMEOUT)


def close_limit(sink: Sink) -> float:
    """How long the sink's close (or its last write) may take at a stop or reload: its shutdown_timeout, plus
    a grace (seconds)."""
    return float(getattr(sink.options, "shutdown_timeout", DEFAULT_CLOSE_TIMEOUT)) + CLOSE_GRACE


async def start_within(sink: Sink, stop: asyncio.Event | None = None) -> str | None:
    """Start `sink`: None once it runs; why not when it did not finish within its start timeout or `stop` was
    set first. An exception start() raises is raised here. An abandoned start is cancelled (one that ignores
    that is left behind) and the half-started sink closed, both bounded."""
    limit = start_timeout(sink)
    task = asyncio.ensure_future(sink.start())
    waits: set[asyncio.Future[Any]] = {task}
    stopped = asyncio.ensure_future(stop.wait()) if stop is not None else None
    if stopped is not None:
        waits.add(stopped)
    try:
        await asyncio.wait(waits, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if stopped is not None:
            stopped.cancel()
    if task.done():
        if task.cancelled():
            return "start() was cancelled"
        task.result()
        return None
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # (never "exception was never retrieved")
    closing = asyncio.ensure_future(sink.close())
    closing.add_done_callback(lambda t: t.cancelled() or t.exception())
    await asyncio.wait({closing}, timeout=CLOSE_GRACE)
    if not closing.done():
        closing.cancel()
    if stop is not None and stop.is_set():
        return "stopped while starting"
    return f"start() did not finish within {limit:g}s"


def naming(name: str, exc: BaseException) -> PipelineError:
    """A sink's start or write error as one line that names the sink (`sinks[1]:jsonl: ...`), with the error's
    exit code.

    Why: a file the sink cannot open or write (`/x/out.jsonl: refusing to write through a symlink`, `/x/out.jsonl:
    cannot write: No space left on device`) gave no clue which of several sinks it was; an error that names it
    already is kept as it is, and so is a config mistake (exit code 2: it points at the config file and key).
    """
    text = str(exc) if isinstance(exc, PipelineError) else f"start() failed: {exc or type(exc).__name__}"
    if isinstance(exc, PipelineError) and (exc.exit_code == ConfigError.exit_code or name in text):
        return exc
    err = StageError(f"{name}: {text}")
    err.exit_code = exc.exit_code if isinstance(exc, PipelineError) else StageError.exit_code
    return err


def sink_failure(name: str, what: str, exc: BaseException) -> PipelineError:
    """A sink's failed `what` (`write`, `flush`) as one line that names the sink: a PipelineError as `naming`
    words it, anything else (a plugin's bug) as `<name>: write failed: <type>: <message>`."""
    if isinstance(exc, PipelineError):
        return naming(name, exc)
    return StageError(f"{name}: {what} failed: {type(exc).__name__}: {exc}")
