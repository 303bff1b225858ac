"""Resuming after a crash: which saved capture session (capture_session.json) a restart attaches to.

A restart of `pipeline run` with the same config attaches to the saved session
unless `--new-session` was given, the saved status says it ended, or the
file names another collection or end user; the controller then also asks
VideoDB, and creates a new session if that one ended or is gone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import orjson

from pipeline.events import iso_seconds
from stages.controller.session_store import MAX_RECORD_BYTES, read_regular, wrong_key

log = logging.getLogger("pipeline.controller.capture_session")

#: The status saved while `create_capture_session` runs: the record has no session id yet.
CREATING: Final = "creating"
#: Keys a restart cannot do without: a record with one of the wrong type is ignored (others are dropped).
_NEEDED: Final = frozenset({"session_id", "status", "collection_id", "end_user_id"})
#: Statuses after which a session cannot be resumed.
ENDED: Final = frozenset({"stopped", "exported", "failed"})
#: A saved client token is handed out again only if it lives at least this much longer (seconds).
_TOKEN_MARGIN = 300


def read_record(path: Path, settings: Mapping[str, Any], who: str) -> dict[str, Any] | None:
    """What `path` holds if a restart should look at it, else None (logged why)."""
    if settings.get("new_session"):
        if path.exists():
            log.info("%s: --new-session: not resuming the session in %s", who, path)
        return None
    if path.is_symlink():
        log.warning("%s: %s is a symlink; ignored, creating a new capture session", who, path)
        return None
    try:
        record = orjson.loads(read_regular(path, MAX_RECORD_BYTES))  # not a FIFO: reading one would block
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: cannot read %s (%s); creating a new capture session", who, path, exc)
        return None
    if not isinstance(record, dict):
        log.warning("%s: %s is not a capture session record; ignored, creating a new capture session", who, path)
        return None
    while (wrong := wrong_key(record)) is not None:  # damaged, or written by another version
        key = wrong.split(":", 1)[0]
        if key in _NEEDED:
            log.warning("%s: %s is not a capture session record (%s); ignored, creating a new capture session",
                        who, path, wrong)
            return None
        log.warning("%s: %s: %s; that key is ignored", who, path, wrong)
        record.pop(key)
    return record


def pending_create(record: dict[str, Any] | None, collection_id: str,
                   end_user_id: str | None) -> dict[str, Any] | None:
    """The record if it notes a create whose session id was never saved (a crash mid-create), else None."""
    if (record is None or record.get("status") != CREATING or record.get("session_id") is not None
            or record.get("collection_id") != collection_id or record.get("end_user_id") != end_user_id):
        return None
    return record


def saved_session(record: dict[str, Any] | None, collection_id: str, end_user_id: str | None,
                  who: str, *, awaiting_export: bool = False) -> dict[str, Any] | None:
    """The record when a restart should attach to its session, else None (logged why).

    `awaiting_export` (exit_on: exported): a session saved as `stopped` is attached to as well, since the run
    was waiting for its export (unless that already failed or timed out: `error` is set)."""
    if record is None or not isinstance(record.get("session_id"), str):
        return None
    sid, status = record["session_id"], record.get("status")
    if status in ENDED and not (awaiting_export and status == "stopped" and not record.get("error")):
        return None
    if record.get("collection_id") != collection_id or (end_user_id and record.get("end_user_id") != end_user_id):
        log.info("%s: saved capture session %s belongs to another collection or end user; creating a new one",
                 who, sid)
        return None
    return record


def reusable_token(record: dict[str, Any] | None) -> str | None:
    """The saved client token, if it is still valid for a while (the desktop client may be using it)."""
    if not record or not isinstance(record.get("client_token"), str):
        return None
    expires = iso_seconds(record.get("expires_at"))
    if expires is None:
        return None
    return record["client_token"] if expires - time.time() > _TOKEN_MARGIN else None
