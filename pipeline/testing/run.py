"""Run one test case: the config's processors over the case's events, then check the expectations."""

from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.api import Context, Processor, StateStore
from pipeline.build import Chain
from pipeline.config import PipelineConfig, StageSpec, load_config
from pipeline.deadletter import DeadLetter
from pipeline.errors import ConfigError, suggest
from pipeline.events import Event
from pipeline.session import SessionLink
from pipeline.stats import StageStats
from pipeline.testing.diff import alert_line, closest, gone_events, subset
from pipeline.testing.model import AlertExpect, LoadedCase, TestFile
from pipeline.testing.vacuous import check_alerts_can_come, check_zero_counts, keyword_key


@dataclass
class Result:
    file: str
    name: str
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: bool = False  # the test file or its config is invalid (not a failed expectation)

    @property
    def ok(self) -> bool:
        return not self.failures


def load_pipeline(test_file: Path, tf: TestFile) -> PipelineConfig:
    """The config a test file names; unset ${VAR}s are placeholders (tests need no secrets)."""
    import os

    env = {**os.environ, **tf.env}
    return load_config(test_file.parent / tf.config, env=env, missing=[])


def select(cfg: PipelineConfig, names: list[str] | None, where: str) -> list[StageSpec]:
    """The processors a case runs: all enabled ones, or those named by type or `stages[N]`."""
    if names is None:
        return list(cfg.stages)
    out: list[StageSpec] = []
    for name in names:
        found = [s for s in cfg.stages if name in (s.type_name, s.path, s.label)]
        if not found:
            known = ", ".join(s.label for s in cfg.stages)
            raise ConfigError(f"{where}: stages: no enabled processor {name!r} in {cfg.file} (there are: {known})")
        out.extend(s for s in found if s not in out)
    return sorted(out, key=cfg.stages.index)


def chain_for(cfg: PipelineConfig, specs: list[StageSpec], dead: DeadLetter) -> Chain:
    session, state = SessionLink(), StateStore()
    procs: list[Processor] = []
    for spec in specs:
        ctx = Context(pipeline=cfg.name, stage=spec.label, dead_letter=dead, session=session,
                      stats=StageStats(spec.label, spec.kind), state=state, settings=cfg.settings(),
                      log=logging.getLogger(f"pipeline.test.{spec.type_name}"))
        cls: Any = spec.cls
        procs.append(cls(spec.options, ctx))
    return Chain(procs, dead)


def check_labels(cfg: PipelineConfig, specs: list[StageSpec], lc: LoadedCase) -> None:
    """An expected alert label that no rule has is a typo (with `count: 0` it would pass silently)."""
    if any(not s.cls.__module__.startswith("stages.") for s in specs):
        return  # a plugin processor may make alerts of its own
    rules = sorted({r.name for s in specs for r in getattr(s.options, "rules", None) or []})
    for i, want in enumerate(lc.case.expect.alerts or []):
        if want.label is not None and want.label not in rules:
            raise ConfigError(f"{lc.where}: expect.alerts[{i}].label: no rule named {want.label!r} runs in this "
                              f"case{suggest(want.label, rules) or ' (it runs no rules)'}")


