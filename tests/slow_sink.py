"""Test-only stages used by `type: tests.slow_sink:...` in runtime tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from pydantic import Field

from pipeline.api import Batch, Options, Processor, Sink, SinkOptions, Source


class SlowOptions(SinkOptions):
    delay: float = Field(default=0.05)
    path: str


class SlowSink(Sink):
    """Sleeps per batch, then appends the number of events it got to a file (to prove nothing is dropped)."""

    name = "slow"
    Options = SlowOptions

    async def start(self) -> None:
        # tests wait for this file instead of sleeping a fixed time (signal handlers are installed before sinks start)
        with open(self.options.path + ".started", "w"):
            pass

    async def write(self, batch: Batch) -> None:
        await asyncio.sleep(self.options.delay)
        with open(self.options.path, "a") as fh:
            fh.write(f"{len(batch)}\n")


class GatedSink(SlowSink):
    """Like SlowSink, but each write first waits while the file `<path>.hold` exists (a sink that stalls)."""

    name = "gated"

    async def write(self, batch: Batch) -> None:
        import os

        while os.path.exists(self.options.path + ".hold"):
            await asyncio.sleep(0.01)
        await super().write(batch)


class StartOptions(SlowOptions):
    hang_start: bool = False
    fail_start: bool = False
    refuse_start: bool = False  # start() raises the OSError a refused connect gives
    start_timeout: float | None = None


class HangingStartSink(SlowSink):
    """Like SlowSink; with `hang_start`, start() never returns (a broker that never answers the connect), with
    `fail_start` it raises."""

    name = "hanging-start"
    Options = StartOptions

    async def start(self) -> None:
        if self.options.hang_start:
            with open(self.options.path + ".hanging", "w"):  # tests wait for this: the start hangs now
                pass
            await asyncio.Event().wait()
        if self.options.fail_start:
            from pipeline.errors import StageError

            raise StageError("broker refused the connection")
        if self.options.refuse_start:
            raise ConnectionRefusedError(111, "Connect call failed ('10.0.0.1', 9092)")
        await super().start()


class FailingSink(Sink):
    """Fails on its first write, like a disk that filled up."""

    name = "failing"

    async def write(self, batch: Batch) -> None:
        from pipeline.errors import StageError

        raise StageError("/fake/path: cannot write: No space left on device")


class SpoilOptions(Options):
    ids: list[int] = Field(default_factory=list)


class Spoil(Processor):
    """Gives the events with these ids a value JSON cannot hold (an integer dict key), as a plugin might."""

    name = "spoil"
    Options = SpoilOptions

    def process(self, batch: Batch) -> Batch:
        for ev in batch:
            if ev.get("id") in self.options.ids:
                ev["bad"] = {1: "integer key"}
        return batch


class GatedLines(GatedSink):
    """Like GatedSink, but writes each event as a JSON line (tests need the alerts themselves, not counts)."""

    name = "gated_lines"

    async def write(self, batch: Batch) -> None:
        import os

        import orjson

        if os.path.exists(self.options.path + ".hold"):
            with open(self.options.path + ".waiting", "w"):  # tests wait for this: the sink holds a batch
                pass
        while os.path.exists(self.options.path + ".hold"):
            await asyncio.sleep(0.01)
        with open(self.options.path, "ab") as fh:
            fh.write(b"".join(orjson.dumps(e) + b"\n" for e in batch))


class DeadLetterGoneSink(GatedSink):
    """A gated sink that, once started, puts a file where the dead-letter file's directory was (a disk
    unmounted, a directory removed mid-run): every later dead-letter write fails."""

    name = "dead-letter-gone"

    async def start(self) -> None:
        import os
        import shutil

        await super().start()
        directory = os.path.join(os.path.dirname(self.options.path), "dl")
        shutil.rmtree(directory)
        with open(directory, "w") as fh:
            fh.write("not a directory any more")


class StuckSource(Source):
    """Yields one batch, then waits forever and ignores stop(): a source whose call never returns."""

    name = "stuck"
    Options = Options

    async def batches(self) -> AsyncIterator[Batch]:
        yield [{"channel": "transcript", "id": 0, "data": {"text": "only", "start": 1710000000000}}]
        await asyncio.Event().wait()

    async def stop(self) -> None:
        pass


class TickOptions(Options):
    every: float = Field(default=0.05)


class TickSource(Source):
    """One alert every `every` seconds until stopped (a live source that never runs dry)."""

    name = "tick"
    Options = TickOptions

    def __init__(self, options: TickOptions, context: Any) -> None:
        super().__init__(options, context)
        self._stopped = asyncio.Event()

    async def batches(self) -> AsyncIterator[Batch]:
        i = 0
        while not self._stopped.is_set():
            yield [{"channel": "alert", "id": i, "rtstream_id": "rts-1",
                    "data": {"event_label": f"label-{i}", "timestamp": 1710000000000 + i, "text": f"alert {i}"}}]
            i += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), self.options.every)

    async def stop(self) -> None:
        self._stopped.set()


class HangingCloseTicks(TickSource):
    """A TickSource whose close() never returns (a plugin closing a connection to a server that is gone)."""

    name = "hanging-close"

    async def close(self) -> None:
        await asyncio.Event().wait()
