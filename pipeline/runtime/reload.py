"""Reload a running local pipeline's config (SIGHUP, `--watch`) without touching the source.

The file is read and validated again. Invalid: the running config stays, one log
line says why. Valid: the processors are swapped at once (they run synchronously,
so the swap always falls between two batches); each sink whose options changed is
replaced in its own queue order: the old one gets every batch queued before the
reload, is flushed and closed, then the new one starts. Rule state (cooldowns,
windows) is kept for rules whose name and matching are unchanged. Changes to the
name, source, controller, `videodb`, `runtime`, `dead_letter`, `dead_letter_max_bytes`, the number of sinks
or a sink's `buffer` need a restart: they are logged and not applied. A re-created sink that does not start
within its `start_timeout` (ingest waits meanwhile) gets its previous options back, and the reload counts as
rejected.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.api import Processor, Sink, StateStore
from pipeline.build import SinkSlot, make_stage
from pipeline.config import PipelineConfig, StageSpec, load_config
from pipeline.configfile import MAX_BYTES, is_regular, kind_of
from pipeline.errors import ConfigError, StageError
from pipeline.events import channel_set
from pipeline.runtime import reload_windows
from pipeline.runtime.sink_start import close_limit, start_within
from pipeline.stats import StageStats

if TYPE_CHECKING:
    from pipeline.runtime.local import LocalRuntime

log = logging.getLogger("pipeline.reload")

RULE_STATE = ("rules.last_fired", "rules.windows")  # the rules stage's state mappings, keyed "rule|rtstream"
WATCH_INTERVAL = 1.0
#: a changed file is read again after this long, until two reads agree: a file written in several steps
#: (`cat part1 part2 > p.yaml`, an editor that truncates first) is reloaded once, whole, not half-written
WATCH_SETTLE = 0.3


def _same(a: StageSpec | None, b: StageSpec | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.cls is b.cls and a.options == b.options


def _rule_keys(cfg: PipelineConfig) -> dict[str, Any]:
    """Rule name -> what decides its matching (state is kept only while this is unchanged). Rule names are unique
    in a pipeline and every rules stage shares the state maps, so a rule keeps its state wherever its stage moves."""
    out: dict[str, Any] = {}
    for spec in cfg.stages:
        for rule in getattr(spec.options, "rules", None) or []:
            name = getattr(rule, "name", None)
            if isinstance(name, str):
                out[name] = rule.model_dump(include={"keywords", "match", "channels", "rtstream_names", "window",
                                                     "min_count"})
    return out


def needs_restart(old: PipelineConfig, new: PipelineConfig) -> list[str]:
    """The parts of a new config that a reload cannot apply."""
    out = []
    if old.name != new.name:  # metrics labels, default paths and stage contexts keep the running name
        out.append("name")
    if not _same(old.source, new.source):
        out.append("source")
    if not _same(old.controller, new.controller):
        out.append("controller")
    if old.videodb != new.videodb:
        out.append("videodb")
    if old.runtime != new.runtime:
        out.append("runtime")
    if old.dead_letter != new.dead_letter:
        out.append("dead_letter")
    if old.dead_letter_max_bytes != new.dead_letter_max_bytes:
        out.append("dead_letter_max_bytes")
    if getattr(old, "state_dir", None) != getattr(new, "state_dir", None):
        out.append("state_dir")
    if len(old.sinks) != len(new.sinks):
        out.append(f"the number of sinks ({len(old.sinks)} -> {len(new.sinks)})")
    return out


@dataclass
class SinkSwap:
    """One sink to replace: the new object, its routing, and the old spec's object to fall back on."""

    index: int
    new: Sink
    channels: frozenset[str] | None
    fallback: Sink


