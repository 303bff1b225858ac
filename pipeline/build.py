"""Turn a validated config into live stage objects; shared by both runtimes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pipeline.api import BufferOptions, Context, Controller, Processor, Sink, Source, StateStore
from pipeline.config import PipelineConfig, StageSpec
from pipeline.contracts import events_of, ours
from pipeline.deadletter import DeadLetter
from pipeline.errors import PipelineError, StageError
from pipeline.events import ALIASES, LIFECYCLE, Batch, channel_set
from pipeline.logs import stage_log
from pipeline.session import SessionLink
from pipeline.stats import StageStats

log = logging.getLogger("pipeline")


@dataclass
class SinkSlot:
    """A sink with what the runtime applies for it: routing (`channels:`), its `buffer:`, its counters."""

    sink: Sink
    channels: frozenset[str] | None
    stats: StageStats
    buffer: BufferOptions = field(default_factory=BufferOptions)
    type_name: str = "sink"

    def report(self) -> dict[str, int]:
        """The sink's own counters (`written`, `delivered`, ...) for the whole run, across reloads."""
        return self.stats.report_of(self.sink)

    def route(self, batch: Batch) -> Batch:
        chans = self.channels
        if chans is None:
            return batch
        lifecycle = LIFECYCLE in chans
        aliases = ALIASES
        out: Batch = []
        for e in batch:  # in_channels(), inlined: this runs for every event of every routed sink
            ch = e.get("channel")
            if ch is None:
                if (lifecycle and "event" in e) or (type(ev := e.get("event")) is str and ev in chans):
                    out.append(e)
            elif isinstance(ch, str) and aliases.get(ch, ch) in chans:
                out.append(e)
        return out


class Chain:
    """Runs processors in order over a batch; a processor that raises loses only the bad events."""

    def __init__(self, processors: list[Processor], dead_letter: DeadLetter) -> None:
        self._fired_gone = 0  # alerts fired by rules stages a reload removed
        self.processors = processors
        self.dead_letter = dead_letter
        self.tap: Any = None  # a TapHub while a tap client is attached: sees each processor's output

    @property
    def processors(self) -> list[Processor]:
        return self._processors

    @processors.setter
    def processors(self, processors: list[Processor]) -> None:  # a reload swaps them
        before = self.alerts_fired if hasattr(self, "_processors") else 0
        self._processors = processors
        self._fired_gone += max(0, before - self.alerts_fired)  # the run's count never goes back
        self._plugins = frozenset(id(p) for p in processors if not ours(p))

    def __call__(self, batch: Batch, start: int = 0) -> Batch:
        tap = self.tap
        plugins = self._plugins
        for n, p in enumerate(self.processors[start:] if start else self.processors, start + 1):
            st = p.context.stats
            st.received += len(batch)
            try:
                out = p.process(batch)
                batch = self._checked(p, out) if plugins and id(p) in plugins else out
            except (Exception, SystemExit) as exc:  # a plugin's sys.exit() ended the run with 0, batches unwritten
                log.warning("%s: raised %s: %s on a batch; retrying event by event", p.context.stage,
                            type(exc).__name__, exc)
                batch = self._one_by_one(p, batch)
            st.sent += len(batch)
            if tap is not None:
                tap.publish(n, batch)
            if not batch:
                break
        return batch

    def flush(self) -> Batch:
        """End of the run: what each processor still holds (`flush()`), run through the processors after it."""
        out: Batch = []
        for i, p in enumerate(self.processors):
            try:
                held = p.flush()
                if id(p) in self._plugins and held is not None:
                    held = self._checked(p, held, "flush()")
            except (Exception, SystemExit) as exc:
                log.warning("%s: flush raised %s: %s", p.context.stage, type(exc).__name__, exc)
                p.context.stats.errors += 1
                continue
            if held:
                p.context.stats.sent += len(held)
                out.extend(self(held, i + 1))
        return out

    def _one_by_one(self, p: Processor, batch: Batch) -> Batch:
        out: Batch = []
        check = id(p) in self._plugins
        for event in batch:
            try:
                res = p.process([event])
                out.extend(self._checked(p, res) if check else res)
            except (Exception, SystemExit) as exc:
                p.context.stats.errors += 1
                self.dead_letter.write(f"{type(exc).__name__}: {exc}", stage=p.context.stage, event=event)
        return out

    def _checked(self, p: Processor, out: Any, what: str = "process()") -> Batch:
        """A plugin's output as later stages and sinks need it (see pipeline.contracts); not a list: TypeError,
        as if it had raised, so the batch is retried event by event."""
        return events_of(out, what, p.context.stage, self.dead_letter, p.context.stats)

    @property
    def alerts_fired(self) -> int:
        return self._fired_gone + sum(int(getattr(p, "fired", 0)) for p in self.processors)


