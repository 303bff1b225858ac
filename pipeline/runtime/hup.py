"""SIGHUP while `pipeline run` starts or finishes (no event loop listening): remembered, never fatal.

Its default action ends the process, so a reload sent a moment too early (a deploy script,
a config manager, a storm of them) would kill a pipeline that is still connecting. `hold()`
catches it until the runtime listens; `take()` then says whether one came meanwhile. `ignore()`
covers the end: the interpreter's own shutdown puts back the default action of every signal
Python handles, except one it ignores.
"""

from __future__ import annotations

import asyncio
import signal
from types import FrameType

_pending = False


def _remember(signum: int, frame: FrameType | None) -> None:
    global _pending
    _pending = True


def hold() -> None:
    """From now on a SIGHUP is only remembered (until an event loop installs its own handler)."""
    signal.signal(signal.SIGHUP, _remember)


def ignore(loop: asyncio.AbstractEventLoop) -> None:
    """The run is over: take SIGHUP from `loop` and ignore it from now on, with no moment between
    (asyncio puts back the default action, so the signal is blocked while the handler changes)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        loop.remove_signal_handler(signal.SIGHUP)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})


def take() -> bool:
    """True once for a SIGHUP that arrived while held."""
    global _pending
    came, _pending = _pending, False
    return came