class Reloader:
    """Watches for reload requests (SIGHUP, a changed file) and applies them to a LocalRuntime."""

    def __init__(self, rt: LocalRuntime, path: str | Path, current: PipelineConfig, *, watch: bool = False) -> None:
        self.rt = rt
        self.path = Path(path)
        self.current = current
        self.watch = watch
        self.applied = 0
        self.rejected = 0
        self._wake = asyncio.Event()
        self._why = ""
        # what was read, not the file now: a save while the run started (its stages being built) is reloaded
        self._digest = current.digest if current.digest is not None else self._file_digest()

    def request(self, why: str) -> None:
        """Ask for a reload (safe from a signal handler)."""
        self._why = why
        self._wake.set()

    def _file_digest(self) -> bytes | None:
        if not is_regular(self.path):  # a named pipe's open waits for a writer: the whole loop would wait
            return None
        try:
            with open(self.path, "rb") as fh:  # bounded: a config past the limit is refused when read anyway
                return hashlib.sha256(fh.read(MAX_BYTES + 1)).digest()
        except OSError:
            return None

    async def run(self) -> None:
        """Serve reload requests until cancelled; with `watch`, poll the file for changes too."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), WATCH_INTERVAL if self.watch else None)
            except TimeoutError:
                digest = self._file_digest()
                if digest is None or digest == self._digest:
                    continue
                while True:  # until the writer is done
                    await asyncio.sleep(WATCH_SETTLE)
                    settled, digest = digest, self._file_digest()
                    if digest == settled:
                        break
                if digest is None or digest == self._digest:  # changed back, or gone
                    continue
                self._why = f"{self.path} changed"
            self._wake.clear()
            self._digest = self._file_digest()
            if self._too_late(self._why):
                return
            await self.reload(self._why)

    def _too_late(self, why: str) -> bool:
        """The run is stopping, or its final flush began (the windows are closed, nothing more goes through the
        stages): a reload would only swap a finished chain, and what it closed would have no batch left to go
        out with. One log line."""
        if not (self.rt.finishing or self.rt._stopping):
            return False
        log.warning("reload (%s) ignored: the run is finishing; the next run reads the file", why)
        return True

    async def reload(self, why: str) -> bool:
        """Validate and apply the file; True when the new config is running."""
        if self._too_late(why):
            return False
        # The file is read and validated in a thread (a config of thousands of keywords or regexes takes a
        # second: the event loop, its HTTP server and connections, was held meanwhile); ingest waits between two
        # batches, as it did, so no batch runs between reading the file and applying it
        self.rt.gate.clear()
        try:
            return await self._reload(why)
        finally:
            self.rt.gate.set()

    async def _reload(self, why: str) -> bool:
        try:
            if self.path.exists() and not is_regular(self.path):  # (gone: load_config says so)
                raise ConfigError(f"{self.path}: is {kind_of(self.path) or 'a pipe'}, not a regular file: a reload "
                                  "reads the config again, which only a regular file allows (restart to change it)")
            new = _with_command_line(self.current, await asyncio.to_thread(load_config, self.path))
        except ConfigError as exc:
            self.rejected += 1
            log.error("reload (%s) rejected, the running config stays: %s", why, " | ".join(str(exc).splitlines()))
            return False
        except Exception as exc:  # a bug while reading it (a plugin's): never a reason to stop the running pipeline
            self.rejected += 1
            log.error("reload (%s) rejected, the running config stays: %s: %s", why, type(exc).__name__, exc)
            return False
        skipped = needs_restart(self.current, new)
        new = _keep_buffers(self.current, new, skipped)
        try:
            swaps, processors = self._prepare(new)
        except Exception as exc:  # a stage constructor refused its options: nothing was touched yet
            self.rejected += 1
            log.error("reload (%s) rejected, the running config stays: %s", why, exc)
            return False
        self._carry_rule_state(new)
        windows = reload_windows.plan(list(zip(self.current.stages, self.rt.b.chain.processors, strict=False)),
                                      list(zip(new.stages, processors, strict=True)))
        kept, refused = await self._swap(swaps, processors, windows)
        if kept:  # sinks that did not drain in time run on with their old options
            new = dataclasses.replace(new, sinks=[self.current.sinks[i] if i in kept else s
                                                  for i, s in enumerate(new.sinks)])
        self.current = _running_config(self.current, new, skipped)
        changed = [f"sinks[{sw.index}]" for sw in swaps if sw.index not in kept]
        if refused:  # counted as rejected: what runs is not what the file says
            self.rejected += 1
            log.error("reload (%s) rejected for %s: the new options did not start, the previous ones run on; "
                      "the rest is applied: %d processor(s)%s", why,
                      ", ".join(f"{name} ({reason})" for name, reason in refused.items()), len(processors),
                      f", sinks re-created: {', '.join(changed)}" if changed else "")
            return False
        self.applied += 1
        log.info("reload (%s) applied: %d processor(s)%s%s", why, len(processors),
                 f"; sinks re-created: {', '.join(changed)}" if changed else "",
                 f"; needs a restart, not applied: {', '.join(skipped)}" if skipped else "")
        return True

    async def _swap(self, swaps: list[SinkSwap], processors: list[Processor],
                    windows: reload_windows.WindowPlan | None = None) -> tuple[set[int], dict[str, str]]:
        """Pause ingest between two batches, let each changed sink drain, replace it, swap processors, resume.

        Returns the indices of sinks kept with their old options (they did not drain within drain_timeout, or
        their new options did not start), and for those that did not start, sink name -> why.
        """
        rt = self.rt
        kept: set[int] = set()
        refused: dict[str, str] = {}
        rt.gate.clear()
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + rt.b.config.runtime.drain_timeout
            while rt.fanning_out and loop.time() < deadline:  # a batch half handed out goes to the old sinks
                await asyncio.sleep(0.005)
            for sw in swaps:
                slot = rt.b.sinks[sw.index]
                while rt.buffers[sw.index].pending_events or rt._writing[sw.index] is not None:
                    if loop.time() > deadline:
                        break
                    await asyncio.sleep(0.01)
                else:
                    replaced = await _replace(slot, sw, deadline, rt._stop_requested)
                    if replaced is None:
                        continue
                    if replaced:
                        refused[slot.stats.name] = replaced
                        kept.add(sw.index)
                        continue
                log.warning("reload: %s did not drain within drain_timeout; it keeps its old options",
                            slot.stats.name)
                kept.add(sw.index)
            if windows:  # at the swap itself: no batch runs between closing the old windows and the new chain
                rt.carry.extend(reload_windows.apply(windows, rt.b.state, rt.b.chain))
                rt.b.state.hold(rt.carry, rt.next_batch)  # saved with the closed windows' removal
                if rt.b.state.dirty:
                    rt.b.state.flush()
            for old in rt.b.chain.processors:
                if not any(old is p for p in processors):  # re-created or removed: its counts are the run's
                    old.context.stats.retire(old.context.stats.counts_of(old))
            rt.b.chain.processors = processors
            order = {"source": 0, "controller": 1, "processor": 2, "sink": 3}
            rt.b.stats[:] = sorted([s for s in rt.b.stats if s.kind != "processor"]
                                   + [p.context.stats for p in processors], key=lambda s: order.get(s.kind, 4))
        finally:
            rt.gate.set()
        return kept, refused

    def _prepare(self, new: PipelineConfig) -> tuple[list[SinkSwap], list[Processor]]:
        """Processors (unchanged ones kept as they are) and sink swaps; nothing running is touched yet."""
        b = self.rt.b
        state: StateStore = b.state
        stats = {s.name: s for s in b.stats}
        running: dict[str, tuple[StageSpec, Processor]] = {
            p.context.stage: (spec, p) for spec, p in zip(self.current.stages, b.chain.processors, strict=False)}
        processors: list[Processor] = []
        moved: list[tuple[StageSpec, Processor]] = []  # new stages with no predecessor at their place
        for spec in new.stages:
            old_spec, old = running.get(spec.label) or (None, None)
            if old is not None and _same(old_spec, spec):
                processors.append(old)
                continue
            p = self._make(spec, state, stats.get(spec.label) or StageStats(spec.label, spec.kind))
            assert isinstance(p, Processor)
            if old is not None and type(old) is type(p) and hasattr(p, "continue_counts"):
                p.continue_counts(old)  # rules: alerts fired (in all and per rule) and the last ones, of the run
            elif old is not None and hasattr(old, "fired") and hasattr(p, "fired"):
                p.fired = old.fired  # the summary's "alerts fired" counts the whole run
            else:
                moved.append((spec, p))
            processors.append(p)
        labels = {spec.label for spec in new.stages}
        orphans = [(spec, p) for label, (spec, p) in running.items()  # removed, or moved to another place
                   if label not in labels and not any(p is q for q in processors)]
        for spec, p in moved:
            _continue_moved(spec, p, orphans)
        swaps: list[SinkSwap] = []
        if len(new.sinks) == len(self.current.sinks):
            for i, (was, spec) in enumerate(zip(self.current.sinks, new.sinks, strict=True)):
                if _same(was, spec):
                    continue
                slot = b.sinks[i]
                sink = self._make(spec, state, slot.stats)
                fallback = self._make(was, state, slot.stats)
                assert isinstance(sink, Sink) and isinstance(fallback, Sink)
                chans = getattr(spec.options, "channels", None)
                swaps.append(SinkSwap(i, sink, channel_set(chans) if chans else None, fallback))
        return swaps, processors

    def _make(self, spec: StageSpec, state: StateStore, stats: StageStats) -> Any:
        b = self.rt.b
        return make_stage(spec, b.config, stats, dead_letter=b.dead_letter, session=b.session, state=state)

    def _carry_rule_state(self, new: PipelineConfig) -> None:
        """Forget cooldowns and windows of rules that were removed or whose matching changed."""
        old_rules, new_rules = _rule_keys(self.current), _rule_keys(new)
        stale = {name for name, key in old_rules.items() if new_rules.get(name) != key}
        if not stale:
            return
        state: StateStore = self.rt.b.state
        for mapping in RULE_STATE:
            m = state.get(mapping)
            for key in [k for k in m if str(k).partition("|")[0] in stale]:
                del m[key]
        if state.dirty:  # saved now: a run restarted after a crash before the next batch must not read them back
            state.flush()


def _continue_moved(spec: StageSpec, p: Processor, orphans: list[tuple[StageSpec, Processor]]) -> None:
    """`p` has no predecessor at its place (`stages[1]`): if it is a stage that moved there (a processor added or
    removed in front of it), it goes on counting where that stage was. Before, a filter added in front of a
    rules stage emptied the status page's last alerts and restarted its in/out counts and its alerts per rule.
    The same stage: same type, and the same options or (rules) a rule of the same name (names are unique)."""
    names = _names(spec)
    for i, (was, old) in enumerate(orphans):
        if type(old) is not type(p) or not (was.options == spec.options or names & _names(was)):
            continue
        del orphans[i]
        if hasattr(p, "continue_counts"):
            p.continue_counts(old)
        elif hasattr(old, "fired") and hasattr(p, "fired"):
            p.fired = old.fired
        now, then = p.context.stats, old.context.stats
        now.received, now.sent, now.dropped, now.errors = then.received, then.sent, then.dropped, then.errors
        # what earlier instances reported; the old instance's own `report()` counts are not added: a moved window
        # stage takes them over itself (see reload_windows), and adding them too counted its windows twice
        now.before.update(then.before)
        return


def _names(spec: StageSpec) -> set[str]:
    return {r.name for r in getattr(spec.options, "rules", None) or [] if isinstance(getattr(r, "name", None), str)}


async def _replace(slot: SinkSlot, sw: SinkSwap, deadline: float, stop: asyncio.Event) -> str | None:
    """Flush and close the old sink, then start the new one (or, if it cannot start, the old spec again).

    The flush waits until `deadline` (drain_timeout from the reload) at most, the close its shutdown_timeout,
    each start its start timeout: a webhook that never answers, or a broker that never answers a new sink's
    connect, held the reload, and with it ingest and any stop, for as long as it hung. The new sink's start also
    gives way to `stop` (SIGTERM): a stop waited for its whole start_timeout, past its own bound; the previous
    options, which ran until now, start again and take the rest.
    None when the new sink runs; "" when the old sink did not flush in time (it stays, untouched); otherwise
    why the new sink did not start (the old spec runs again).
    """
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(slot.sink.flush(), max(deadline - loop.time(), 0.0))
    except TimeoutError:
        return ""
    except Exception as exc:  # closing it dead-letters what it cannot write
        log.warning("reload: %s: flushing the old sink: %s", slot.stats.name, exc)
    limit = close_limit(slot.sink)
    try:
        await asyncio.wait_for(slot.sink.close(), limit)
    except TimeoutError:
        log.warning("reload: %s: the old sink's close() did not finish within %gs", slot.stats.name, limit)
    except Exception as exc:  # the old sink dead-letters what it cannot write; the swap still happens
        log.warning("reload: %s: closing the old sink: %s", slot.stats.name, exc)
    slot.stats.retire(slot.stats.counts_of(slot.sink))  # what it delivered, printed... still counts for the run
    _continue(sw.new, slot.sink)
    why = await _start(sw.new, stop)
    if why is None:
        slot.sink = sw.new
        slot.channels = sw.channels
        return None
    _continue(sw.fallback, slot.sink)
    again = await _start(sw.fallback)
    if again is not None:  # the old sink is closed: nothing can write this sink's batches any more
        raise StageError(f"{slot.stats.name}: after a reload the new options did not start ({why}), "
                         f"nor did the previous ones ({again})")
    slot.sink = sw.fallback
    return why


def _continue(sink: Sink, previous: Sink) -> None:
    """Tell a sink about the one it replaces (`continue_from`, e.g. jsonl: files this run already wrote are not
    emptied again by `clear`)."""
    hook = getattr(sink, "continue_from", None)
    if callable(hook):
        hook(previous)


async def _start(sink: Sink, stop: asyncio.Event | None = None) -> str | None:
    """Start `sink` within its start timeout (or until `stop`); None when it runs, else why not (a raised error's
    text)."""
    try:
        return await start_within(sink, stop)
    except Exception as exc:
        return str(exc) or type(exc).__name__


def _keep_buffers(old: PipelineConfig, new: PipelineConfig, skipped: list[str]) -> PipelineConfig:
    """A sink's `buffer:` is the runtime's (memory queue or disk spool, fed by a task): a reload keeps it.

    The new spec gets the running buffer back, so the rest of the sink's change still applies and the
    running config says which buffer is really in use; the change is reported as needing a restart.
    """
    if len(old.sinks) != len(new.sinks):
        return new
    sinks = list(new.sinks)
    for i, (was, spec) in enumerate(zip(old.sinks, new.sinks, strict=True)):
        running, wanted = getattr(was.options, "buffer", None), getattr(spec.options, "buffer", None)
        if running is not None and wanted is not None and running != wanted:
            sinks[i] = dataclasses.replace(spec, options=spec.options.model_copy(update={"buffer": running}))
            skipped.append(f"sinks[{i}].buffer")
    return dataclasses.replace(new, sinks=sinks) if sinks != list(new.sinks) else new


def _with_command_line(running: PipelineConfig, new: PipelineConfig) -> PipelineConfig:
    """The file read again, with what the command line set for this run (`--http`, `--new-session`): a reload
    compares it with the running config, which has them."""
    runtime = new.runtime
    if running.http_override is not None:
        runtime = runtime.model_copy(update={"http": running.http_override})
    return dataclasses.replace(new, runtime=runtime, http_override=running.http_override,
                               new_session=running.new_session)


def _running_config(old: PipelineConfig, new: PipelineConfig, skipped: list[str]) -> PipelineConfig:
    """The config now running: the new one, except the parts that need a restart."""
    keep: dict[str, Any] = {}
    for part in ("name", "source", "controller", "videodb", "runtime", "dead_letter", "dead_letter_max_bytes"):
        if part in skipped:
            keep[part] = getattr(old, part)
    if "state_dir" in skipped and hasattr(old, "state_dir_setting"):
        keep["state_dir_setting"] = old.state_dir_setting
    if any(s.startswith("the number of sinks") for s in skipped):
        keep["sinks"] = old.sinks
    return dataclasses.replace(new, **keep)
