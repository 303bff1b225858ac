"""SIGTERM or SIGINT once the run is over (its sinks closed, the summary still to be written): not fatal.

asyncio puts back the default action when the runtime stops listening, so a stop request arriving in
that moment (a service manager, an impatient Ctrl-C) ended the process with 143 and no summary, though
everything was written. Now the first one is taken as the stop it asks for, which is under way; a
second one ends the process at once (130), as during the run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from types import FrameType

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_seen = 0


def _late(signum: int, frame: FrameType | None) -> None:
    global _seen
    _seen += 1
    if _seen > 1:
        sys.stderr.write("pipeline: second signal, exiting now without writing the summary\n")
        os._exit(130)


def take_over(loop: asyncio.AbstractEventLoop) -> None:
    """Take SIGINT and SIGTERM from `loop`, with no moment between (blocked meanwhile)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, set(_SIGNALS))
    try:
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)
            signal.signal(sig, _late)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(_SIGNALS))
