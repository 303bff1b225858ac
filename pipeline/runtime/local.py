"""The local runtime: one asyncio loop, source -> processors -> every sink, in batches.

Each sink has a buffer (pipeline.runtime.buffers), bounded in batches and bytes:
in memory a slow sink makes `put()` wait, which stops the source from reading
(backpressure); on disk its backlog spills to a spool instead. SIGINT/SIGTERM
stop the source and start the `drain_timeout` clock: what was read is written
until then; after it nothing waits any more (the rest is dead-lettered, or stays
spooled), and each sink's `close()` gets its own `shutdown_timeout`. A second
signal forces an immediate exit. SIGHUP reloads the config (pipeline.runtime.reload);
it never stops the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Container
from typing import Any

from pipeline.build import Built, SinkSlot
from pipeline.contracts import checked_batches, ours
from pipeline.errors import PipelineError, SinkFailed, StageError
from pipeline.events import ALERT_NAMES, Batch, count_on, event_time_ms
from pipeline.runtime import hup, late_stop
from pipeline.runtime.buffers import (
    DiskBuffer,
    Item,
    MemoryBuffer,
    SinkBuffer,
    estimate_bytes,
    spool_dir,
    spool_root,
)
from pipeline.runtime.held import holding_time, says_what_it_holds, unheld_upto
from pipeline.runtime.reload import Reloader
from pipeline.runtime.sink_start import DEFAULT_CLOSE_TIMEOUT, close_limit, naming, sink_failure, start_within
from pipeline.state.spool import Damage, undelivered_bytes
from pipeline.stats import LAG_BUCKETS, LATENCY_BUCKETS, Histogram

log = logging.getLogger("pipeline.runtime")

RECEIPTS = 4096  # batch receipt times kept for the latency histogram (older batches are not observed)
SOURCE_GRACE = 0.1  # after drain_timeout, a source that has not ended gets this long (a put that waited drops)


class LocalRuntime:
    """Runs a built pipeline to completion and returns the exit code."""

    def __init__(self, built: Built, *, install_signals: bool = True) -> None:
        self.b = built
        self.install_signals = install_signals
        self.buffers: list[SinkBuffer] = [self._buffer(i, slot) for i, slot in enumerate(built.sinks)]
        self._writing: list[Item | None] = [None] * len(built.sinks)
        self._after_close: dict[int, Item] = {}  # sink index -> spooled write cancelled at shutdown, acked after close
        self._deadline: float | None = None  # loop time when drain_timeout expires
        self.signals = 0
        self.started = time.monotonic()
        self.error: PipelineError | None = None
        self.exit_code = 0
        self._stopping = False
        self._stop_requested = asyncio.Event()  # set with _stopping: a sink still starting gives way
        self.reloader: Reloader | None = None  # set by the runner for `run` (SIGHUP, --watch)
        self.gate = asyncio.Event()  # cleared while a reload swaps sinks: ingest waits between two batches
        self.gate.set()
        self.fanning_out = False
        self.next_batch = 0  # the index of the next batch handed to the sinks
        self.first_source_batch = 0  # 1 when what an earlier run kept went out first as batch 0
        self.carry: Batch = []  # events a reload produced (windows it closed): handed out with the next batch
        self.finishing = False  # the final flush began: nothing more goes through the processors, no reload
        # For the operator's view (pipeline/http): read at scrape time, fed once per batch.
        self.tap: Any = None  # a TapHub while a tap client is attached, else None (one check per batch)
        self.lag = Histogram(LAG_BUCKETS)  # now - event time of each batch's newest event, at ingest
        self.latency = [Histogram(LATENCY_BUCKETS) for _ in built.sinks]  # receipt -> written, per sink
        self.latency_at: list[float | None] = [None] * len(built.sinks)  # monotonic time `latency[i].last` was taken
        self.writing_since: list[float | None] = [None] * len(built.sinks)  # when the batch in sink i went in
        self.flushing_since: list[float | None] = [None] * len(built.sinks)  # when the runtime's flush of i began
        self.wrote_at: list[dict[int, float]] = [{} for _ in built.sinks]  # kept batch -> when sink i's write returned
        self.received_at: dict[int, float] = {}  # batch index -> monotonic receipt time (the last RECEIPTS)
        self.last_event_at: float | None = None  # monotonic receipt time of the newest event (`lag` is its lag)
        self.videodb_alerts = 0  # events the source passed on on the alert channel (VideoDB's own, not rules')
        self.sinks_started = False
        self.source_running = False
        self._ingest_task: asyncio.Task[None] | None = None
        self._in_source = False  # ingest is waiting for the source's next batch
        self._source_abandoned = False  # ... and was cancelled there after drain_timeout

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

    def _on_hup(self) -> None:
        if self.reloader is not None:
            self.reloader.request("SIGHUP")
        else:
            log.warning("received SIGHUP: this runtime has no config to reload; ignored")

    async def stop(self) -> None:
        if not self._stopping:
            self._stopping = True
            self._stop_requested.set()
            self._start_drain_clock()
            await self.b.source.stop()

    def _start_drain_clock(self) -> None:
        """From now on sinks have `drain_timeout` to take what was read; then nothing waits any more."""
        if self._deadline is None:
            loop = asyncio.get_running_loop()
            self._deadline = loop.time() + self.b.config.runtime.drain_timeout
            loop.call_at(self._deadline, self._expire)

    def _expire(self) -> None:
        for buf in self.buffers:
            buf.expire()
        asyncio.get_running_loop().call_later(SOURCE_GRACE, self._cancel_stuck_source)

    def _cancel_stuck_source(self) -> None:
        """drain_timeout is over and the source still has not ended (a call it waits on never returns): it is
        cancelled, so the stop stays bounded. What it had yielded was handed to the sinks as usual."""
        task = self._ingest_task
        if task is None or task.done():
            return
        if not self._in_source:  # between two batches (a put that waited drops now): once it is back at the source
            asyncio.get_running_loop().call_later(SOURCE_GRACE, self._cancel_stuck_source)
            return
        log.warning("source: did not stop within drain_timeout=%gs; cancelled", self.b.config.runtime.drain_timeout)
        self._source_abandoned = True
        task.cancel()

    # -- buffers -----------------------------------------------------------------------
    def _buffer(self, i: int, slot: SinkSlot) -> SinkBuffer:
        opts = slot.buffer
        queue = self.b.config.runtime.queue_size

        def reject(events: Batch, reason: str) -> int:
            return self._dead_letter(slot, events, reason)

        if opts.type == "disk":
            directory = spool_dir(self.b.config, i, slot.type_name)
            return DiskBuffer(opts, directory, queue, reject, lambda d: self._damaged(slot, d))
        return MemoryBuffer(opts, queue, reject, merge=getattr(slot.sink, "merge_queued", False))

    def _damaged(self, slot: SinkSlot, d: Damage) -> None:
        """A spool range that held no valid record (torn tail after kill -9): one dead-letter line."""
        slot.stats.errors += 1
        log.warning("%s: spool %s: %s at offset %d; %d byte(s) skipped", slot.stats.name, d.segment, d.reason,
                    d.offset, d.length)
        self.b.dead_letter.write(f"spool: {d.reason}; {d.length} byte(s) skipped", stage=slot.stats.name,
                                 origin={"spool": str(d.segment), "offset": d.offset, "length": d.length},
                                 raw=d.raw)

    # -- tasks -----------------------------------------------------------------------
    async def _ingest(self) -> None:
        b = self.b
        st = b.source.context.stats
        ctrl = b.controller
        chain = b.chain
        state = b.state
        source = b.source
        targets = list(zip(b.sinks, self.buffers, strict=True))
        index = 0
        lag, received_at = self.lag, self.received_at
        clock, wall = time.monotonic, time.time
        self.source_running = True
        batches = source.batches() if ours(source) else checked_batches(source, b.dead_letter)
        # what an earlier run kept (closed windows, alerts) and no sink got for sure: out first, as a batch of its
        # own (a quiet source held it back until its first event), kept until every sink has it
        self.carry = state.undelivered(index) + self.carry
        if self.carry:
            await self.gate.wait()
            kept, self.carry = self.carry, []
            await self._hand_out(targets, index, kept, estimate_bytes(kept) / len(kept))
            index += 1
            self.next_batch = self.first_source_batch = index
        while True:
            self._in_source = True  # only here may a source still running after drain_timeout be cancelled
            try:
                batch = await anext(batches)
            except StopAsyncIteration:
                break
            except SystemExit as exc:  # a plugin's: it ended the run with exit code 0 and a traceback
                raise StageError(f"{st.name}: called sys.exit({exc.code!r})") from None
            except asyncio.CancelledError:
                if not self._source_abandoned:
                    raise
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                break  # as if the source had ended: open windows still close below
            finally:
                self._in_source = False
            await self.gate.wait()  # set except while a reload swaps sinks
            n = len(batch)
            st.received += n
            received_at[index] = clock()
            received_at.pop(index - RECEIPTS, None)
            if n:
                lag.observe(max(0.0, wall() - event_time_ms(batch[-1]) / 1000), n)
                self.last_event_at = received_at[index]
                self.videodb_alerts += count_on(batch, ALERT_NAMES)
            tap = self.tap
            if tap is not None:
                tap.publish(0, batch)
            # sources report the raw size of what they read; the estimate is for those that do not
            raw = getattr(source, "batch_bytes", None)
            per_event = (raw if raw is not None else estimate_bytes(batch)) / n if n else 0.0
            if ctrl is not None:
                ctrl.observe(batch)
            out = chain(batch)
            if self.carry:
                out, self.carry = self.carry + out, []
            st.sent += n
            await self._hand_out(targets, index, out, per_event)
            index += 1
            self.next_batch = index
            # Let the sinks take this batch now rather than after `queue_size` more: the events are
            # still in the CPU cache, and fewer batches alive means less memory churn (~20% faster).
            await asyncio.sleep(0)
        await self.gate.wait()  # a reload being applied goes first: what it closes joins the final flush
        self.finishing = True
        held = chain.flush()  # the source ended (exhausted, exit_on, signal): open windows close now
        if self.carry:
            held, self.carry = self.carry + held, []
        state.hold(held, index)
        if state.dirty:
            state.flush()
        if held:
            await self._fan_out(targets, index, held, estimate_bytes(held) / len(held))

    async def _hand_out(self, targets: list[tuple[SinkSlot, SinkBuffer]], index: int, out: Batch,
                        per_event: float) -> None:
        """Batch `index` to every sink's buffer, its kept outputs saved first with the state they left."""
        state = self.b.state
        state.hold(out, index)  # kept until every sink has batch `index`
        if state.dirty:  # rule/enrich state is saved before its alerts can reach a sink
            state.flush()
        self.fanning_out = True  # a reload waits for this batch to be in every sink's buffer
        await self._fan_out(targets, index, out, per_event)
        self.fanning_out = False

    @staticmethod
    async def _fan_out(targets: list[tuple[SinkSlot, SinkBuffer]], index: int, out: Batch,
                       per_event: float) -> None:
        """Hand batch `index` to every sink's buffer (routed by channel); a full buffer waits or spills.

        A spool the disk refuses dead-letters its share and the run stops, after every other sink got the batch.
        """
        refused: StageError | None = None
        for slot, buf in targets:
            slot.stats.received += len(out)
            routed = slot.route(out)
            if routed:
                try:
                    await buf.put(index, routed, int(per_event * len(routed)) + 1)
                except StageError as exc:
                    refused = refused or exc
            else:
                buf.skip(index)
        if refused is not None:
            raise refused

    async def _drain(self, i: int, slot: SinkSlot) -> None:
        """Feed one sink. If it fails, the run stops and what it cannot write is dead-lettered
        (memory buffer) or stays spooled for the next run (disk buffer)."""
        buf = self.buffers[i]
        failed = False
        while True:
            item = await buf.get()
            if item is None:
                return
            batch = item.batch
            if batch and not failed:
                self._writing[i] = item
                self.writing_since[i] = time.monotonic()
                wrote = False
                try:
                    await slot.sink.write(batch)
                    wrote = True
                    if buf.durable:  # acknowledged in the spool only once durable (not just in a sink's queue)
                        await slot.sink.flush()
                except (Exception, SystemExit) as exc:  # a plugin's sys.exit(): ended the run with 0, batches lost
                    failed = True
                    if wrote and isinstance(exc, SinkFailed):
                        slot.stats.sent += len(batch)  # a failed flush took its rows off `sent`, as if counted
                    self._fail(sink_failure(slot.stats.name, "write", exc))
                    if isinstance(exc, SinkFailed):  # the sink dead-lettered this batch itself
                        buf.taken(item)
                    if buf.durable:  # everything not written stays in the spool
                        return
                    if not isinstance(exc, SinkFailed):
                        self._dead_letter(slot, batch, "sink failed before writing")
                        buf.taken(item)
                    continue
                finally:
                    self._writing[i] = None
                    self.writing_since[i] = None
                slot.stats.sent += len(batch)
                if self.b.state.holds(item.index):  # outputs are kept for it (see _delivered)
                    self.wrote_at[i][item.index] = time.monotonic()
                if self.b.dead_letter.lost and self.error is None:  # the sink could not dead-letter one event
                    self._fail(StageError(f"{self.b.dead_letter.failure}; events are being lost: stopping"))
                t = self.received_at.get(item.index)
                if t is not None:  # (not for batches spooled by an earlier run)
                    now = time.monotonic()
                    self.latency[i].observe(now - t, len(batch))
                    self.latency_at[i] = now
                tap = self.tap
                if tap is not None:
                    tap.publish(-1 - i, batch)  # sink i is tap point -1-i
            elif failed:  # keep taking batches so ingest never blocks on us, but write them to the dead letter
                self._dead_letter(slot, batch, "sink failed before writing")
            buf.taken(item)

    def _dead_letter(self, slot: SinkSlot, events: Batch, reason: str) -> int:
        """Dead-letter `events`; returns how many were written (not those a full file left out: they are counted
        there). If the file cannot be written, the rest are counted as lost and the run stops (exit 1): every later
        reject would be lost too."""
        written = 0
        for k, event in enumerate(events):
            slot.stats.errors += 1
            try:
                written += self.b.dead_letter.write(reason, stage=slot.stats.name, event=event)
            except PipelineError as exc:
                rest = len(events) - k - 1
                slot.stats.errors += rest
                self.b.dead_letter.lose(rest)
                log.error("%s: %s; %d event(s) lost", slot.stats.name, exc, rest + 1)
                self._fail(StageError(f"{exc}; events are being lost: stopping"))
                return written
        return written

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
        """Once a second: commit the source's offsets (a kafka source) and forget held outputs that every sink
        has written (`StateStore.hold`), each after flushing the sinks."""
        commit = getattr(self.b.source, "commit", None)
        last = -1
        while True:
            await asyncio.sleep(1.0)
            if commit is not None:
                last = await self._commit(commit, last)
            await self._delivered(last if commit is not None else None)

    async def _delivered(self, flushed: int | None) -> None:
        """Forget the held outputs of the batches every sink has flushed, or no longer holds (a sink that says
        what it holds is not flushed for this: see `pipeline.runtime.held`). `flushed`: the batch a commit
        flushed the sinks up to (not where they are now: a batch written while the commit was awaited is
        still in a sink's buffer); None: flush them here."""
        upto = min((buf.safe_upto for buf in self.buffers), default=-1) if flushed is None else flushed
        state = self.b.state
        low = state.lowest_held()
        if low is None or low > upto:
            return
        says: dict[int, float | None] = {}  # sink -> since when it holds, for those that say (in memory)
        for i, (slot, buf) in enumerate(zip(self.b.sinks, self.buffers, strict=True)):
            if not buf.durable and says_what_it_holds(slot.sink):
                with contextlib.suppress(ValueError):  # a nonsense answer: flushed as a sink that does not say
                    says[i] = holding_time(slot.sink, strict=True)
        if flushed is None:
            await self._flush_sinks(skip=says)
        for i, since in says.items():
            upto = min(upto, unheld_upto(self.wrote_at[i], upto, since))
        if low > upto:
            return
        state.delivered(upto)  # only now: a batch's save meanwhile must not record it first
        for wrote in self.wrote_at:
            for b in [b for b in wrote if b <= upto]:
                del wrote[b]
        state.flush()

    async def _flush_sinks(self, skip: Container[int] = ()) -> None:
        """Flush every sink not disk-buffered (a spooled batch is safe already: not held up by the sink's
        delivery), but those in `skip`. A failure names its sink (it ends the run, as a failed write does)."""
        for i, (slot, buf) in enumerate(zip(self.b.sinks, self.buffers, strict=True)):
            if buf.durable or i in skip:
                continue
            self.flushing_since[i] = time.monotonic()
            try:
                await self._flush_watched(slot)
            except Exception as exc:
                raise sink_failure(slot.stats.name, "flush", exc) from exc
            finally:
                self.flushing_since[i] = None

    async def _flush_watched(self, slot: SinkSlot) -> None:
        """`slot.sink.flush()`, with one warning when it has not returned within `drain_timeout`: until it does,
        no offsets are committed and kept alerts and window metrics stay kept (before, that stall said nothing)."""
        flush = asyncio.ensure_future(slot.sink.flush())
        try:
            done, _ = await asyncio.wait({flush}, timeout=self.b.config.runtime.drain_timeout)
            if not done:
                log.warning("%s: flush has not returned for %gs; offsets are not committed, and kept alerts and "
                            "window metrics stay in state_dir, until it does", slot.stats.name,
                            self.b.config.runtime.drain_timeout)
            await flush
        finally:
            flush.cancel()  # (a cancelled wait: not left running on its own)

    async def _commit(self, commit: Any, last: int) -> int:
        upto = min(buf.safe_upto for buf in self.buffers)
        if upto > last:
            await self._flush_sinks()
            if upto >= self.first_source_batch:  # the source numbers its batches from 0
                await commit(upto - self.first_source_batch)
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
            loop.add_signal_handler(signal.SIGHUP, self._on_hup)
            if hup.take():  # one came while starting: the file may have changed since it was read
                self._on_hup()
        started: list[SinkSlot] = []
        helpers: list[asyncio.Task[Any]] = []
        try:
            b.dead_letter.check()  # unwritable: fail now, not at the first reject (which would cost its batch)
            self._open_spools()
            if await self._start_sinks(started):
                await self._serve(helpers)
        except PipelineError as exc:
            self.error = exc
        finally:
            for t in helpers:
                t.cancel()
            await self._close(started)
            for buf in self.buffers:
                if isinstance(buf, DiskBuffer) and (why := buf.check_kept()) is not None:
                    self.error = self.error or StageError(why)  # "left spooled" would be a silent loss
                buf.close()
            if self.install_signals:
                late_stop.take_over(loop)  # a SIGTERM now must not end the process before its summary
                hup.ignore(loop)  # the summary is still to be written: a late SIGHUP must not end the process
        # events LOST, or rejects a full dead-letter file left out: the run went on, but never exits 0
        if self.error is None and (unkept := b.dead_letter.unkept()) is not None:
            self.error = StageError(unkept)
        if self.error is not None:
            return self.error.exit_code
        return b.session.exit_code or 0

    def _held_since(self) -> float | None:
        """The oldest hand-out a sink still holds only in memory (see Sink.holding_since). Disk-buffered sinks
        too: with parquet's `complete_on_flush: false` the spool forgets rows its open file still holds."""
        return min((t for slot in self.b.sinks if (t := holding_time(slot.sink)) is not None), default=None)

    async def _start_sinks(self, started: list[SinkSlot]) -> bool:
        """Start every sink, each within its start timeout; False when a signal came first (nothing was read,
        so there is nothing to flush)."""
        for slot in self.b.sinks:
            try:
                why = await start_within(slot.sink, self._stop_requested)
            except Exception as exc:  # a file it cannot open, a plugin's connect error: which sink, in one line
                raise naming(slot.stats.name, exc) from None
            if why is not None:
                if self._stopping:
                    return False
                raise StageError(f"{slot.stats.name}: {why}; nothing was read (the sink's `start_timeout` "
                                 f"option sets the wait)")
            started.append(slot)
        self.sinks_started = True
        return True

    async def _serve(self, helpers: list[asyncio.Task[Any]]) -> None:
        """Run the sinks' feeds, the controller and the helpers, and ingest until the source ends."""
        b = self.b
        b.session.held_since = self._held_since
        drains = [asyncio.create_task(self._drain(i, s), name=s.stats.name) for i, s in enumerate(b.sinks)]
        if b.controller is not None:
            helpers.append(asyncio.create_task(b.controller.start(), name="controller"))
        helpers.append(asyncio.create_task(self._watch_exit(), name="exit-watch"))
        helpers.append(asyncio.create_task(self._commit_loop(), name="commit"))
        if self.reloader is not None:
            helpers.append(asyncio.create_task(self.reloader.run(), name="reload"))
        ingest = asyncio.create_task(self._ingest(), name="ingest")
        self._ingest_task = ingest
        await self._supervise(ingest, drains, helpers)

    def _open_spools(self) -> None:
        """Open disk buffers before any sink starts: what an earlier run left is delivered first."""
        for slot, buf in zip(self.b.sinks, self.buffers, strict=True):
            if isinstance(buf, DiskBuffer):
                buf.open()
                if buf.restored:
                    log.warning("%s: %d event(s) left in the spool by an earlier run; delivering them first",
                                slot.stats.name, buf.restored)
        used = {buf.spool.dir for buf in self.buffers if isinstance(buf, DiskBuffer)}
        root = spool_root(self.b.config)
        for d in sorted(root.iterdir()) if root.is_dir() else ():
            size = undelivered_bytes(d) if d.is_dir() and d not in used else 0
            if size:
                log.warning("%s: %d undelivered byte(s) spooled under an earlier configuration, and no sink "
                            "with a disk buffer at that position now; delete it once it is not needed", d, size)

    async def _supervise(self, ingest: asyncio.Task[None], drains: list[asyncio.Task[None]],
                         helpers: list[asyncio.Task[Any]]) -> None:
        """Wait for the source to end (a failing sink, its feed or the controller stops it), then drain every sink."""
        watched = {ingest, *helpers, *drains}  # a feed that dies (a spool it cannot read) stops the run
        while not ingest.done():
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            watched -= done
            for t in done:
                self._check(t)
        self._check(ingest)
        for buf in self.buffers:
            buf.finish()
        self._start_drain_clock()
        assert self._deadline is not None
        loop = asyncio.get_running_loop()
        done, pending = await asyncio.wait(drains, timeout=max(self._deadline - loop.time(), 0.0))
        for t in done:
            self._check(t)
        if pending:
            self._abandon(drains, pending)
        late = sum(buf.dropped_at_shutdown for buf in self.buffers)
        if late:  # read before the stop, handed out after drain_timeout: dead-lettered, and the exit says so
            self._fail(StageError(f"{late} event(s) reached the sinks' buffers after drain_timeout="
                                  f"{self.b.config.runtime.drain_timeout:g}s and were dead-lettered"))
        if self.error is not None:
            raise self.error
        commit = getattr(self.b.source, "commit", None)
        if commit is not None:  # flushing waits on sinks (a webhook's retries): only while drain_timeout lasts
            try:
                await asyncio.wait_for(self._commit(commit, -1), max(self._deadline - loop.time(), 0.05))
            except TimeoutError:
                log.warning("source: the last batches were not flushed within drain_timeout; their offsets are "
                            "not committed and the next run reads them again")

    def _abandon(self, drains: list[asyncio.Task[None]], pending: set[asyncio.Task[None]]) -> None:
        """drain_timeout is over: stop feeding the sinks still busy; what they never took is dead-lettered
        (memory) or stays spooled for the next run (disk). Their close() gets shutdown_timeout."""
        timeout = self.b.config.runtime.drain_timeout
        lost: list[str] = []
        for i, d in enumerate(drains):
            if d not in pending:
                continue
            d.cancel()
            slot, buf, item = self.b.sinks[i], self.buffers[i], self._writing[i]
            if item is not None:  # the write in flight was cancelled
                if getattr(slot.sink, "cancel_safe", False):  # the sink delivers or dead-letters it in close()
                    if buf.durable:  # ... so it leaves the spool only once close() returned: a kill -9 or a
                        self._after_close[i] = item  # second signal meanwhile must not take it with them
                    else:
                        buf.taken(item)
                elif not buf.durable:
                    self._dead_letter(slot, item.batch, "sink write cancelled at shutdown (drain_timeout); "
                                                        "it may have been partly written")
            left = buf.leftover()
            for it in left:
                self._dead_letter(slot, it.batch, "sink did not drain within drain_timeout")
            if isinstance(buf, DiskBuffer):
                if (why := buf.check_kept()) is not None:
                    self._fail(StageError(why))
                else:  # (not counting a write close() still delivers or dead-letters)
                    closing = len(self._after_close[i].batch) if i in self._after_close else 0
                    log.warning("%s: did not drain within drain_timeout=%gs; %d event(s) stay in the spool "
                                "for the next run", slot.stats.name, timeout, buf.pending_events - closing)
            else:
                lost.append(slot.stats.name)
        if lost:
            self._fail(StageError(f"sinks did not drain within drain_timeout={timeout:g}s: " + ", ".join(lost)))

    async def _close(self, started: list[SinkSlot]) -> None:
        """Close every sink and the source at once, each sink bounded by its own shutdown_timeout (+2 s), the
        source by the largest of those (at most 10 s); then the controller."""
        limit = min(DEFAULT_CLOSE_TIMEOUT, max((close_limit(slot.sink) for slot in started),
                                               default=DEFAULT_CLOSE_TIMEOUT))
        source = asyncio.ensure_future(self._close_source(limit))
        results = await asyncio.gather(*(self._close_sink(slot) for slot in started), return_exceptions=True)
        for slot, res in zip(started, results, strict=True):
            i = next((k for k, s in enumerate(self.b.sinks) if s is slot), -1)
            if res is None and i in self._after_close:  # close() delivered or dead-lettered it: not again
                done = self._after_close.pop(i)
                self.buffers[i].taken(done)
                slot.stats.sent += len(done.batch)  # ... so it was written (a write counts after its flush)
            if isinstance(res, PipelineError):
                self.error = self.error or res
            elif isinstance(res, BaseException):
                self.error = self.error or StageError(f"{slot.stats.name}: close failed: {res}")
        await source
        if self.b.controller is not None:
            try:
                await self.b.controller.close()
            except Exception as exc:
                log.warning("controller: close failed: %s", exc)
        self.b.dead_letter.close()
        # the sinks are closed (flushed): what they took is written; unless a close failed (its last lines may
        # be lost): the next run hands the held outputs out again
        if all(res is None for res in results):
            self.b.state.delivered(min((buf.safe_upto for buf in self.buffers), default=-1))
        self.b.state.close()

    async def _close_source(self, limit: float) -> None:
        try:
            await asyncio.wait_for(self.b.source.close(), limit)
        except TimeoutError:
            log.warning("source: close did not finish within %gs; abandoned", limit)
        except Exception as exc:
            log.warning("source: close failed: %s", exc or type(exc).__name__)

    async def _close_sink(self, slot: SinkSlot) -> None:
        limit = close_limit(slot.sink)
        try:
            await asyncio.wait_for(slot.sink.close(), limit)
        except TimeoutError:
            raise StageError(f"{slot.stats.name}: close() did not finish within {limit:g}s") from None

    def summary(self) -> str:
        b = self.b
        sinks = {slot.stats.name: slot for slot in b.sinks}
        procs = {p.context.stats.name: p for p in b.chain.processors}
        lines = [f"summary: pipeline {b.config.name!r} ran {time.monotonic() - self.started:.1f}s"]
        for st in b.stats:
            if st.kind == "source":
                lines.append(f"  {st.name:<28} read {st.received:>9}   rejected {st.dropped}")
            elif st.kind == "processor":
                lines.append(f"  {st.name:<28} in {st.received:>11}   out {st.sent:>9}"
                             f"   dropped {max(0, st.received - st.sent)}"
                             + (f"   errors {st.errors}" if st.errors else "")
                             + "".join(f"   {k} {v}" for k, v in st.report_of(procs[st.name]).items()))
            elif st.kind == "sink":
                report = dict(sinks[st.name].report())
                written = report.pop("written", st.sent)  # a sink may count what it really wrote (console)
                extra = "".join(f"   {k} {v}" for k, v in report.items())
                extra += self._buffer_report(st.name)
                lines.append(f"  {st.name:<28} written {written:>6}" + (f"   failed {st.errors}" if st.errors else "")
                             + extra)
        if b.chain.alerts_fired or any(hasattr(p, "fired") for p in b.chain.processors):
            lines.append(f"  alerts fired by rules: {b.chain.alerts_fired}")
        lines.append(f"  dead-lettered: {b.dead_letter.count}" +
                     (f" -> {b.dead_letter.path}" if b.dead_letter.count else ""))
        lines.extend(f"  {line}" for line in b.dead_letter.summary_lines())
        if (gaps := b.session.gaps.summary()) is not None:
            lines.append(gaps)
        if self.reloader is not None and (self.reloader.applied or self.reloader.rejected):
            lines.append(f"  reloads: {self.reloader.applied} applied, {self.reloader.rejected} rejected")
        if b.session.exit_reason:
            lines.append(f"  ended: {b.session.exit_reason}")
        return "\n".join(lines)

    def _buffer_report(self, name: str) -> str:
        return "".join(f"   {k} {v}" for k, v in self.buffer_counts(name).items())

    def buffer_counts(self, name: str) -> dict[str, int]:
        """The non-zero counters of sink `name`'s buffer, as the summary words them (the JSON summary too)."""
        for slot, buf in zip(self.b.sinks, self.buffers, strict=True):
            if slot.stats.name == name:
                out = {"buffer-full dead-lettered": buf.rejected,
                       "dead-lettered after drain_timeout": buf.dropped_at_shutdown}
                if isinstance(buf, DiskBuffer):
                    out["not JSON-encodable dead-lettered"] = buf.unencodable
                    out["from earlier spool"] = buf.restored
                    if buf.lost:
                        out["LOST with its spool"] = buf.lost
                    else:
                        out["left spooled"] = buf.pending_events
                return {k: v for k, v in out.items() if v}
        return {}
