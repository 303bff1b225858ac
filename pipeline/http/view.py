"""What the operator endpoints read from a running pipeline, in one place, at request time.

Nothing here runs per event: every number comes from counters the runtime and the
stages already keep (the same ones the exit summary prints), read when asked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.build import Built
from pipeline.stats import Histogram

SNAPSHOT_TEXT = 1000  # characters of an event-made string in the status snapshot (an alert's text, its `ts`)
SNAPSHOT_ITEMS = 50  # items of a list or mapping in it, three levels deep
QUIET_SHOWN = 5.0  # seconds without an event after which the views say so next to the lag
SINK_STALE_SHOWN = 5.0  # seconds after which the views say how old a sink's latency is, or how long it has written
SNAPSHOT_CHARS = 8000  # characters of strings and keys per alert in all (its text, ids, label come first)


def brief(value: Any, depth: int = 0, left: list[int] | None = None) -> Any:
    """`value` (an alert: texts and stamps come with its event) cut down for the status page and `pipeline top`,
    which poll it every second: a few 1 MiB texts would make each answer megabytes. At most SNAPSHOT_CHARS
    characters of strings and keys in all (a `ts` of 50 x 50 strings kept 1 MB per alert)."""
    left = [SNAPSHOT_CHARS] if left is None else left
    if isinstance(value, str):
        n = min(SNAPSHOT_TEXT, left[0])
        left[0] -= min(len(value), n)
        return _utf8(value if len(value) <= n else value[: max(0, n - 1)] + "…")
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in list(value.items())[:SNAPSHOT_ITEMS] if depth < 3 else ():
            if left[0] <= 0:
                break
            key = _utf8(str(k)[: min(SNAPSHOT_TEXT, left[0])])
            left[0] -= len(key)
            out[key] = brief(v, depth + 1, left)
        return out
    if isinstance(value, list | tuple):
        items: list[Any] = []
        for v in value[:SNAPSHOT_ITEMS] if depth < 3 else ():
            if left[0] <= 0:
                break
            items.append(brief(v, depth + 1, left))
        return items
    return value


def _utf8(text: str) -> str:
    """`text`, with a lone UTF-16 surrogate (half an emoji; JSON cannot hold one) shown as `?`."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode()
    return text


def source_connected(source: Any) -> bool | None:
    """True/False for a source that holds a live connection (WebSocket), None when that does not apply."""
    flag = getattr(source, "connected", None)
    if isinstance(flag, bool):
        return flag
    if not hasattr(source, "_ws"):
        return None
    ws = source._ws
    state = getattr(ws, "state", None)
    return ws is not None and getattr(state, "name", "") == "OPEN"


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def _when(alert: Any) -> float:
    """An alert's `unix_ts` to sort by; it came with the event, so anything but a number sorts first."""
    t = alert.get("unix_ts")
    return t if type(t) in (int, float) else 0