@dataclass
class Built:
    config: PipelineConfig
    dead_letter: DeadLetter
    session: SessionLink
    source: Source
    chain: Chain
    sinks: list[SinkSlot]
    controller: Controller | None = None
    stats: list[StageStats] = field(default_factory=list)
    state: StateStore = field(default_factory=StateStore)


def make_stage(spec: StageSpec, cfg: PipelineConfig, stats: StageStats, *, dead_letter: DeadLetter,
               session: SessionLink, state: StateStore, settings: dict[str, Any] | None = None) -> object:
    """One stage from its spec, with its own Context: at start and when a reload re-creates it, the same way.
    A constructor that raises or calls sys.exit() is one StageError line (`cannot start: ...`), never a
    traceback, nor a run ended at once with exit code 0 and not a word."""
    ctx = Context(pipeline=cfg.name, stage=spec.label, dead_letter=dead_letter, session=session, stats=stats,
                  state=state, out_dir=cfg.out_dir, state_dir=cfg.state_dir,
                  settings=cfg.settings() if settings is None else settings,
                  log=stage_log(spec.kind, spec.type_name, spec.label))
    cls: Any = spec.cls
    try:
        return cls(spec.options, ctx)
    except PipelineError:
        raise
    except SystemExit as exc:
        raise StageError(f"{spec.label}: cannot start: called sys.exit({exc.code!r})") from None
    except Exception as exc:  # a plugin's own failure: one line; PIPELINE_DEBUG=1 shows the traceback
        why = (str(exc).splitlines() or [""])[0][:300]
        raise StageError(f"{spec.label}: cannot start: {type(exc).__name__}: {why}") from exc


def build(cfg: PipelineConfig, state: StateStore | None = None, *, with_source: bool = True) -> Built:
    """Instantiate every stage with its own Context (sharing dead letter, session and state)."""
    dead = DeadLetter(cfg.dead_letter, cfg.dead_letter_max_bytes)
    session = SessionLink()
    state = state or StateStore()
    settings = cfg.settings()
    all_stats: list[StageStats] = []

    def make(spec: StageSpec) -> object:
        st = StageStats(spec.label, spec.kind)
        all_stats.append(st)
        return make_stage(spec, cfg, st, dead_letter=dead, session=session, state=state, settings=settings)

    source = make(cfg.source) if with_source else None
    controller = make(cfg.controller) if cfg.controller is not None else None
    processors = [make(s) for s in cfg.stages]
    slots = []
    for spec in cfg.sinks:
        sink = make(spec)
        assert isinstance(sink, Sink)
        chans = getattr(spec.options, "channels", None)
        buffer = getattr(spec.options, "buffer", None) or BufferOptions()
        slots.append(SinkSlot(sink, channel_set(chans) if chans else None, sink.context.stats, buffer, spec.type_name))
    return Built(cfg, dead, session, source, Chain(processors, dead), slots,  # type: ignore[arg-type]
                 controller, all_stats, state)  # type: ignore[arg-type]
