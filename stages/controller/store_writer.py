"""One thread that writes the files of `sessions/` off the event loop, in the order they were asked for.

Why: a session record written on the event loop (a temporary file, a rename: 0.15-0.6 ms each, far more
on a slow disk, six writes per session as it is made, started and bound) held every session's events
and requests meanwhile; 500 sessions created at once stalled the loop for up to 75 ms at a time.

What callers get:
- The caller serializes (a snapshot: the record dict goes on changing); `put` only queues the bytes.
- Per file name only the newest version waits: a newer write (or a removal) replaces the one not yet
  started, so the queue holds at most one serialized copy of each file, however slow the disk.
- One thread takes them oldest first (a file someone awaits with `flushed` first: a create's 201 does not
  wait behind the other sessions' writes), so a removal queued after a write of the same file runs after it
  (a write never brings a removed record back), and `then` actions (e.g. removing a create's intent note) run in that
  thread only once their file's write went through.
- `peek(name)` is the newest version not yet on disk (reads see their own writes); `flushed(name)`
  resolves once the version queued so far is on disk (True) or could not be written (False).
- A failed write is logged and kept; it is tried again, silently, after the next write that works, after
  RETRY_EVERY seconds while nothing else is written (then twice as long after each failed try, up to
  RETRY_MAX: a quiet server kept it in memory only, and a kill -9 lost it though the disk took writes
  again), and once more at `close`.
- `close(timeout)` waits for the queue to drain (a stop); what is left is logged.
- `run(name, job)` queues a job (a name starting with JOB, never a file's) that runs in the thread, in order with
  the writes: what it reads and removes in the directory nothing else changes meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

log = logging.getLogger("pipeline.controller.sessions")

UNKNOWN: Final = object()  # peek(): nothing queued for this name, read the file
RETRY_EVERY: Final = 1.0  # seconds before trying the oldest write the disk refused again, while nothing else runs
RETRY_MAX: Final = 30.0  # the wait doubles after each such try that fails, up to this (a 16 MiB record every second)
JOB: Final = "/"  # how the name of a job (not a file) begins


@dataclass(slots=True)
class _Op:
    data: bytes | None  # None: remove the file
    keep: bool = True  # a failed write is kept to be tried again (not a create's intent note: its 503 said so)
    logged: bool = False  # its failure was logged (a retry that fails too is not)
    job: Callable[[], None] | None = None  # run this instead of writing or removing a file
    then: list[Callable[[], None]] = field(default_factory=list)
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[bool]]] = field(default_factory=list)


class StoreWriter:
    """`write(name, data)` and `remove(name)` run in the writer thread; either raises (logged) on failure."""

    def __init__(self, write: Callable[[str, bytes], None], remove: Callable[[str], None],
                 describe: Callable[[str], str]) -> None:
        self._write, self._remove, self._describe = write, remove, describe
        self._cv = threading.Condition()
        self._pending: OrderedDict[str, _Op] = OrderedDict()  # name -> newest op not started yet, oldest first
        self._busy: tuple[str, _Op] | None = None  # the op being carried out
        self.unsaved: dict[str, _Op] = {}  # writes that failed, tried again after the next one that works
        self._thread: threading.Thread | None = None
        self._closing = False
        self._retry_wait = RETRY_EVERY

    def put(self, name: str, data: bytes | None, *, then: Callable[[], None] | None = None,
            keep: bool = True) -> None:
        """Queue writing `data` to `name` (None: removing it), replacing a version of it not started yet."""
        self._queue(name, _Op(data, keep), then)

    def run(self, name: str, job: Callable[[], None]) -> None:
        """Queue `job` to run in the thread (once: one of that name not started yet is replaced)."""
        assert name.startswith(JOB)
        self._queue(name, _Op(None, keep=False, job=job), None)

    def _queue(self, name: str, op: _Op, then: Callable[[], None] | None) -> None:
        with self._cv:
            for old in (self.unsaved.pop(name, None), self._pending.pop(name, None)):
                if old is not None:  # superseded: its actions and waiters follow the newer version
                    op.then += old.then
                    op.waiters += old.waiters
            if then is not None:
                op.then.append(then)
            self._pending[name] = op
            self._cv.notify_all()
            if self._thread is None or not self._thread.is_alive():
                self._start()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="session-records", daemon=True)
        self._thread.start()

    def peek(self, name: str) -> bytes | object | None:
        """The newest version of `name` not on disk yet (None: being removed), or UNKNOWN (read the file)."""
        with self._cv:
            op = self._pending.get(name) or (self._busy[1] if self._busy and self._busy[0] == name else None) \
                or self.unsaved.get(name)
            return UNKNOWN if op is None else op.data

    def queued(self) -> list[str]:
        """The names with a version not on disk yet."""
        with self._cv:
            return [*self._pending, *([self._busy[0]] if self._busy else []), *self.unsaved]

    def flushed(self, name: str) -> asyncio.Future[bool]:
        """Resolves once the version of `name` queued so far is on disk: True, or False (could not be)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        with self._cv:
            op = self._pending.get(name)
            if op is not None:  # someone waits for it (a create's 201): ahead of the other files' writes
                self._pending.move_to_end(name, last=False)
            elif self._busy and self._busy[0] == name:
                op = self._busy[1]
            if op is None:
                fut.set_result(name not in self.unsaved)
            else:
                op.waiters.append((loop, fut))
        return fut

    def idle(self, timeout: float) -> bool:
        """Block until nothing is queued or being written (True), or `timeout` seconds (False)."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._pending and self._busy is None, timeout)

    async def close(self, timeout: float) -> None:
        """Write what is queued, for `timeout` seconds at most; log what is left (and what the disk refused)."""
        with self._cv:
            self._closing = True
            for name, op in self.unsaved.items():  # the disk may take them now: once more (their waiters are done)
                if name not in self._pending:
                    self._pending[name] = op
            self.unsaved.clear()
            self._cv.notify_all()
            if self._pending and (self._thread is None or not self._thread.is_alive()):
                self._start()
        if not await asyncio.to_thread(self.idle, timeout):
            with self._cv:
                left = list(dict.fromkeys(n for n in [*([self._busy[0]] if self._busy else []), *self._pending]
                                          if not n.startswith(JOB)))  # once each, files only
            if left:
                log.error("sessions: %d file(s) not written in the %gs a stop gives the queued writes: %s",
                          len(left), timeout, ", ".join(self._describe(n) for n in left[:10]))
        with self._cv:
            if self.unsaved:
                log.error("sessions: %d record(s) the disk refused were not written: %s", len(self.unsaved),
                          ", ".join(self._describe(n) for n in list(self.unsaved)[:10]))

    # --- the thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending or self._closing, self._retry_wait if self.unsaved else None)
                if not self._pending and self._closing:
                    self._closing = False  # a put after close() starts another thread
                    return
                retrying = not self._pending
                if retrying:  # quiet for a while: does the disk take the oldest refused write now?
                    taken = self._take_unsaved()
                    if taken is None:
                        continue
                    name, op = taken
                else:
                    name, op = self._busy = self._pending.popitem(last=False)
            if self._carry_out(name, op):
                self._retry_wait = RETRY_EVERY
                self._retry_unsaved()
            elif retrying:
                self._retry_wait = min(RETRY_MAX, self._retry_wait * 2)

    def _carry_out(self, name: str, op: _Op) -> bool:
        try:
            if op.job is not None:
                op.job()
            elif op.data is None:
                self._remove(name)
            else:
                self._write(name, op.data)
            ok = True
        except Exception as exc:
            ok = False
            if not op.logged:
                op.logged = True
                log.error("sessions: cannot %s %s: %s", "run" if op.job else "save" if op.data is not None
                          else "remove", name if op.job else self._describe(name), exc)
        for then in op.then if ok else ():  # before the op is done: what they queue keeps `idle()` waiting
            try:
                then()
            except Exception:
                log.exception("sessions: after writing %s", self._describe(name))
        with self._cv:
            self._busy = None
            waiters, op.waiters = op.waiters, []
            if not ok and op.data is not None and op.keep:
                newer = self._pending.get(name)
                if newer is None:
                    self.unsaved[name] = op  # its actions wait for it to be written
                else:
                    newer.then[:0] = op.then
            self._cv.notify_all()
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_settle, fut, ok)
            except RuntimeError:  # that loop has closed: nobody waits any more
                pass
        return ok

    def _retry_unsaved(self) -> None:
        """The disk took a write again: the records it refused before, each logged once already."""
        while True:
            with self._cv:
                taken = self._take_unsaved()
            if taken is None or not self._carry_out(*taken):
                return

    def _take_unsaved(self) -> tuple[str, _Op] | None:
        """(Lock held.) The oldest write the disk refused, now the one being carried out; None if none."""
        if not self.unsaved:
            return None
        name = next(iter(self.unsaved))
        self._busy = (name, self.unsaved.pop(name))
        return self._busy


def _settle(fut: asyncio.Future[bool], ok: bool) -> None:
    if not fut.done():
        fut.set_result(ok)
