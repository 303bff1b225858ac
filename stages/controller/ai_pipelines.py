"""Starting (and re-binding) a capture session's AI pipelines on its rtstreams.

Audio streams (mic, system audio) get `start_transcript` and `index_audio`,
screen/video streams get `index_visuals`; alerts are a `create_event` (once per
label) plus `create_alert` on each matching index. Every call carries the
current WebSocket connection id; after a reconnect `bind()` runs again with
the new id and stops the indexes it replaced. `backfill_targets()` names what a
backfill reads after a re-bind: each transcript, each current index and the
indexes replaced since the last successful backfill (they produced the gap).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from pydantic import Field, model_validator

from pipeline.api import Options
from pipeline.videodb_sdk import VideoDBCallError, call
from stages.sources.backfill import Target

MAX_RETIRED = 64  # replaced indexes kept for backfill (a long outage re-binds many times)
MAX_STREAMS = 64  # rtstreams of one session taken from an event (a capture client has a handful)
MAX_RETRY_WAIT = 300.0  # longest a 429's Retry-After (VideoDB's to give) holds back a bind or backfill retry

log = logging.getLogger("pipeline.controller.capture_session")


class IndexSpec(Options):
    prompt: str | None = Field(default=None, description="what the model should describe or summarize")
    batch_config: dict[str, Any] | None = Field(
        default=None, description="visuals {type: time, value, frame_count}; audio {type: word|sentence|time, value}")
    model_name: str | None = Field(default=None, description="model to use (VideoDB default when unset)")
    name: str | None = Field(default=None, description="name of the index")


class AlertSpec(Options):
    label: str = Field(description="event label; appears as data.event_label in alert events")
    prompt: str = Field(description="what to detect, in words")
    index: Literal["visuals", "audio"] = Field(default="visuals", description="which index the alert watches")
    callback_url: str | None = Field(default=None, description="also POST alerts here (default: controller's)")


class OnActive(Options):
    transcript: bool = Field(default=False, description="start_transcript on every audio rtstream")
    index_visuals: IndexSpec | None = Field(default=None, description="index_visuals on screen/video rtstreams")
    index_audio: IndexSpec | None = Field(default=None, description="index_audio on audio rtstreams")
    alerts: list[AlertSpec] = Field(default_factory=list, description="alerts on the visual or audio index")

    @model_validator(mode="after")
    def _alerts_need_index(self) -> OnActive:
        for a in self.alerts:
            if getattr(self, f"index_{a.index}") is None:
                raise ValueError(f"alert {a.label!r} watches index {a.index!r}: set on_active.index_{a.index}")
        return self


class Stream(NamedTuple):
    """One rtstream of the session: its id, name, whether it carries audio or video, and what the SDK object
    is made of. Only strings: the garbage collector stops tracking it (many sessions, 4 streams each); the SDK
    object is made for the calls that need one (`rts()`)."""

    id: str
    name: str
    kind: str | None  # "audio" | "video" | None (unknown: left alone)
    collection_id: str | None = None
    channel_id: str | None = None

    def rts(self, conn: Any) -> Any:
        """The SDK RTStream (its calls use the id and the connection)."""
        from videodb.rtstream import RTStream

        return RTStream(conn, id=self.id, name=self.name, collection_id=self.collection_id,
                        channel_id=self.channel_id)


def media_kind(media_types: Any, channel_id: Any = None, name: Any = None) -> str | None:
    """audio/video from `media_types`, else the SDK channel type, else the name prefix."""
    if isinstance(media_types, list | tuple):
        if "video" in media_types:
            return "video"
        if "audio" in media_types:
            return "audio"
    for hint in (channel_id, str(name or "").split(":", 1)[0]):
        h = str(hint or "").lower()
        if h in ("mic", "system_audio", "audio"):
            return "audio"
        if h in ("screen", "display", "video", "camera"):
            return "video"
    return None


def streams_from_event(rtstreams: Any, collection_id: str) -> list[Stream]:
    """Streams from `capture_session.active`'s `data.rtstreams` (no API call needed).

    Bounded: at most MAX_STREAMS, ids that are strings of at most 128 characters (each stream costs
    SDK calls on every bind, and its id goes into API paths)."""
    out: list[Stream] = []
    listed = rtstreams if isinstance(rtstreams, list) else []
    if len(listed) > MAX_STREAMS:
        log.warning("capture_session.active lists %d rtstreams; only the first %d are used", len(listed), MAX_STREAMS)
    for r in listed[:MAX_STREAMS]:
        rid = r.get("rtstream_id") or r.get("id") if isinstance(r, dict) else None
        if not usable_id(rid):
            continue
        name, channel = str(r.get("name") or rid), r.get("channel_id")
        out.append(Stream(str(rid), name, media_kind(r.get("media_types"), channel, name), collection_id,
                          channel if isinstance(channel, str) else None))
    return out


def usable_id(rid: Any) -> bool:
    """An rtstream id fit for an API path: a string of 1-128 characters without '/'."""
    return isinstance(rid, str) and 0 < len(rid) <= 128 and "/" not in rid


def streams_from_session(session: Any) -> list[Stream]:
    """Streams from a `CaptureSession` object (its rtstreams carry the SDK channel type); bounded as above."""
    return [of_sdk(r, media_kind(None, r.channel_id, r.name))
            for r in (getattr(session, "rtstreams", None) or [])[:MAX_STREAMS] if usable_id(getattr(r, "id", None))]


def of_sdk(r: Any, kind: str | None) -> Stream:
    """A Stream from an SDK RTStream (the strings it is made of)."""
    collection, channel = getattr(r, "collection_id", None), getattr(r, "channel_id", None)
    return Stream(r.id, str(getattr(r, "name", None) or r.id), kind,
                  collection if isinstance(collection, str) else None, channel if isinstance(channel, str) else None)


@dataclass
class AIPipelines:
    """What `on_active` asks for, applied to the session's streams for a connection id."""

    conn: Any
    spec: OnActive
    who: str
    api_key: str | None
    callback_url: str | None = None
    streams: list[Stream] = field(default_factory=list)
    bound_to: str | None = None
    errors: int = 0
    _event_ids: dict[str, str] = field(default_factory=dict)
    _indexes: dict[str, list[Any]] = field(default_factory=dict)
    retired: list[tuple[str, Any]] = field(default_factory=list)  # (kind, index) replaced, not yet backfilled
    backfill_due: bool = False  # the last backfill failed for some target, worth another try soon (5xx, network)
    #: The calls of the last bind that failed in a way worth another try (5xx, 429, network), by what they
    #: start: ("transcript", rtstream id), (index kind, rtstream id), ("event", label), ("alert", label, index id).
    #: (A frozenset, empty and shared until a call fails: an empty set per session was one more object per
    #: session for every full garbage collection to walk.)
    failed: frozenset[tuple[str, ...]] = frozenset()
    retry_taken: bool = False  # `take_retry` asked for those calls again (on the same connection)
    wait: float = 0.0  # the longest Retry-After VideoDB gave a failed call since the last retry was planned
    #: Called with every index id this bind has not stopped yet (the old ones too) each time it creates one,
    #: so a record saved there lets a restart stop an index even when the process died mid-bind.
    on_index: Callable[[list[dict[str, str]]], None] | None = None

    @property
    def bind_failed(self) -> bool:
        """A call of the last bind failed, worth another try: a pipeline may be unbound."""
        return bool(self.failed)

    def due(self, conn_id: str | None) -> bool:
        """Whether `bind(conn_id)` has something to do: a new connection, or a retry taken of failed calls."""
        return bool(conn_id) and (conn_id != self.bound_to or self.retry_taken)

    async def _call(self, what: str, fn: Any, /, *args: Any, key: tuple[str, ...] | None = None,
                    **kwargs: Any) -> Any:
        """One SDK call; a failure is logged as one line and counted, never raised; without `key` (a cleanup)
        only logged, else `key` is noted in `failed` when another try is worth it."""
        try:
            return await call(self.who, what, fn, *args, api_key=self.api_key, **kwargs)
        except VideoDBCallError as exc:
            self.asked_to_wait(exc.retry_after)
            if key is None:
                log.warning("%s", exc)
            else:
                self.errors += 1
                if not exc.fatal:  # worth another try (5xx, 429, network)
                    self.failed |= {key}
                log.error("%s", exc)
            return None

    async def bind(self, conn_id: str) -> None:
        """Start everything on every stream with a new `conn_id` and stop the indexes it replaces; on the
        connection already bound (a retry), make again only the calls of the last bind that failed (before, a
        retry bound everything again: each transcript started anew, each good index replaced by another)."""
        again, todo = conn_id == self.bound_to, self.failed
        spec, old = self.spec, ({} if again else self._indexes)
        self.failed, self.retry_taken = frozenset(), False

        def due(*key: str) -> bool:
            return not again or key in todo

        new: dict[str, list[Any]] = {"visuals": [], "audio": []}
        audio = [s for s in self.streams if s.kind == "audio"]
        video = [s for s in self.streams if s.kind == "video"]
        log.info("%s: binding AI pipelines to connection %s (%d audio, %d video streams%s)", self.who, conn_id,
                 len(audio), len(video), f"; again the {len(todo)} call(s) that failed" if again else "")
        for s in audio if spec.transcript else []:
            if due("transcript", s.id):
                await self._call(f"start_transcript({s.name})", s.rts(self.conn).start_transcript,
                                 key=("transcript", s.id), ws_connection_id=conn_id)
        for kind, streams, idx_spec in (("audio", audio, spec.index_audio), ("visuals", video, spec.index_visuals)):
            if idx_spec is None:
                continue
            for s in streams:
                if not due(kind, s.id):
                    continue
                rts = s.rts(self.conn)
                fn = rts.index_audio if kind == "audio" else rts.index_visuals
                index = await self._call(f"index_{kind}({s.name})", fn, key=(kind, s.id), prompt=idx_spec.prompt,
                                         batch_config=idx_spec.batch_config, model_name=idx_spec.model_name,
                                         name=idx_spec.name, ws_connection_id=conn_id)
                if index is not None:
                    new[kind].append(index)
                    if self.on_index is not None:
                        self.on_index(_ids(i for idx in (*self._indexes.values(), *new.values()) for i in idx))
        for alert in spec.alerts:
            kept = self._indexes.get(alert.index, []) if again else []  # bound before: alert where it failed
            event_id = self._event_ids.get(alert.label)
            if event_id is None:
                event_id = await self._call(f"create_event({alert.label})", self.conn.create_event,
                                            key=("event", alert.label), event_prompt=alert.prompt, label=alert.label)
                if not event_id:
                    continue
                self._event_ids[alert.label] = event_id
            else:
                kept = [i for i in kept if ("alert", alert.label, str(i.rtstream_index_id)) in todo]
            for index in kept + new[alert.index]:
                await self._call(f"create_alert({alert.label})", index.create_alert, event_id,
                                 alert.callback_url or self.callback_url,
                                 key=("alert", alert.label, str(index.rtstream_index_id)), ws_connection_id=conn_id)
        if again:
            for kind, idx in new.items():
                self._indexes[kind] = self._indexes.get(kind, []) + idx
            self._indexes = {k: idx for k, idx in self._indexes.items() if idx}
            return
        self._indexes, self.bound_to = {k: idx for k, idx in new.items() if idx}, conn_id  # no empty lists kept
        self.retired = (self.retired + [(k, i) for k, idx in old.items() for i in idx])[-MAX_RETIRED:]
        for index in (i for kind in old.values() for i in kind):
            await self._call(f"stop replaced index {index.rtstream_index_id}", index.stop)

    def rebind_due(self, state: str | None) -> bool:
        """A call of the last bind failed (worth another try) and the session is still `active`: one VideoDB has
        stopped gets no new transcript or index (its gap is still backfilled)."""
        return self.bind_failed and state == "active"

    def take_retry(self, state: str | None) -> bool:
        """Whether a failed bind or backfill is to be tried again now (the session in `state`); a bind retry
        makes the next `bind` on the same connection make again the calls that failed (`due`)."""
        if self.rebind_due(state):
            self.retry_taken = True
            return True
        return self.backfill_due

    def asked_to_wait(self, seconds: float | None) -> None:
        """VideoDB answered a call 429 with this Retry-After: the next retry waits at least as long."""
        if seconds:
            self.wait = max(self.wait, seconds)

    def retry_delay(self, interval: float) -> float:
        """How long before a failed bind or backfill is tried again: `interval`, or longer if VideoDB asked
        (a 429's Retry-After, at most MAX_RETRY_WAIT); before, it was tried every interval while rate-limited."""
        delay, self.wait = retry_wait(interval, self.wait), 0.0
        return delay

    def backfill_targets(self) -> list[Target]:
        """Every rtstream and channel with an AI pipeline, and the SDK object that reads it back."""
        names = {s.id: s.name for s in self.streams}
        kinds = {s.id: s.kind for s in self.streams}
        out = [Target(s.id, s.name, "transcript", s.rts(self.conn))
               for s in self.streams if s.kind == "audio" and self.spec.transcript]
        current = [(k, i) for k, idx in self._indexes.items() for i in idx]
        for kind, index in current + self.retired:
            rid = str(index.rtstream_id)
            if kind == "saved":  # adopted after a restart: the stream's media type tells which index it was
                kind = "visuals" if kinds.get(rid) == "video" else "audio"
            out.append(Target(rid, names.get(rid, rid), "visual_index" if kind == "visuals" else "audio_index",
                              index))
        return out

    def index_ids(self) -> list[dict[str, str]]:
        """The scene indexes a restart needs, as saved in the session's record: the latest bind's, and those it
        replaced whose gap no backfill has covered yet (their results hold it; kept in memory only, a second
        crash lost them and that gap for good). A restart backfills from them all, then stops the old ones."""
        ids = _ids([*(i for kind in self._indexes.values() for i in kind), *(i for _k, i in self.retired)])
        return list({i["index_id"]: i for i in ids}.values())

    def adopt_indexes(self, conn: Any, saved: Any) -> None:
        """Indexes a crashed run started (from capture_session.json): the next bind replaces and stops them."""
        from videodb.rtstream import RTStreamSceneIndex

        found = [RTStreamSceneIndex(conn, rtstream_index_id=i["index_id"], rtstream_id=i["rtstream_id"])
                 for i in (saved if isinstance(saved, list) else [])
                 if isinstance(i, dict) and usable_id(i.get("index_id")) and usable_id(i.get("rtstream_id"))]
        if found:
            self._indexes = {"saved": found}


def retry_wait(interval: float, asked: float | None) -> float:
    """`interval`, or what VideoDB asked with a 429's Retry-After when longer (at most MAX_RETRY_WAIT)."""
    return max(interval, min(asked or 0.0, MAX_RETRY_WAIT))


def _ids(indexes: Iterable[Any]) -> list[dict[str, str]]:
    """Scene indexes as saved in a session record: rtstream and index id."""
    return [{"rtstream_id": str(i.rtstream_id), "index_id": str(i.rtstream_index_id)} for i in indexes]
