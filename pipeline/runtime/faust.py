"""The faust-streaming runtime's worker (`pipeline worker`); the ingest half is in `faust_ingest`.

- Worker (`worker_main`): a faust app (consumer group `videodb-pipeline-<name>`)
  whose agent reads the ingest topic in batches and runs the same processors and
  sinks, unchanged. Start more workers to scale; a worker that dies hands its
  partitions to the others. Stage state lives in faust Tables (see faust_state).
- A batch is acknowledged (its offsets may be committed), and the state it wrote
  reaches the tables' changelog, only after every sink wrote and flushed it. A sink
  that fails dead-letters the batch and stops the worker with its one-line error.

faust is imported inside functions so `import pipeline.cli` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

import orjson

from pipeline import secrets
from pipeline.argparsing import Parser
from pipeline.build import SinkSlot, build
from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError, PipelineError, SinkFailed, StageError
from pipeline.events import ALERT_NAMES, Batch, Event, count_on, edge_reason, event_time_ms
from pipeline.files import ensure_private_dir
from pipeline.kafka import quiet_aiokafka
from pipeline.runtime.faust_flow import keeping_flow_control
from pipeline.runtime.faust_ingest import app_id, create_ingest_topic, ingest_topic
from pipeline.runtime.faust_latency import transport_class
from pipeline.runtime.faust_offsets import commit_before_revoke
from pipeline.runtime.faust_recovery import rereading_recovery, table_manager
from pipeline.runtime.faust_seek import read_from_seek
from pipeline.runtime.faust_state import PartitionCursor, TableState, partition_table_class
from pipeline.runtime.faust_stop import (
    DrainClock,
    StopCommits,
    bounded_at_stop,
    bounded_producer,
    give_up,
    one_line_abandoned_request,
)
from pipeline.runtime.sink_start import close_limit, naming, sink_failure, start_within
from pipeline.stale import hold_dir, remove_stale_dirs
from pipeline.stats import LAG_BUCKETS, LATENCY_BUCKETS, Histogram
from pipeline.types import parse_duration

log = logging.getLogger("pipeline.runtime.faust")

BATCH_MAX = 1000  # records per faust batch
SLICE_EVENTS = 10000  # decoded events per pass through the stages (plus those of one record)
CHANGELOG_DRAIN = 2.0  # seconds a stopping worker waits for its last state changes to reach the broker
COMMIT_FLOOR = 2.0  # seconds an offset commit at stop may take, also with a shorter drain_timeout
SESSION_TIMEOUT = (1.0, 90.0)  # --session-timeout bounds: heartbeats every timeout/6; faust's request timeout 90 s


def _parse(raw: Any) -> tuple[Event | None, str]:
    """(event, "") for a JSON object the edge accepts, else (None, why not)."""
    try:
        event = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError) as exc:
        return None, f"not JSON: {exc}"
    if not isinstance(event, dict):
        return None, f"JSON {type(event).__name__}, not an object"
    refused = edge_reason(raw, event) if isinstance(raw, bytes | str) else None
    return (None, refused) if refused else (event, "")


def _one_object(value: bytes) -> bool:
    """Whether a record value is a single JSON object spread over lines (another producer's pretty-print)."""
    try:
        return isinstance(orjson.loads(value), dict)
    except orjson.JSONDecodeError:
        return False


# --- worker ------------------------------------------------------------------------------------

async def ready_batches(stream: Any, most: int) -> Any:
    """Batches of the records a faust stream already holds (up to `most`), each as soon as it arrives.

    Why not `take_events`: it yields on a fixed timer, so every record waited up to that long even on an
    idle worker. Here a record waits only for the batch before it. Records are acknowledged after the
    batch was handled (the consumer of this generator came back), so offsets never pass unhandled ones.
    """
    stream.enable_acks = False
    channel = stream.channel
    pending: list[Any] = []
    async for event in stream.events():
        pending.append(event)
        if len(pending) < most and not channel.empty():
            continue
        yield pending
        for event in pending:
            await stream.ack(event)
        pending = []


class Worker:
    """One faust worker: the app, its agent over the ingest topic, the processors and sinks."""

    def __init__(self, cfg: PipelineConfig, workers_dir: Path, session_timeout: float) -> None:
        import faust
        from faust.tables import TableManager
        from faust.tables.recovery import Recovery
        from mode.utils.objects import cached_property
        from mode.utils.queues import FlowControlEvent

        self.cfg = cfg
        self.error: PipelineError | None = None
        self.cursor = PartitionCursor()
        partitions = cfg.runtime.partitions
        datadir = workers_dir / f"{socket.gethostname()}-{os.getpid()}"
        remove_stale_dirs(workers_dir, f"{socket.gethostname()}-")  # left by workers killed on this host
        ensure_private_dir(datadir)
        self.datadir = datadir
        self._datadir_lock = hold_dir(datadir)  # (released when the process ends)
        runtime = self

        transport = transport_class(cfg.runtime.fetch_max_wait)
        self.commits = StopCommits(max(cfg.runtime.drain_timeout, COMMIT_FLOOR))
        transport.Consumer = read_from_seek(bounded_at_stop(commit_before_revoke(transport.Consumer), self.commits))
        transport.Producer = bounded_producer(transport.Producer, self.commits)
        flow_control = keeping_flow_control(FlowControlEvent)

        class PipelineApp(faust.App):  # type: ignore[misc]
            async def on_stop(self) -> None:
                runtime.drain.start()  # faust now waits for the batch in hand: at most drain_timeout
                runtime.commits.stopping = True
                await super().on_stop()

            async def on_shutdown(self) -> None:
                await runtime.close()
                await super().on_shutdown()

            async def _producer_flush(self, logger: Any) -> None:  # aiokafka waits up to 20 min for a gone broker
                try:
                    await asyncio.wait_for(super()._producer_flush(logger), runtime.commits.timeout)
                except TimeoutError:
                    log.warning("worker %d: records still unsent at stop after %gs", os.getpid(),
                                runtime.commits.timeout)

            def _new_transport(self) -> Any:
                return transport(self.conf.broker_consumer, self)

            @cached_property  # type: ignore[misc]
            def flow_control(self) -> Any:  # see faust_flow: resuming a running flow keeps the buffered records
                return flow_control(loop=self.loop)

        self.app = PipelineApp(
            app_id(cfg), broker=cfg.runtime.broker, store="memory://", datadir=str(datadir),
            web_enabled=False, topic_partitions=partitions, topic_replication_factor=1,
            producer_acks=-1, consumer_auto_offset_reset="earliest",
            key_serializer="json", value_serializer="json",
            broker_session_timeout=session_timeout,
            broker_heartbeat_interval=max(0.5, session_timeout / 6),
            # no standby replicas: a standby reads another worker's changelog partitions into the same tables,
            # so it emitted their windows too (at its stop, or once due); the memory store reads a newly
            # assigned partition's changelog whole anyway, so a standby copy saved no time
            table_standby_replicas=0,
            # the check compares a store's persisted offsets with the changelog's end: the memory store has none,
            # only the offsets read at the last assignment, and a broker that reports a partition's end as the
            # start of its last record batch (tansu) made a worker that kept a partition crash at the next one
            recovery_consistency_check=False,
            Table=partition_table_class(self.cursor),
            # see faust_recovery: a restore reads again the changelog records faust fetched and dropped
            TableManager=table_manager(TableManager, rereading_recovery(Recovery)),
            # faust lets environment variables override these (BROKER_URL, common for Celery, pointed a worker
            # at another broker; TABLE_STANDBY_REPLICAS undid the line above): the config file alone decides
            env={},
        )
        self.state = TableState(self.app, partitions)
        self.built = build(dataclasses.replace(cfg, controller=None), state=self.state, with_source=False)
        self.topic = self.app.topic(ingest_topic(cfg), key_serializer="raw", value_serializer="raw",
                                    partitions=partitions)
        self._started = False
        self.sinks_started = False  # for /ready
        # what /metrics shows of a local run too (before, a worker's sink latency and lag panels stayed empty)
        self.lag = Histogram(LAG_BUCKETS)  # now - event time of each slice's newest event, as it is decoded
        self.latency = [Histogram(LATENCY_BUCKETS) for _ in self.built.sinks]  # decoded -> written and flushed
        self.latency_at: list[float | None] = [None] * len(self.built.sinks)  # monotonic time of latency[i].last
        self.writing_since: list[float | None] = [None] * len(self.built.sinks)  # when sink i's write began
        self.videodb_alerts = 0  # events on the alert channel (VideoDB's own alerts, not the rules stage's)
        # ingest partition -> the last offset this worker handled (sinks flushed, state kept). Why: faust resumes
        # a partition it was just given before it seeks it to the committed offset, so the records fetched
        # in between came again after the seek, and were written and counted twice
        self.done: dict[int, int] = {}
        if cfg.runtime.http:  # the operator endpoint runs beside the agent, in faust's loop
            from pipeline.http.attach import serve_worker

            self.app.task(lambda: serve_worker(self))
        self._closed = False
        self._flushed = False
        self.drain = DrainClock(cfg.runtime.drain_timeout)
        self.app.on_before_shutdown.connect(self.flush_windows)  # type: ignore[arg-type]
        self.app.agent(self.topic, name=f"{cfg.name}-process")(self._agent)
        self.app.on_partitions_assigned.connect(self._on_assigned)  # type: ignore[arg-type]

    async def _agent(self, stream: Any) -> None:
        try:
            await self.start_sinks()
        except Exception as exc:  # an unusable dead-letter or sink path: the worker stops with one line
            err = exc if isinstance(exc, PipelineError) else StageError(f"worker: {type(exc).__name__}: {exc}")
            await self._fail(err, [])
        wait = self.cfg.runtime.batch_wait
        # batch_wait 0: every record already waiting, as soon as it is there; else faust's take_events,
        # which yields a batch when it is full or every `batch_wait`, whichever comes first
        batches = stream.take_events(BATCH_MAX, within=wait) if wait else ready_batches(stream, BATCH_MAX)
        try:
            async for events in batches:
                if not await self._handle_or_give_up(events):
                    return  # given up at shutdown: the generator closes without acknowledging the batch
        finally:
            await batches.aclose()

    async def _handle_or_give_up(self, events: list[Any]) -> bool:
        """Handle one batch; False if shutdown gave it up after drain_timeout (it stays unacknowledged)."""
        task = asyncio.ensure_future(self._handle_or_fail(events))
        with self.drain.holding(task):
            try:
                await task
            except asyncio.CancelledError:
                if not self.drain.gave_up:
                    raise
                give_up(self.app.consumer, events)
                return False
        return True

    async def _handle_or_fail(self, events: list[Any]) -> None:
        try:
            await self.handle(events)
        except PipelineError as exc:
            await self._fail(exc, events)
        except Exception as exc:
            await self._fail(StageError(f"worker: {type(exc).__name__}: {exc}"), events)

    async def _on_assigned(self, app: Any, assigned: Any, **_: Any) -> None:
        mine = sorted(tp.partition for tp in assigned if tp.topic == self.topic.get_topic_name())
        log.info("worker %d: assigned ingest partitions %s", os.getpid(), mine)

    async def start_sinks(self) -> None:
        if not self._started:
            self._started = True
            self.built.dead_letter.check()
            for slot in self.built.sinks:
                try:
                    why = await start_within(slot.sink)
                except Exception as exc:  # a file it cannot open: one line naming the sink
                    raise naming(slot.stats.name, exc) from None
                if why is not None:
                    raise StageError(f"{slot.stats.name}: {why} (the sink's `start_timeout` option sets the wait)")
            self.sinks_started = True

    async def handle(self, events: list[Any]) -> None:
        """One faust batch: per ingest partition, decode, run processors, write and flush every sink.

        Records are decoded a few at a time: once a slice holds SLICE_EVENTS events it goes through
        the stages, so a backlog of packed records never becomes millions of decoded events at once.
        """
        by_partition: dict[int, list[Any]] = {}
        done = self.done
        last: dict[int, int] = {}  # partition -> the last offset taken from this batch
        for ev in events:
            msg = ev.message
            # else handled here already (see `done`), or earlier in this very batch: the records fetched while
            # faust seeks a partition at the end of a rebalance are in the buffer with their copies fetched after
            if msg.offset > last.get(msg.partition, done.get(msg.partition, -1)):
                last[msg.partition] = msg.offset
                by_partition.setdefault(msg.partition, []).append(ev)
        for partition, evs in by_partition.items():
            self.cursor.partition = partition
            batch: Batch = []
            for ev in evs:
                self._decode(ev, batch)
                if len(batch) >= SLICE_EVENTS:
                    await self._process(batch)
                    batch = []
            if batch:
                await self._process(batch)
            done[partition] = max(done.get(partition, -1), max(ev.message.offset for ev in evs))

    async def _process(self, batch: Batch) -> None:
        """Processors, then every sink; the state the processors wrote is kept only once all sinks flushed."""
        received = time.monotonic()
        self.lag.observe(max(0.0, time.time() - event_time_ms(batch[-1]) / 1000), len(batch))
        self.videodb_alerts += count_on(batch, ALERT_NAMES)
        try:
            out = self.built.chain(batch)
            await asyncio.gather(*(self._write(i, slot, out, received) for i, slot in enumerate(self.built.sinks)))
        except BaseException:
            self.state.discard()
            raise
        self.state.commit()

    def _decode(self, record: Any, batch: Batch) -> None:
        """One record -> its events, appended to `batch`: one JSON event per line (the ingest packs them),
        or one event (older ingests, other producers); what is refused is dead-lettered."""
        value = record.value
        if isinstance(value, bytes) and b"\n" in value and self._decode_lines(record, value, batch):
            return
        event, reason = _parse(value)
        if event is not None:
            batch.append(event)
        else:
            self._reject(record, value, reason, None)

    def _decode_lines(self, record: Any, value: bytes, batch: Batch) -> bool:
        """The lines of a JSON Lines value; False if it has none, or is one object pretty-printed over lines.

        Blank lines (also `\r\n` ones) are skipped; a bad line is dead-lettered alone, with its
        1-based line number in the record value.
        """
        found = False
        for index, raw in enumerate(value.split(b"\n")):
            if not raw or raw.isspace():  # blank, also the blank line of a `\r\n` ending
                continue
            event, reason = _parse(raw)
            if event is not None:
                batch.append(event)
            elif not found and _one_object(value):  # only a first bad line asks: once per record at most
                return False
            else:
                self._reject(record, raw, reason, index + 1)
            found = True
        return found

    def _reject(self, record: Any, raw: Any, reason: str, line: int | None) -> None:
        """Dead-letter one bad line (or record, `line` None) with its origin."""
        msg = record.message
        origin = {"topic": msg.topic, "partition": msg.partition, "offset": msg.offset}
        if line is not None:
            origin["line"] = line
        self.built.dead_letter.write(reason, stage="worker",
                                     raw=raw[:4096] if isinstance(raw, bytes | str) else repr(raw)[:4096],
                                     origin=origin)

    async def _write(self, i: int, slot: SinkSlot, batch: Batch, received: float) -> None:
        """Sink `i` writes and flushes its share of `batch` (decoded at `received`, monotonic)."""
        routed = slot.route(batch)
        slot.stats.received += len(batch)
        if not routed:
            return
        self.writing_since[i] = time.monotonic()  # a stuck sink says so in /api/status (`writing_for`)
        wrote = False
        try:
            await slot.sink.write(routed)
            wrote = True
            await slot.sink.flush()  # offsets move after this batch: it must be durable first
        except (Exception, SystemExit) as exc:  # a plugin's sys.exit() is a failed write, as in the local runtime
            if wrote and isinstance(exc, SinkFailed):
                slot.stats.sent += len(routed)  # a failed flush took its rows off `sent`, as if counted
            if not isinstance(exc, SinkFailed):  # (one that has dead-lettered and counted what it did not write)
                for event in routed:
                    self.built.dead_letter.write("sink failed before writing", stage=slot.stats.name, event=event)
                slot.stats.errors += len(routed)
            raise sink_failure(slot.stats.name, "write", exc) from (None if isinstance(exc, PipelineError) else exc)
        finally:
            self.writing_since[i] = None
        slot.stats.sent += len(routed)
        now = time.monotonic()
        self.latency[i].observe(now - received, len(routed))
        self.latency_at[i] = now

    async def _fail(self, exc: PipelineError, events: list[Any]) -> None:
        """Stop this worker with a one-line error; its partitions, and this batch unacknowledged, move to the
        other workers. The stop is the one SIGTERM makes: faust's crash path logged tracebacks of its own
        ("Event loop is closed") on the way out."""
        if self.error is None:
            self.error = exc
            log.error("worker %d: %s; stopping", os.getpid(), secrets.mask(str(exc)))
            give_up(self.app.consumer, events)  # the stop must not wait for a batch that will never be acked
            os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.Event().wait()  # never acknowledge the batch: the stop cancels this

    async def flush_windows(self, *_: Any, **__: Any) -> None:
        """Write the windows still open (each sink bounded by its shutdown_timeout) and delete them from the
        tables. Runs once the last batch is done and before faust's final producer flush, which is what
        takes their deletions to the changelog (after it, the next worker restored and emitted them again)."""
        if self._flushed:
            return
        self._flushed = True
        self.drain.cancel()
        # open windows close at shutdown, unless a batch failed or was given up (its state never happened),
        # or the tables were still being restored (half of a partition's changelog: the next owner has it all)
        held = []
        if self.error is None and not self.drain.gave_up:
            if self.state.restored():
                held = self.built.chain.flush()
            else:
                log.info("worker %d: stopped while restoring its tables; the open windows stay for the next worker",
                         os.getpid())
        if held:
            now = time.monotonic()
            await asyncio.gather(*(self._write_held(i, slot, held, now) for i, slot in enumerate(self.built.sinks)))
            self.state.commit()  # the flushed windows are written or dead-lettered: forget them
        self.state.discard()
        await self._changelog_sent(CHANGELOG_DRAIN)

    async def _changelog_sent(self, limit: float) -> None:
        """Wait (bounded) until faust's producer buffer has handed every changelog record to the broker.

        Why: faust's own flush at shutdown gives up once 0.1 s pass without a record sent, and what is
        still in its buffer then is lost: the deletions of the windows just flushed (the next worker
        emitted them again), or the last batch's cooldowns (its alerts fired again)."""
        producer = self.app.producer
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while producer.buffer.size and loop.time() < deadline:
            await asyncio.sleep(0.01)
        try:
            await asyncio.wait_for(producer.flush(), max(deadline - loop.time(), 0.1))
        except Exception as exc:  # the broker is away: the next worker may repeat what this one did
            log.warning("worker %d: state changes not all sent at stop (%s); the next worker may emit "
                        "some windows or alerts again", os.getpid(), type(exc).__name__)

    async def close(self) -> None:
        """Close every sink (after the windows, if that did not run yet); each bounded by its shutdown_timeout."""
        if self._closed:
            return
        self._closed = True
        await self.flush_windows()
        await asyncio.gather(*(self._close_sink(slot) for slot in self.built.sinks))
        self.built.dead_letter.close()
        self.summary()

    async def _write_held(self, i: int, slot: SinkSlot, held: Batch, made: float) -> None:
        limit = close_limit(slot.sink)
        try:
            await asyncio.wait_for(self._write(i, slot, held, made), limit)
        except TimeoutError:
            for event in slot.route(held):
                self.built.dead_letter.write("sink write did not finish within shutdown_timeout at shutdown",
                                             stage=slot.stats.name, event=event)
            log.warning("%s: writing flushed windows did not finish within %gs", slot.stats.name, limit)
        except Exception as exc:  # _write dead-lettered what it could not write
            log.warning("%s: writing flushed windows failed: %s", slot.stats.name, exc)

    async def _close_sink(self, slot: SinkSlot) -> None:
        limit = close_limit(slot.sink)
        try:
            await asyncio.wait_for(slot.sink.close(), limit)
        except TimeoutError:
            log.warning("%s: close() did not finish within %gs", slot.stats.name, limit)
        except Exception as exc:
            log.warning("%s: close failed: %s", slot.stats.name, exc)

    def summary(self) -> None:
        extra = {p.context.stats.name: p.context.stats.report_of(p) for p in self.built.chain.processors}
        for st in self.built.stats:
            log.info("worker %d: %-28s in %d out %d errors %d%s", os.getpid(), st.name, st.received, st.sent,
                     st.errors, "".join(f" {k} {v}" for k, v in extra.get(st.name, {}).items()))
        if self.built.dead_letter.count:
            log.warning("worker %d: dead-lettered %d -> %s", os.getpid(), self.built.dead_letter.count,
                        self.built.dead_letter.path)
        for line in self.built.dead_letter.summary_lines():  # LOST N, NOT DEAD-LETTERED N: as `pipeline run`
            log.warning("worker %d: %s", os.getpid(), line)

    def run(self, loglevel: str, logformat: str = "text") -> int:
        """Run until SIGINT/SIGTERM (exit 0) or a stage error (its exit code); exit 1 after SIGINT/SIGTERM too
        when events were LOST, rejects were not dead-lettered, or the last offsets did not reach the broker."""
        import faust

        from pipeline.logs import formatter

        # SIGHUP (a closed terminal, or a reload meant for `pipeline run`) must not kill a worker mid-batch;
        # installed before the app starts, so there is no moment when it still would
        signal.signal(signal.SIGHUP, _ignore_hup)
        class PipelineWorker(faust.Worker):  # type: ignore[misc]
            def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
                super().on_setup_root_logger(logger, level)
                _our_log_handlers(formatter(logformat))  # mode replaced the root handlers just now, at start

        worker = PipelineWorker(self.app, loglevel=loglevel, quiet=True)
        worker.spinner = None
        _our_log_handlers(formatter(logformat))
        quiet_aiokafka()
        try:
            worker.execute_from_commandline()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        else:
            code = 0
        # stopped: ignored outright from now on, since the interpreter's shutdown puts back the default
        # action (an exit) of every signal Python handles, but not of one it ignores
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        shutil.rmtree(self.datadir, ignore_errors=True)  # tables live in the changelog, nothing to keep
        if self.error is not None:
            raise self.error
        # events LOST, or rejects a full dead-letter file left out: never exit 0, as `pipeline run`
        if (unkept := self.built.dead_letter.unkept()) is not None:
            raise StageError(f"worker: {unkept}")
        if self.commits.failed:
            raise StageError(f"worker: the broker did not take this worker's offsets within {self.commits.timeout:g}s "
                             "at stop; the next worker processes again what it handled since its last commit")
        return code


def _our_log_handlers(fmt: logging.Formatter) -> None:
    """The root handlers faust logs through: our format (`--log-format`, in place of mode's), secrets masked,
    our errors without traceback."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(fmt)
        if _worker_log_filter not in handler.filters:
            handler.addFilter(_worker_log_filter)


def _worker_log_filter(record: logging.LogRecord) -> bool:
    """Mask secrets in the message; drop the traceback faust adds to the error that stops a worker, since
    ours are one line (a full disk, a bad path), and asyncio's for a Kafka request given up at stop."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, PipelineError):
        record.exc_info = None
        record.exc_text = None
    one_line_abandoned_request(record)
    message = record.getMessage()
    masked = secrets.mask(message)
    if masked != message:
        record.msg, record.args = masked, None
    return True


def _ignore_hup(signum: int, frame: Any) -> None:
    log.warning("worker %d: received SIGHUP: a worker does not reload its config; restart it to apply changes. "
                "Ignored", os.getpid())


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="pipeline worker",
               description="run a faust worker: processors and sinks over <name>-ingest")
    p.add_argument("config", help="pipeline YAML with runtime: {engine: faust}")
    p.add_argument("--workers-dir", help="where workers keep local files (default out/<name>/workers)")
    p.add_argument("--http", metavar="ADDR", help="serve /metrics, /healthz, /ready and /tap at HOST:PORT "
                   "(overrides runtime.http)")
    p.add_argument("--session-timeout", default="10s",
                   help="a worker silent this long loses its partitions to the others (1s to 90s, default 10s)")
    p.add_argument("--log-level", default=os.environ.get("PIPELINE_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default=os.environ.get("PIPELINE_LOG_FORMAT", "text"), choices=["text", "json"],
                   help="text (default) or JSON lines, faust's own lines included")
    return p


def worker_main(argv: list[str]) -> int:
    """`pipeline worker CONFIG [--workers-dir DIR]`."""
    from pipeline.config import load_config

    args = _parser().parse_args(argv)
    cfg = load_config(args.config)
    if cfg.runtime.engine != "faust":
        raise ConfigError(f"{args.config}: runtime.engine: `pipeline worker` needs engine: faust, "
                          f"got {cfg.runtime.engine!r}")
    try:
        session_timeout = parse_duration(args.session_timeout)
    except ValueError as exc:
        raise ConfigError(f"--session-timeout: {exc}") from None
    if not SESSION_TIMEOUT[0] <= session_timeout <= SESSION_TIMEOUT[1]:  # 0 hung the join; over 90s: a traceback
        raise ConfigError(f"--session-timeout: expected {SESSION_TIMEOUT[0]:.0f}s to {SESSION_TIMEOUT[1]:.0f}s, "
                          f"got {args.session_timeout!r} (how long a silent worker keeps its partitions)")
    if args.http:  # (checked before the broker is waited for, as `pipeline run` does)
        from pipeline.cli import _with_http

        cfg = _with_http(cfg, args.http)
    create_ingest_topic(cfg)
    workers_dir = Path(args.workers_dir) if args.workers_dir else cfg.out_dir / "workers"
    return Worker(cfg, workers_dir, session_timeout).run(args.log_level, args.log_format)
