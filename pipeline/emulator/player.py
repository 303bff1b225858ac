"""Plays a scenario for one capture session: lifecycle, scripted events, stop and export.

Scenario time starts once the controller has set its pipelines up (no setup
call for `settle` seconds), so even at speed 0 no event outruns the
`start_transcript`/`index_*` calls it needs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Final

from pipeline.emulator import scenario as sc
from pipeline.emulator.hub import Hub
from pipeline.emulator.state import AUDIO, TRANSCRIPT, VISUAL, Registry, Session

log = logging.getLogger("pipeline.emulator")

#: Scenario seconds between lifecycle steps (scaled by speed like the cues).
CREATED_TO_STARTING: Final = 0.4
STARTING_TO_ACTIVE: Final = 0.6
STOPPING_TO_STOPPED: Final = 1.5
STOPPED_TO_EXPORTED: Final = 3.0
_KIND: Final = {"transcript": TRANSCRIPT, "visual_index": VISUAL, "audio_index": AUDIO}
#: Generated events kept for `/_emulator/events` and tests: the newest ones. Kept without end, they grew by
#: 6,000 objects a second at 1,000 sessions, and the garbage collector walked them all again and again.
EMITTED_KEPT = 10_000


class Player:
    """Runs one task per session; routes every event to the connection ids that asked for it."""

    def __init__(self, registry: Registry, hub: Hub, *, speed: float, autostart: bool,
                 settle: float, setup_timeout: float) -> None:
        self.reg = registry
        self.hub = hub
        self.speed = speed
        self.autostart = autostart
        self.settle = settle
        self.setup_timeout = setup_timeout
        # {"connection_id", "event", "live"} for the last EMITTED_KEPT events routed
        self.emitted: deque[dict[str, Any]] = deque(maxlen=EMITTED_KEPT)

    def created(self, s: Session) -> None:
        """A session was just created: announce it and start its playback task."""
        self._lifecycle(s, "created")
        s.task = asyncio.get_running_loop().create_task(self._run(s), name=f"emulator-{s.id}")

    async def _run(self, s: Session) -> None:
        try:
            if self.autostart:
                await self._sleep(s, CREATED_TO_STARTING)
            while not (self.autostart or s.start_requested or s.stop_requested):
                await s.wake.wait()
                s.wake.clear()
            if not s.stop_requested and await self._start(s) and not await self._play(s):
                return
            await self._finish(s)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not kill the server silently
            log.exception("emulator: playback of %s failed", s.id)
            s.status = "failed"
            self._check_finished()

    async def _start(self, s: Session) -> bool:
        """created -> starting -> active; False if stopped by hand meanwhile."""
        self._lifecycle(s, "starting")
        if await self._sleep(s, STARTING_TO_ACTIVE):
            return False
        self._lifecycle(s, "active", {"rtstreams": s.rtstreams_seed()})
        loop = asyncio.get_running_loop()
        active_at = loop.time()
        while not s.stop_requested:
            now = loop.time()
            if s.setup_calls and now - s.last_setup >= self.settle:
                break
            if now - active_at >= self.setup_timeout:
                log.info("emulator: no pipeline started on %s after %.1fs; playing anyway",
                         s.id, self.setup_timeout)
                break
            # sleep until the settle time after the last setup call (or the setup timeout); a setup call
            # wakes us (Api._setup), so thousands of waiting sessions cost nothing while they wait
            until = s.last_setup + self.settle if s.setup_calls else active_at + self.setup_timeout
            await self._wall_sleep(s, max(0.01, until - now))
        return not s.stop_requested

    async def _play(self, s: Session) -> bool:
        """Emit the scenario's cues on time; False if the session failed."""
        loop = asyncio.get_running_loop()
        base_ms = round(time.time() * 1000)
        t0 = loop.time()
        cues = s.scenario.cues
        i = 0
        while i < len(cues) and not s.stop_requested:
            elapsed = (loop.time() - t0) * self.speed if self.speed else float("inf")
            due: dict[str, list[dict[str, Any]]] = {}
            while i < len(cues) and cues[i].at <= elapsed:
                cue = cues[i]
                i += 1
                if cue.channel == sc.FAILED:
                    self._flush(due)
                    s.status = "failed"
                    self._emit(s.conn, [sc.cue_event(s.scenario, cue, base_ms, s.id)])
                    self._check_finished()
                    return False
                for conn, ev in self._route(s, cue, base_ms):
                    due.setdefault(conn, []).append(ev)
            self._flush(due)
            if i < len(cues):
                await self._wall_sleep(s, t0 + cues[i].at / self.speed - loop.time())
        if not s.stop_requested and self.speed:
            await self._wall_sleep(s, t0 + s.scenario.end / self.speed - loop.time())
        return True

    async def _finish(self, s: Session) -> None:
        """stopping -> stopped -> exported (or an export that fails or never ends, see `Session.export_outcome`)."""
        self._lifecycle(s, "stopping")
        await asyncio.sleep(self._scaled(STOPPING_TO_STOPPED))
        self._lifecycle(s, "stopped")
        if not s.stored:  # as VideoDB: without a stored channel nothing is exported
            self._check_finished()
            return
        await asyncio.sleep(self._scaled(STOPPED_TO_EXPORTED))
        if s.export_outcome == "never":  # `export_status` stays `exporting`
            return
        if s.export_outcome == "failed":  # `export_status: failed`; the session stays `stopped`, nothing is sent
            s.export_failed = True
            log.info("emulator: session %s export failed", s.id)
            self._check_finished()
            return
        s.export = sc.export_data(s.id)
        self._lifecycle(s, "exported", dict(s.export))
        self._check_finished()

    def _route(self, s: Session, cue: sc.Cue, base_ms: int) -> list[tuple[str, dict[str, Any]]]:
        """(connection id, event) for every pipeline or alert that asked for this cue."""
        stream = s.stream_by_name(cue.stream)
        scn = s.scenario
        out: list[tuple[str, dict[str, Any]]] = []
        seen: set[str] = set()  # one event per connection, even when old and new bindings overlap
        if cue.channel == "alert":
            for a in self.reg.alerts_for(stream.rtstream_id, cue.label):
                if a.conn and self.hub.resolve(a.conn) not in seen:
                    seen.add(self.hub.resolve(a.conn))
                    ev = self._for_stream(sc.cue_event(scn, cue, base_ms, s.id), stream.rtstream_id)
                    ev["data"].update(alert_id=a.alert_id, event_id=a.event_id)
                    out.append((a.conn, ev))
            return out
        kind = _KIND[cue.channel]
        if kind == TRANSCRIPT:
            t = self.reg.transcripts.get(stream.rtstream_id)
            pipes = [t] if t is not None and t.running else []
        else:
            pipes = self.reg.indexes_for(stream.rtstream_id, kind)
        for p in pipes:
            if p.conn and self.hub.resolve(p.conn) not in seen:
                seen.add(self.hub.resolve(p.conn))
                ev = self._for_stream(sc.cue_event(scn, cue, base_ms, s.id), stream.rtstream_id)
                p.records.append(dict(ev["data"]))  # what REST returns (routes.py)
                out.append((p.conn, ev))
        return out

    @staticmethod
    def _for_stream(ev: dict[str, Any], rtstream_id: str) -> dict[str, Any]:
        ev["rtstream_id"] = rtstream_id  # session-specific id (see Registry.stream_ids)
        return ev

    def _lifecycle(self, s: Session, status: str, data: dict[str, Any] | None = None) -> None:
        s.status = status
        log.info("emulator: session %s %s", s.id, status)
        event = sc.lifecycle_event(status, s.id, data)
        if s.lifecycle_lost:  # produced, never sent: only polling the session tells
            self.emitted.append({"connection_id": s.conn, "event": event, "live": False})
            self.hub.undelivered += 1
            return
        self._emit(s.conn, [event])

    def _emit(self, conn: str | None, events: list[dict[str, Any]]) -> None:
        if conn:
            self._flush({conn: events})

    def _flush(self, due: dict[str, list[dict[str, Any]]]) -> None:
        for conn, events in due.items():
            records = [{"connection_id": conn, "event": ev, "live": False} for ev in events]
            self.emitted.extend(records)
            self.hub.send(conn, records)

    def _check_finished(self) -> None:
        if self.reg.all_finished():
            self.reg.finished.set()

    def _scaled(self, seconds: float) -> float:
        return seconds / self.speed if self.speed else 0.0

    async def _sleep(self, s: Session, seconds: float) -> bool:
        """Sleep scenario `seconds`, cut short by a stop request; True if stop was requested."""
        await self._wall_sleep(s, self._scaled(seconds))
        return s.stop_requested

    @staticmethod
    async def _wall_sleep(s: Session, delay: float) -> None:
        if s.stop_requested:
            return
        if delay <= 0:
            await asyncio.sleep(0)
            return
        if await s.wake.wait(delay):
            s.wake.clear()
