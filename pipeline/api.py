"""The stage API: what every built-in stage and every plugin is written against.

A stage is a class with a `name`, an `Options` class (typed, unknown keys are
errors) and a constructor `(options, context)`. Four kinds:

- `Source`: yields batches of events (`batches()`), stops when asked (`stop()`).
- `Processor`: `process(batch) -> batch`, synchronous, the hot path. Returning
  fewer events filters; returning more (e.g. alerts) adds. Optional `flush()`
  returns what it still holds (open windows) once, when the run ends.
- `Sink`: `start()`, `write(batch)` returns once the batch is durable or
  accepted, `close()` flushes everything.
- `Controller`: drives the capture session beside the stream; sees every batch.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field

from pipeline.deadletter import DeadLetter
from pipeline.events import Batch, Event
from pipeline.session import SessionLink
from pipeline.stats import StageStats
from pipeline.types import ByteSize, Duration

__all__ = ["Batch", "BufferOptions", "Context", "Controller", "Event", "Options", "Processor", "Sink", "SinkOptions",
           "Source", "Stage"]

Log: TypeAlias = "logging.Logger | logging.LoggerAdapter[logging.Logger]"  # what `Context.log` may be


class Options(BaseModel):
    """Base of every stage's options: typed, unknown keys rejected, immutable, numbers finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True, allow_inf_nan=False)


class BufferOptions(Options):
    """Where batches wait while a sink is behind: memory (bounded) or an on-disk spool."""

    type: Literal["memory", "disk"] = Field(default="memory", description="memory or disk (spool under state_dir)")
    max_bytes: ByteSize | None = Field(default=None, ge=1, description="bound on waiting batches; "
                                       "default 64MiB in memory, 1GiB on disk")
    when_full: Literal["block", "dead_letter"] = Field(
        default="block", description="full buffer: block (slow the source) or dead_letter the new batch")

    @property
    def limit(self) -> int:
        return self.max_bytes or (1 << 30 if self.type == "disk" else 64 << 20)


class SinkOptions(Options):
    """Options every sink has. `channels` routes: only those channels reach the sink; `buffer` holds its backlog."""

    channels: list[str] | None = None
    buffer: BufferOptions = Field(default_factory=BufferOptions)
    start_timeout: Duration | None = Field(default=None, gt=0, le=3600, description=(
        "longest start() may take (connecting to a broker, ...): a run fails with one line after it, a reload "
        "keeps the sink's previous options; unset = 30s"))


class StateStore:
    """Named mutable mappings for state that must survive restarts (cooldowns, windows).

    This base keeps plain dicts in memory (tests, `build()` without a store). The
    local runtime uses `pipeline.state.store.SqliteStateStore` (dicts saved to
    `state_dir` after each batch that changed them); the faust runtime, tables.
    Persisted values must be JSON-serialisable and changed by assignment.
    """

    def __init__(self) -> None:
        self._maps: dict[str, MutableMapping[str, Any]] = {}

    def get(self, name: str) -> MutableMapping[str, Any]:
        return self._maps.setdefault(name, {})

    def unclaimed(self) -> list[str]:
        """Names of saved maps no stage has asked for (`get`) yet: state of stages the config no longer has."""
        return []

    @property
    def dirty(self) -> bool:
        """True when `flush()` has something to save."""
        return False

    def flush(self) -> None:
        """Save what changed since the last flush (the runtime calls this after a batch)."""

    def close(self) -> None:
        """Flush and release the backing store."""

    # Outputs a stage made from state it removed (a window's `metrics`): the local runtime keeps them in the
    # store, saved with that removal, until every sink has them, so a `kill -9` between the save and the sinks'
    # writes cannot lose them (see `pipeline.state.outbox`). Here, and on faust (whose state is saved only
    # after the sinks wrote), nothing is kept.

    def note(self, events: Batch) -> None:
        """`events` (just made by a stage) must reach the sinks even if the process dies before they do."""

    def hold(self, out: Batch, batch: int) -> None:
        """Keep the noted events of `out`, handed out as source batch `batch`, until `delivered()`."""

    def delivered(self, upto: int) -> bool:
        """Every sink has written batches <= `upto`: forget what was held for them; True when something was."""
        return False

    def lowest_held(self) -> int | None:
        """The lowest batch something is held for, None when nothing is."""
        return None

    def holds(self, batch: int) -> bool:
        """Whether something is held for source batch `batch`."""
        return False

    def undelivered(self, batch: int) -> Batch:
        """What an earlier run held and never saw delivered, held now for batch `batch` (the caller hands it out
        with that batch)."""
        return []


