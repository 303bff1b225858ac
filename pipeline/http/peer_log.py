"""The logger our HTTP servers hand aiohttp: a request a peer got wrong is one debug line, not a traceback.

aiohttp logs every request its parser refuses (a header over 8 KB, a malformed request line, a bad
chunk size) and every client that hangs up in the middle of its body with `logger.exception`: an
ERROR and a ten-line traceback holding the peer's bytes, for anyone who can reach the port, without a
token. The peer already gets its plain-text 400 (or has gone); nothing is wrong with the pipeline.
Anything else (a bug of ours in a handler) is still logged with its traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

_PEER_ERRORS = (HttpProcessingError, ConnectionError)


class PeerErrorLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """`aiohttp.server`, with what a peer caused logged at debug level in one line."""

    def __init__(self, name: str = "aiohttp.server") -> None:
        super().__init__(logging.getLogger(name), {})

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, _PEER_ERRORS):
            why = " ".join(str(getattr(exc, "message", None) or exc).split())[:200]
            self.debug(f"{msg}: {type(exc).__name__}: %s", *args, why)
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)