@dataclass
class View:
    """A running pipeline as the endpoints see it; `rt` is a LocalRuntime or a faust Worker."""

    built: Built
    rt: Any
    role: str = "local"  # local | ingest | worker
    started: float = field(default_factory=time.monotonic)
    loop_lag: float = 0.0  # seconds the last heartbeat came late (set by the server's heartbeat)
    heartbeat: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return self.built.config.name

    # -- pieces -----------------------------------------------------------------------
    def rules(self) -> list[Any]:
        return [p for p in self.built.chain.processors if hasattr(p, "fired_by")]

    def session_state(self) -> tuple[str | None, str | None]:
        """(capture session id, state) from the controller, (None, None) without one."""
        ctrl = self.built.controller
        lc = getattr(ctrl, "lifecycle", None)
        if lc is None:
            return None, None
        return getattr(ctrl, "session_id", None), lc.state

    def serves_api(self) -> bool:
        """The controller serves the session API (`controller.api`): sessions come from it, none of its own."""
        return getattr(getattr(self.built.controller, "options", None), "api", None) is not None

    def api_sessions(self) -> dict[str, int] | None:
        """With the session API: its sessions, `live` and `held` in memory; else None."""
        if not self.serves_api():
            return None
        sessions = getattr(getattr(self.built.controller, "manager", None), "sessions", None) or {}
        return {"live": sum(1 for s in sessions.values() if s.live), "held": len(sessions)}

    def buffer(self, i: int) -> Any:
        buffers = getattr(self.rt, "buffers", None)
        return buffers[i] if buffers else None

    def queue_depth(self, i: int) -> int:
        """Events waiting for sink `i` (in memory or spooled)."""
        buf = self.buffer(i)
        return int(buf.pending_events) if buf is not None else 0

    def queue_capacity(self, i: int) -> int:
        buf = self.buffer(i)
        return int(getattr(buf, "max_batches", 0)) or self.built.config.runtime.queue_size

    def written(self, i: int) -> int:
        """What the sink really wrote when it counts that itself (console), else what it accepted."""
        slot = self.built.sinks[i]
        return int(slot.report().get("written", slot.stats.sent))

    def latency(self, i: int) -> Histogram | None:
        lat = getattr(self.rt, "latency", None)
        return lat[i] if lat else None

    def _since(self, name: str, i: int) -> float | None:
        """Seconds since the runtime's monotonic stamp `name[i]`, once that is SINK_STALE_SHOWN or more."""
        stamps = getattr(self.rt, name, None)
        t = stamps[i] if stamps is not None and i < len(stamps) else None
        age = None if t is None else time.monotonic() - t
        return round(age, 3) if age is not None and age >= SINK_STALE_SHOWN else None

    def writing_for(self, i: int) -> float | None:
        """Seconds the batch now in sink `i` has been there, once that is SINK_STALE_SHOWN or more (a stuck sink:
        its `latency` is that of the batch before, and said nothing of the one that does not finish)."""
        return self._since("writing_since", i)

    def flushing_for(self, i: int) -> float | None:
        """Seconds the runtime's flush of sink `i` (before a commit, or to forget kept outputs) has been waiting,
        once that is SINK_STALE_SHOWN or more: a flush that hangs stops commits with no batch in the sink."""
        return self._since("flushing_since", i)

    def latency_age(self, i: int) -> float | None:
        """Seconds since sink `i`'s `latency` was taken (its last batch written), once SINK_STALE_SHOWN or more:
        the views showed it as if current after the sink had written nothing for an hour."""
        return self._since("latency_at", i)

    @property
    def lag(self) -> Histogram | None:
        return getattr(self.rt, "lag", None)

    def spool_bytes(self, i: int) -> int | None:
        """Bytes a sink has spilled to disk, when its slot or sink reports them."""
        v = getattr(self.buffer(i), "spooled_bytes", None)
        return v if isinstance(v, int) else None

    def quiet_for(self) -> float | None:
        """Seconds since the source last passed an event on, once that is QUIET_SHOWN or more (else None): `lag` is
        that event's, and showed `0.0s` through a 6-minute outage as if the pipeline were keeping up."""
        t = getattr(self.rt, "last_event_at", None)
        age = None if t is None else time.monotonic() - t
        return round(age, 3) if age is not None and age >= QUIET_SHOWN else None

    def videodb_alerts(self) -> int | None:
        """Events the source passed on on the alert channel (VideoDB's own alerts); None when the runtime does not
        count them. Alerts rules make are `alerts_fired`."""
        n = getattr(self.rt, "videodb_alerts", None)
        return n if isinstance(n, int) else None

    def gaps(self) -> Any:
        return getattr(self.built.session, "gaps", None)

    # -- readiness --------------------------------------------------------------------
    def ready(self) -> dict[str, str]:
        """What is not ready, by check name ({} = ready)."""
        rt, b = self.rt, self.built
        missing: dict[str, str] = {}
        if getattr(rt, "_stopping", False):
            missing["pipeline"] = "stopping"
        if not getattr(rt, "sinks_started", False):
            missing["sinks"] = "not started yet"
        if self.role != "worker" and b.source is not None:
            connected = source_connected(b.source)
            if connected is None:
                if not getattr(rt, "source_running", False):
                    missing["source"] = "not started yet"
            elif not connected:
                missing["source"] = "not connected"
        if b.controller is not None and self.role != "worker":
            if self.serves_api():
                # sessions come from the session API (none of its own, any number active): ready once it listens
                if not getattr(getattr(b.controller, "api", None), "url", ""):
                    missing["session_api"] = "not listening yet"
            else:
                _, state = self.session_state()
                if state != "active":
                    missing["capture_session"] = f"state is {state or 'unknown (not created yet)'}, not active"
        return missing

    # -- the status page's and `pipeline top`'s snapshot ----------------------------------
    def snapshot(self) -> dict[str, Any]:
        b = self.built
        stages = []
        for st in b.stats:
            if st.kind == "sink" or st.kind == "controller":
                continue
            dropped = st.dropped if st.kind == "source" else max(0, st.received - st.sent)
            stages.append({"name": st.name, "kind": st.kind, "in": st.received, "out": st.sent,
                           "dropped": dropped, "errors": st.errors})
        sinks = []
        for i, slot in enumerate(b.sinks):
            lat = self.latency(i)
            sinks.append({**{k.replace("-", "_"): v for k, v in slot.report().items()},
                          "name": slot.stats.name, "in": slot.stats.received, "written": self.written(i),
                          "errors": slot.stats.errors, "queue": self.queue_depth(i),
                          "queue_size": self.queue_capacity(i), "spool_bytes": self.spool_bytes(i),
                          "latency": round(lat.last, 4) if lat and lat.count else None,
                          "latency_age": self.latency_age(i) if lat and lat.count else None,
                          "writing_for": self.writing_for(i), "flushing_for": self.flushing_for(i)})
        session_id, state = self.session_state()
        api = self.api_sessions()
        gaps = self.gaps()
        src = b.source
        source = None
        if src is not None:
            source = {"name": src.context.stage, "connected": source_connected(src),
                      "connection_id": getattr(src, "connection_id", None) or b.session.connection_id,
                      "reconnects": getattr(gaps, "reconnects", 0),
                      "gap_seconds": round(gaps.seconds(), 3) if gaps is not None else 0.0,
                      "disconnected_for": _rounded(gaps.outage()) if gaps is not None else None,
                      "backfilled": sum(getattr(gaps, "backfilled", {}).values()) if gaps else 0}
            lines = getattr(src, "lines", None)
            if isinstance(lines, int):
                source["lines"] = lines
        alerts: list[Any] = []
        for p in self.rules():
            alerts.extend(p.recent)
        alerts.sort(key=_when)
        lag = self.lag
        tap = getattr(self.rt, "tap_hub", None)
        return {
            "pipeline": self.name, "role": self.role, "uptime": round(time.monotonic() - self.started, 3),
            "time": time.time(), "ready": self.ready(), "source": source,
            # with the session API there is no session of the pipeline's own ("session none"), but many
            "session": {"id": session_id, "state": state} if state is not None or (b.controller and api is None)
            else None,
            "sessions": api,
            "stages": stages, "sinks": sinks,
            "lag": round(lag.last, 3) if lag is not None and lag.count else None,
            "quiet_for": self.quiet_for(),
            "alerts_fired": b.chain.alerts_fired, "videodb_alerts": self.videodb_alerts(),
            "dead_lettered": b.dead_letter.count,
            "lost": b.dead_letter.lost, "dead_letter_full": b.dead_letter.full,
            "alerts": [brief(a) for a in alerts[-20:]], "loop_lag": round(self.loop_lag, 4),
            "tap": {"clients": tap.client_count, "dropped": tap.dropped} if tap is not None else None,
        }