@dataclass
class Context:
    """What a stage may use from the engine."""

    pipeline: str
    stage: str
    dead_letter: DeadLetter
    session: SessionLink
    stats: StageStats
    state: StateStore = field(default_factory=StateStore)
    out_dir: Path = field(default_factory=lambda: Path("out"))
    state_dir: Path = field(default_factory=lambda: Path("out"))  # the pipeline's state_dir (see pipeline.state)
    settings: dict[str, Any] = field(default_factory=dict)
    log: Log = field(default_factory=lambda: logging.getLogger("pipeline"))  # a stage's: `stage` on every record


class Stage:
    """Common base: a registered name, an options class, a context."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = Options

    def __init__(self, options: Any, context: Context) -> None:
        self.options = options
        self.context = context


class Processor(Stage):
    """Transforms batches in place of the stream; synchronous so it runs anywhere (asyncio, faust)."""

    kind = "processor"

    def process(self, batch: Batch) -> Batch:
        raise NotImplementedError

    def flush(self) -> Batch:
        """Called once when the run ends (source exhausted, exit_on, signal): events still held back.

        They go through the processors after this one, then to the sinks. Default: nothing.
        """
        return []

    def report(self) -> dict[str, int]:
        """Extra counters for the exit summary (e.g. late events)."""
        return {}


class Sink(Stage):
    """Writes batches somewhere. `write` returns only when the batch is safe."""

    kind = "sink"
    Options: ClassVar[type[Options]] = SinkOptions
    #: True when a `write()` cancelled at shutdown (after drain_timeout) leaves every event it had
    #: accepted to be delivered or dead-lettered by `close()`; otherwise the runtime dead-letters the batch.
    cancel_safe: ClassVar[bool] = False

    async def start(self) -> None:
        """Open files/connections. Raise StageError for a user-fixable problem."""

    async def write(self, batch: Batch) -> None:
        raise NotImplementedError

    async def flush(self) -> None:
        """Make everything accepted so far durable (called before a source commits offsets)."""

    async def close(self) -> None:
        """Flush and release everything; called once, also after errors."""

    def report(self) -> dict[str, int]:
        """Extra counters for the exit summary (e.g. delivered, dead-lettered)."""
        return {}

    def holding_since(self) -> float | None:
        """`time.monotonic()` when the oldest event the sink holds that a `kill -9` would lose (rows of a file
        not yet complete) was handed to it; None when it holds none. A restart's backfill starts before it, and
        kept outputs (a rule's alerts, a window's `metrics`) wait until their batch was written before it (a
        sink that answers this is not flushed for them: see `pipeline.runtime.held`)."""
        return None


class Source(Stage):
    """Produces batches of stamped events until exhausted or stopped."""

    kind = "source"
    #: False for sources that start from the beginning on every run (replay): no saved state is restored.
    resumes: ClassVar[bool] = True

    def batches(self) -> AsyncIterator[Batch]:
        raise NotImplementedError

    async def stop(self) -> None:
        """Ask `batches()` to finish soon, yielding what it already received."""

    async def close(self) -> None:
        """Release connections; called once at the end of every run, also after errors."""


class Controller(Stage):
    """Runs beside the stream (e.g. drives a VideoDB capture session)."""

    kind = "controller"

    async def start(self) -> None:
        """Begin work; may wait for `context.session.wait_connection()`."""

    def observe(self, batch: Batch) -> None:
        """See each batch before processors (cheap, synchronous)."""

    async def close(self) -> None:
        """Release resources."""
