"""The capture session's lifecycle as a small state machine.

created -> starting -> active -> stopping -> stopped -> exported, and `failed`
from anywhere. Events can arrive late, twice, or (after a reconnect) not at
all: a skipped step is logged and accepted, never fatal; an event for an
earlier state, or anything after `exported`/`failed`, is logged and ignored
(a late `active` must not re-bind a session that is stopping or gone).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from pipeline.events import iso_seconds

log = logging.getLogger("pipeline.controller.capture_session")

STATES: Final = ("created", "starting", "active", "stopping", "stopped", "exported", "failed")
TERMINAL: Final = frozenset({"exported", "failed"})
_NEXT: Final[dict[str | None, frozenset[str]]] = {
    None: frozenset(STATES),  # attaching: any first state
    "created": frozenset({"starting", "failed"}),
    "starting": frozenset({"active", "failed"}),
    "active": frozenset({"stopping", "failed"}),
    "stopping": frozenset({"stopped", "failed"}),
    "stopped": frozenset({"exported", "failed"}),
    "exported": frozenset(),
    "failed": frozenset(),
}


class Lifecycle:
    """Current state plus transition checks; `advance()` says whether the state changed."""

    __slots__ = ("history", "session_id", "state", "unstored")

    def __init__(self, session_id: str = "", state: str | None = None) -> None:
        self.session_id = session_id
        self.state: str | None = state
        self.history: list[str] = [state] if state else []
        #: No channel of the session is stored: VideoDB exports nothing, so `stopped` is its end.
        self.unstored = False

    def advance(self, new: str, *, polled: bool = False) -> bool:
        """Move to `new`; False when it is the current state, earlier than it, or the session has ended.

        `polled`: the status came from polling, which may skip states without anything being wrong.
        """
        if new == self.state:
            return False
        old = self.state
        if old in STATES and new in STATES and (old in TERMINAL or STATES.index(new) < STATES.index(old)):
            log.warning("capture session %s: late or repeated %s after %s ignored", self.session_id, new, old)
            return False
        if new not in STATES:
            log.warning("capture session %s: unknown status %r (was %s)", self.session_id, new, old)
        elif polled:
            log.info("capture session %s: %s (polled)", self.session_id, f"{old} -> {new}" if old else new)
        elif new not in _NEXT[old]:
            log.warning("capture session %s: unexpected transition %s -> %s", self.session_id, old, new)
        else:
            log.info("capture session %s: %s", self.session_id, f"{old} -> {new}" if old else new)
        self.state = new
        self.history.append(new)
        return True

    def behind(self, new: str) -> bool:
        """True when `new` is later than the current state (polls must never move it backwards)."""
        if self.done or new == self.state or new not in STATES:
            return False
        if self.state is None or new == "failed" or self.state not in STATES:
            return True
        return STATES.index(new) > STATES.index(self.state)

    @property
    def done(self) -> bool:
        return self.state in TERMINAL or (self.unstored and self.state == "stopped")


def reported_status(session: Any) -> str | None:
    """The status a `CaptureSession` read from VideoDB reports. A session still `stopped` whose
    `export_status` is `exported` (the SDK's word for a finished export) counts as exported: waiting for the
    status to say so too ended such a run after export_timeout with exit code 3, its video made."""
    status = getattr(session, "status", None)
    if status == "stopped" and getattr(session, "export_status", None) == "exported":
        return "exported"
    return status if isinstance(status, str) else None


def stored(session: Any) -> bool | None:
    """Whether a `CaptureSession` has a stored channel (only then is it exported); None when it lists none."""
    channels = getattr(session, "channels", None) or []
    return any(bool(getattr(ch, "store", False)) for ch in channels) if channels else None


async def ended_unstored(lifecycle: Lifecycle, record: dict[str, Any], session: Any,
                         fetch: Callable[[], Awaitable[Any]]) -> bool:
    """At `stopped`: True (and the session marked so) when none of its channels is stored, since VideoDB
    exports only stored recordings and the session would otherwise wait for an export for ever. `fetch`
    reads the session when the event did not carry it; if that fails nothing is decided."""
    from pipeline.videodb_sdk import VideoDBCallError

    if session is None:
        try:
            session = await fetch()
        except VideoDBCallError as exc:
            log.warning("%s (cannot tell whether an export will follow; still waiting for it)", exc)
            return False
    if stored(session) is not False or lifecycle.state != "stopped":
        return False
    lifecycle.unstored = True
    record["stored"] = False
    return True


def export_wait(stopped_at: str | None, timeout: float, now: float) -> float:
    """What is left of `export_timeout` since the session stopped (a restart does not start it again); the
    whole of it when that time is unknown or in the future (the clock was set back)."""
    began = iso_seconds(stopped_at)
    if began is None or began > now:
        return timeout
    return max(0.0, timeout - (now - began))
