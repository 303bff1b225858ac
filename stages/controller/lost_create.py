"""Finding the capture session a create made when its caller never learnt its id (kill -9, a lost answer).

Before `create_capture_session` the caller notes what it asks for (end user,
metadata); after a crash or a lost answer it looks among the collection's
sessions for one still `created` (nobody got its id, so no desktop client can
have started it) with that end user and metadata, that it does not already
know. Exactly one such session is taken to be the one it made; none means the
call never reached VideoDB; several cannot be told apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from stages.controller.session_store import safe_id


def candidates(listed: Iterable[Any], end_user_id: Any, metadata: Any,
               known: Callable[[str], bool]) -> list[Any]:
    """The listed `CaptureSession`s that may be the one a lost create made."""
    want = metadata or {}
    return [x for x in listed if getattr(x, "status", None) == "created"
            and getattr(x, "end_user_id", None) == end_user_id
            and (getattr(x, "metadata", None) or {}) == want
            and safe_id(str(getattr(x, "id", None) or "")) and not known(str(x.id))]
