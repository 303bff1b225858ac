"""What a reload does with `window` stages: a moved one keeps its open windows, a removed or changed one closes them.

A window stage keeps its open windows in the stage state named after its label (`window:stages[1]:window`). A
reload that moves the stage (a processor added in front of it) would otherwise start it empty at its new label
and leave the old windows in state.db, never emitted; one that removes it or changes its options would drop them.
So, at the moment the processors are swapped (between two batches):

- each new window stage with the options of a running one that is not kept in place takes over that one's
  state (first match in order), with its counters;
- every other running window stage that is not kept is flushed like at the end of a run: its open windows
  close and their `metrics` (partial, with their nominal `end`) go through the processors after it, then out
  with the next batch; its state is deleted;
- a new window stage that takes over nothing starts with empty state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pipeline.api import Batch, Processor, StateStore
from pipeline.config import StageSpec

log = logging.getLogger("pipeline.reload")


def _is_window(p: Any) -> bool:
    return callable(getattr(type(p), "state_name", None)) and getattr(type(p), "name", None) == "window"


@dataclass
class WindowPlan:
    """Window state moves and flushes decided by `plan`, applied by `apply` at the swap."""

    moves: list[tuple[Processor, Processor]] = field(default_factory=list)  # (running, new)
    retired: list[Processor] = field(default_factory=list)  # running window stages that are not kept
    fresh: list[Processor] = field(default_factory=list)  # new window stages that take over nothing

    def __bool__(self) -> bool:
        return bool(self.moves or self.retired or self.fresh)


def plan(old: list[tuple[StageSpec, Processor]], new: list[tuple[StageSpec, Processor]]) -> WindowPlan:
    """Pair the running window stages that the new config does not keep with its newly made ones."""
    kept = {id(p) for _, p in new}
    leaving = [(s, p) for s, p in old if _is_window(p) and id(p) not in kept]
    running = {id(p) for _, p in old}
    out = WindowPlan()
    for spec, p in new:
        if not _is_window(p) or id(p) in running:
            continue
        match = next((i for i, (s, _) in enumerate(leaving) if s.cls is spec.cls and s.options == spec.options), None)
        if match is None:
            out.fresh.append(p)
        else:
            out.moves.append((leaving.pop(match)[1], p))
    out.retired = [p for _, p in leaving]
    return out


def apply(wp: WindowPlan, state: StateStore, chain: Any) -> Batch:
    """Move, flush and clear window state; returns the metrics of closed windows, run through the processors
    after their stage in `chain` (still the running chain: call before swapping the processors)."""
    snapshots = [(new, dict(state.get(_name(old)))) for old, new in wp.moves]
    held: Batch = []
    for p in wp.retired:
        try:
            closed = p.flush()
        except Exception as exc:  # a window that cannot close its windows: they are lost, said once
            log.warning("reload: %s: closing its windows raised %s: %s", p.context.stage, type(exc).__name__, exc)
            closed = []
        if closed:
            p.context.stats.sent += len(closed)
            at = next((i for i, q in enumerate(chain.processors) if q is p), len(chain.processors))
            held.extend(chain(closed, at + 1))
        log.info("reload: %s removed or changed: %d open window(s) closed", p.context.stage, len(closed))
    for p in [*wp.retired, *(old for old, _ in wp.moves), *(new for _, new in wp.moves), *wp.fresh]:
        _clear(state.get(_name(p)))
    for new, snapshot in snapshots:
        state.get(_name(new)).update(snapshot)
    for old, new in wp.moves:
        for counter in ("late", "emitted", "evicted"):
            setattr(new, counter, getattr(old, counter, 0))
    return held


def _name(p: Processor) -> str:
    return str(type(p).state_name(p.context.stage))  # type: ignore[attr-defined]


def _clear(m: Any) -> None:
    for key in list(m):
        del m[key]  # one by one: a persistent store records each deletion
