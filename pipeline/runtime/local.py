"""The local runtime: one asyncio loop, source -> processors -> every sink, in batches.

Each sink has a bounded queue; a slow sink makes `put()` wait, which stops the
source from reading (backpressure), so nothing is dropped. SIGINT/SIGTERM stop
the source; everything already read is processed, written and flushed before
exit. A second signal forces an immediate exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from typing import Any

from pipeline.build import Built, SinkSlot
from pipeline.errors import PipelineError, SinkFailed, StageError
from pipeline.events import Batch, event_time_ms
from pipeline.stats import LAG_BUCKETS, LATENCY_BUCKETS, Histogram

log = logging.getLogger("pipeline.runtime")

_DONE = None  # queue sentinel: no more batches


class _Acks:
    """Tracks which batches every sink has written, for sources that commit (Kafka)."""

    def __init__(self, sinks: int) -> None:
        self.done = [-1] * sinks

    def mark(self, sink: int, index: int) -> None:
        self.done[sink] = index

    @property
    def upto(self) -> int:
        return min(self.done) if self.done else -1


class LocalRuntime:
    """Runs a built pipeline to completion and returns the exit code."""

    def __init__(self, built: Built, *, install_signals: bool = True) -> None:
        self.b = built
        self.install_signals = install_signals
        q = built.config.runtime.queue_size
        self.queues: list[asyncio.Queue[tuple[int, Batch, float] | None]] = [asyncio.Queue(q) for _ in built.sinks]
        self.acks = _Acks(len(built.sinks))
        self.signals = 0
        self.started = time.monotonic()
        self.error: PipelineError | None = None
        self.exit_code = 0
        self._stopping = False
        # For the operator's view (pipeline/http): read at scrape time, fed once per batch.
        self.tap: Any = None  # a TapHub while a tap client is attached, else None (one check per batch)
        self.tap_base = 1 + len(built.chain.processors)  # tap points: 0 source, 1.. processors, then sinks
        self.lag = Histogram(LAG_BUCKETS)  # now - event time of each batch's newest event, at ingest
        self.latency = [Histogram(LATENCY_BUCKETS) for _ in built.sinks]  # receipt -> written, per sink
        self.sinks_started = False
        self.source_running = False

    # -- control -----------------------------------------------------------------------
    def _on_signal(self, signum: int) -> None:
        self.signals += 1
        if self.signals == 1:
            log.warning("received %s: stopping the source, draining and flushing (again to force exit)",
                        signal.Signals(signum).name)
            asyncio.get_running_loop().create_task(self.stop())
        else:
            sys.stderr.write("pipeline: second signal, exiting now without flushing\n")
            sys.stderr.flush()
            os._exit(130)

    async def stop(self) -> None:
        if not self._stopping:
            self._stopping = True
            await self.b.source.stop()

    # -- tasks -----------------------------------------------------------------------
    async def _ingest(self) -> None:
        b = self.b
        st = b.source.context.stats
        ctrl = b.controller
        chain = b.chain
        index = 0
        lag = self.lag
        clock, wall = time.monotonic, time.time
        self.source_running = True
        async for batch in b.source.batches():
            received = clock()
            st.received += len(batch)
            if batch:
                lag.observe(max(0.0, wall() - event_time_ms(batch[-1]) / 1000), len(batch))
            tap = self.tap
            if tap is not None:
                tap.publish(0, batch)
            if ctrl is not None:
                ctrl.observe(batch)
            out = chain(batch)
            st.sent += len(batch)
            for q in self.queues:
                await q.put((index, out, received))
            index += 1
            # Let the sinks take this batch now rather than after `queue_size` more: the events are
            # still in the CPU cache, and fewer batches alive means less memory churn (~20% faster).
            await asyncio.sleep(0)

    async def _drain(self, i: int, slot: SinkSlot) -> None:
        """Feed one sink. If it fails, the run stops and what it cannot write is dead-lettered."""
        q = self.queues[i]
        failed = False
        while True:
            item = await q.get()
            if item is None:
                return
            index, batch, received = item
            routed = slot.route(batch)
            slot.stats.received += len(batch)
            if routed and not failed:
                try:
                    await slot.sink.write(routed)
                except Exception as exc:
                    failed = True
                    self._fail(exc if isinstance(exc, PipelineError) else
                               StageError(f"{slot.stats.name}: write failed: {type(exc).__name__}: {exc}"))
                    if isinstance(exc, SinkFailed):  # the sink dead-lettered this batch itself
                        continue
                else:
                    slot.stats.sent += len(routed)
                    self.latency[i].observe(time.monotonic() - received, len(routed))
                    tap = self.tap
                    if tap is not None:
                        tap.publish(self.tap_base + i, routed)
            if failed:  # keep taking batches so ingest never blocks on us, but write them to the dead letter
                self._dead_letter(slot, routed, "sink failed before writing")
            else:
                self.acks.mark(i, index)

    def _dead_letter(self, slot: SinkSlot, events: Batch, reason: str) -> None:
        for event in events:
            slot.stats.errors += 1
            try:
                self.b.dead_letter.write(reason, stage=slot.stats.name, event=event)
            except PipelineError as exc:
                log.error("cannot write the dead-letter file: %s", exc)
                return

    def _check(self, task: asyncio.Task[Any]) -> None:
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            self._fail(exc if isinstance(exc, PipelineError) else
                       StageError(f"{task.get_name()}: {type(exc).__name__}: {exc}"))

    def _fail(self, exc: PipelineError) -> None:
        """Remember the first error and stop the source; everything already read still drains."""
        if self.error is None:
            self.error = exc
        asyncio.get_running_loop().create_task(self.stop())

    async def _commit_loop(self) -> None:
        commit = getattr(self.b.source, "commit", None)
        if commit is None:
            return
        last = -1
        while True:
            await asyncio.sleep(1.0)
            last = await self._commit(commit, last)

    async def _commit(self, commit: Any, last: int) -> int:
        upto = self.acks.upto
        if upto > last:
            for slot in self.b.sinks:
                await slot.sink.flush()
            await commit(upto)
        return max(upto, last)

    async def _watch_exit(self) -> None:
        await self.b.session.wait_exit()
        await self.stop()

    # -- run ----------------------------------------------------------------------------
    async def run(self) -> int:
        b = self.b
        loop = asyncio.get_running_loop()
        if self.install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._on_signal, sig)
        started: list[SinkSlot] = []
        helpers: list[asyncio.Task[Any]] = []
        try:
            for slot in b.sinks:
                await slot.sink.start()
                started.append(slot)
            self.sinks_started = True
            drains = [asyncio.create_task(self._drain(i, s), name=s.stats.name) for i, s in enumerate(b.sinks)]
            if b.controller is not None:
                helpers.append(asyncio.create_task(b.controller.start(), name="controller"))
            helpers.append(asyncio.create_task(self._watch_exit(), name="exit-watch"))
            helpers.append(asyncio.create_task(self._commit_loop(), name="commit"))
            ingest = asyncio.create_task(self._ingest(), name="ingest")
            await self._supervise(ingest, drains, helpers)
        except PipelineError as exc:
            self.error = exc
        finally:
            for t in helpers:
                t.cancel()
            await self._close(started)
            if self.install_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
        if self.error is not None:
            return self.error.exit_code
        return b.session.exit_code or 0

    async def _supervise(self, ingest: asyncio.Task[None], drains: list[asyncio.Task[None]],
                         helpers: list[asyncio.Task[Any]]) -> None:
        """Wait for the source to end (a failing sink or controller stops it), then drain every sink."""
        watched = {ingest, *helpers}
        while not ingest.done():
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            watched -= done
            for t in done:
                self._check(t)
        self._check(ingest)
        for q in self.queues:
            await q.put(_DONE)
        timeout = self.b.config.runtime.drain_timeout
        _, pending = await asyncio.wait(drains, timeout=timeout)
        if pending:
            for i, d in enumerate(drains):
                if d in pending:
                    d.cancel()
                    q, slot = self.queues[i], self.b.sinks[i]
                    while not q.empty():
                        item = q.get_nowait()
                        if item is not None:
                            self._dead_letter(slot, slot.route(item[1]), "sink did not drain within drain_timeout")
            self._fail(StageError(f"sinks did not drain within drain_timeout={timeout:g}s: "
                                  + ", ".join(t.get_name() for t in pending)))
        if self.error is not None:
            raise self.error
        commit = getattr(self.b.source, "commit", None)
        if commit is not None:
            await self._commit(commit, -1)

    async def _close(self, started: list[SinkSlot]) -> None:
        for slot in started:
            try:
                await slot.sink.close()
            except PipelineError as exc:
                self.error = self.error or exc
            except Exception as exc:
                self.error = self.error or StageError(f"{slot.stats.name}: close failed: {exc}")
        try:
            await self.b.source.close()
        except Exception as exc:
            log.warning("source: close failed: %s", exc)
        if self.b.controller is not None:
            try:
                await self.b.controller.close()
            except Exception as exc:
                log.warning("controller: close failed: %s", exc)
        self.b.dead_letter.close()

    def summary(self) -> str:
        b = self.b
        sinks = {slot.stats.name: slot.sink for slot in b.sinks}
        lines = [f"summary: pipeline {b.config.name!r} ran {time.monotonic() - self.started:.1f}s"]
        for st in b.stats:
            if st.kind == "source":
                lines.append(f"  {st.name:<28} read {st.received:>9}   rejected {st.dropped}")
            elif st.kind == "processor":
                lines.append(f"  {st.name:<28} in {st.received:>11}   out {st.sent:>9}"
                             f"   dropped {max(0, st.received - st.sent)}"
                             + (f"   errors {st.errors}" if st.errors else ""))
            elif st.kind == "sink":
                extra = "".join(f"   {k} {v}" for k, v in sinks[st.name].report().items())
                lines.append(f"  {st.name:<28} written {st.sent:>6}" + (f"   failed {st.errors}" if st.errors else "")
                             + extra)
        lines.append(f"  alerts fired by rules: {b.chain.alerts_fired}")
        lines.append(f"  dead-lettered: {b.dead_letter.count}" +
                     (f" -> {b.dead_letter.path}" if b.dead_letter.count else ""))
        if b.session.exit_reason:
            lines.append(f"  ended: {b.session.exit_reason}")
        return "\n".join(lines)