def run_case(cfg: PipelineConfig, lc: LoadedCase, dead: DeadLetter) -> list[str]:
    """Failure messages for one case (empty: it passed)."""
    events = copy.deepcopy(lc.events)
    specs = select(cfg, lc.case.stages, lc.where)
    check_labels(cfg, specs, lc)
    check_zero_counts(specs, lc)
    check_alerts_can_come(specs, lc)
    chain = chain_for(cfg, specs, dead)
    rejected, reasons = dead.count, Counter(dead.by_reason)
    out = chain(copy.deepcopy(events))
    out += chain.flush()  # the input ended: processors that hold events (windows) emit them now
    alerts = [e for e in out if e.get("channel") == "alert" and e.get("origin") is not None]
    passed = [e for e in out if not (e.get("channel") == "alert" and e.get("origin") is not None)]
    ex = lc.case.expect
    failures: list[str] = []
    if ex.no_alerts and alerts:
        failures.append(f"expected no alerts, got {len(alerts)}:" + "".join(f"\n    {alert_line(a)}" for a in alerts))
    for want in ex.alerts or []:
        got = [a for a in alerts if _alert_matches(a, want)]
        if (len(got) != want.count) if want.count is not None else not got:
            failures.append(f"expected {_count(want)} alert(s) {_describe(want)}, got {len(got)}; fired:"
                            + ("".join(f"\n    {alert_line(a)}" for a in alerts) or " none"))
    if ex.only_these_alerts:
        extra = [a for a in alerts if not any(_alert_matches(a, w) for w in ex.alerts or [])]
        if extra:
            failures.append("alerts not expected:" + "".join(f"\n    {alert_line(a)}" for a in extra))
    if ex.events_out is not None:
        failures += _events_out(ex.events_out, passed)
    if ex.dropped is not None:
        failures += _dropped(ex.dropped, events, passed)
    if failures and dead.count > rejected:  # why events went missing: a processor raised (or called sys.exit())
        kinds = ", ".join(f"{kind} x{n}" for kind, n in (dead.by_reason - reasons).most_common(5))
        failures.append(f"{dead.count - rejected} event(s) dead-lettered meanwhile: {kinds}")
    return failures


def _count(w: AlertExpect) -> str:
    return "at least 1" if w.count is None else str(w.count)


def _describe(w: AlertExpect) -> str:
    parts = [f"label={w.label!r}" if w.label else "", f"rtstream={w.rtstream!r}" if w.rtstream else "",
             f"matched={w.matched}" if w.matched else "", f"severity={w.severity!r}" if w.severity else ""]
    return "(" + ", ".join(p for p in parts if p) + ")"


def _alert_matches(a: Event, w: AlertExpect) -> bool:
    data = a.get("data") if isinstance(a.get("data"), dict) else {}
    assert isinstance(data, dict)
    if w.label is not None and data.get("event_label") != w.label:
        return False
    if w.rtstream is not None and w.rtstream not in (a.get("rtstream_id"), a.get("rtstream_name")):
        return False
    if w.severity is not None and data.get("severity") != w.severity:
        return False
    if w.matched is not None:
        got = {keyword_key(str(m)) for m in data.get("matched") or []}
        if not {keyword_key(m) for m in w.matched} <= got:
            return False
    return True


def _events_out(wanted: list[dict[str, Any]], passed: list[Event]) -> list[str]:
    """Each wanted pattern matches an output event, in order (other events may come between)."""
    failures = []
    pos = 0
    for i, pattern in enumerate(wanted):
        j = next((k for k in range(pos, len(passed)) if subset(pattern, passed[k])), None)
        if j is None:
            anywhere = any(subset(pattern, e) for e in passed)
            why = "comes out before the previous one" if anywhere else "does not come out"
            failures.append(f"events_out[{i}] {why}:\n" + closest(pattern, passed))
        else:
            pos = j + 1
    return failures


def _dropped(spec: int | list[dict[str, Any]], events: list[Event], passed: list[Event]) -> list[str]:
    gone = gone_events(events, passed)
    if isinstance(spec, int):
        if len(gone) != spec:
            return [f"expected {spec} input event(s) dropped, {len(gone)} were"
                    + "".join(f"\n    dropped: {_short(e)}" for e in gone[:10])]
        return []
    failures = []
    for i, pattern in enumerate(spec):
        if not any(subset(pattern, e) for e in events):
            failures.append(f"dropped[{i}] matches no input event: {_short(pattern)}")
        elif not any(subset(pattern, e) for e in gone):
            failures.append(f"dropped[{i}] was expected to be dropped but came out: {_short(pattern)}")
    return failures


def _short(e: Any) -> str:
    import orjson

    text = orjson.dumps(e, default=str).decode()
    return text if len(text) <= 200 else text[:199] + "…"
