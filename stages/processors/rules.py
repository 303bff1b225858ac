"""Processor `rules`: keyword triggers that turn matching events into alerts.

All keywords of all rules on a channel go into one matcher per match mode, so
the cost per event does not grow with the number of rules. Cooldowns and
windows run on event time (never the wall clock): a replay at any speed fires
the same alerts. State lives in `context.state` (saved in `state_dir` by the
local runtime, a table in the faust runtime) and is evicted by event time:
an entry older than the longest cooldown/window plus `state_ttl` can no
longer change an outcome, and `max_state_keys` bounds what a flood of
distinct rtstream ids can pin in memory.
"""

from __future__ import annotations

import weakref
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.api import Batch, Context, Event, Options, Processor
from pipeline.events import ALIASES, canonical, event_time_ms
from pipeline.types import Duration
from stages.globs import glob_matcher
from stages.processors.eviction import SWEEP_EVERY_MS, Eviction
from stages.processors.matchers import (
    FINAL_SIGMA,
    Hits,
    RegexMatcher,
    Scanner,
    SubstringMatcher,
    WordMatcher,
    compile_rule_regex,
    fold,
    nfc,
)
from stages.processors.native import plain_reads, written_keys

try:  # the hot loop in C (built with the package); without it the Python path below does the same work
    from stages.processors import _fastrules
except ImportError:  # pragma: no cover - a build without a C compiler
    _fastrules = None  # type: ignore[assignment]

TEXT_CHANNELS = ["transcript", "visual_index", "audio_index"]
_ABSENT: Any = object()  # "no such key", where a saved value may be None
_IDS = ("rtstream_id", "rtstream_name", "capture_session_id")  # copied from the source event, in this order
_STAMPS = ("ts", "unix_ts")  # after data, as in every alert
_C_MAX_MS = 1 << 62  # the C engine holds a cooldown in a 64-bit int; a longer one (millions of years) stays in Python


class Rule(Options):
    name: str = Field(description="becomes the alert's data.event_label")
    keywords: list[str] = Field(min_length=1, description="case-insensitive keywords (or regexes)")
    match: Literal["word", "substring", "regex"] = Field(default="word", description="word = whole words")
    channels: list[str] = Field(default_factory=lambda: list(TEXT_CHANNELS), min_length=1)
    rtstream_names: list[str] | None = Field(default=None, description="globs such as 'display:*'")
    cooldown: Duration = Field(default=0.0, description="quiet time per rule and rtstream after an alert")
    window: Duration | None = Field(default=None, description="with min_count: count matches in this window")
    min_count: int = Field(default=1, ge=1, le=1000, description="matches needed within window to fire (1 to "
                           "1000: each match is checked against the times kept, so time and state grow with it)")
    severity: str = "info"

    @field_validator("name")
    @classmethod
    def _state_key_name(cls, v: str) -> str:
        if not v or "|" in v:
            raise ValueError(f"a rule name is not empty and has no '|' (it separates rule and rtstream in the saved "
                             f"cooldowns), got {v!r}")
        return v

    @field_validator("window")
    @classmethod
    def _window_ms(cls, v: float | None) -> float | None:
        if v is not None and v < 0.001:  # event times are ms: a shorter window would be no window (min_count ignored)
            raise ValueError(f"a window is at least 1ms (event times are milliseconds), got {v:g}s")
        return v

    @field_validator("keywords")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if any(not k.strip() for k in v):
            raise ValueError("keywords must not be empty strings")
        return v

    @model_validator(mode="after")
    def _keywords_compile(self) -> Rule:
        matchers: dict[str, type[WordMatcher | SubstringMatcher | RegexMatcher]] = {
            "word": WordMatcher, "substring": SubstringMatcher, "regex": RegexMatcher}
        probe = matchers[self.match]()
        bad: list[str] = []
        for k in self.keywords:  # every bad keyword of the rule at once, not only the first
            try:
                probe.add(0, k)
            except ValueError as exc:
                bad.append(str(exc))
        if bad:
            raise ValueError("; ".join(bad))
        if self.match == "regex" and len(self.keywords) > 1:
            # as the stage runs them: together (the alternation may be too large), in NFC
            compile_rule_regex([nfc(k) for k in self.keywords])
        if self.min_count > 1 and self.window is None:
            raise ValueError("min_count needs a window (e.g. window: 5m)")
        return self


class RulesOptions(Options):
    rules: list[Rule] = Field(min_length=1)
    state_ttl: Duration = Field(default=600.0, description="keep cooldown/window state this long (event time) "
                                                           "after it stopped mattering")
    max_state_keys: int = Field(default=100_000, ge=100, description="at most this many cooldown (and window) "
                                                                     "keys; the oldest go first")


@dataclass(slots=True)
class _Compiled:
    """A rule as the hot path reads it: plain attributes, the state-key prefix built once."""

    rule: Rule
    names: Any  # glob matcher or None
    cooldown_ms: int
    window_ms: int
    prefix: str = ""  # "<rule name>|": a state key is prefix + stream
    label: str = ""
    severity: str = ""
    min_count: int = 1


def _compile(rule: Rule) -> _Compiled:
    return _Compiled(rule, glob_matcher(rule.rtstream_names), int(rule.cooldown * 1000),
                     int((rule.window or 0) * 1000), f"{rule.name}|", rule.name, rule.severity, rule.min_count)


class _ChannelMatcher:
    """The matchers for one channel, used together: one automaton scan, then the regex rules."""

    __slots__ = ("has_regex", "literal_gate", "regex", "scan", "substring", "word")

    def __init__(self, shared: dict[tuple[str, ...], Any]) -> None:
        self.word = WordMatcher()
        self.substring = SubstringMatcher()
        self.regex = RegexMatcher(shared)
        self.scan: Scanner | None = None
        self.has_regex = False
        self.literal_gate = False  # True: the regex rules run only when the scan saw one of their literals

    def freeze(self) -> None:
        self.regex.freeze()
        self.has_regex = bool(self.regex)
        literals = self.regex.literals() if self.has_regex else None
        self.literal_gate = literals is not None
        self.scan = Scanner(self.word, self.substring, literals or ())


class Rules(Processor):
    """Emits an alert (channel alert, data.event_label = rule name) after each event that fires a rule."""

    name = "rules"
    Options = RulesOptions

    def __init__(self, options: RulesOptions, context: Context) -> None:
        super().__init__(options, context)
        self._rules = [_compile(r) for r in options.rules]
        self._by_channel = _matchers(options.rules)
        self._last_fired = context.state.get("rules.last_fired")  # "rule|rtstream" -> event ms
        self._windows = context.state.get("rules.windows")  # "rule|rtstream" -> [event ms, ...]
        self.fired = 0
        self._counts = [0] * len(self._rules)  # alerts per rule
        self._fired_before: Counter[tuple[str, str]] = Counter()  # (rule, severity) -> alerts, before a reload
        self.recent: deque[Event] = deque(maxlen=20)  # the last alerts, for the status page
        horizon = max((max(c.cooldown_ms, c.window_ms) for c in self._rules), default=0) + int(options.state_ttl * 1000)
        # an entry lives a horizon at least: sweeping more often than a quarter of it walks keys that cannot go yet
        # (a 24 h cooldown walked every key once per minute of event time)
        self._evict = Eviction(horizon, options.max_state_keys, max(SWEEP_EVERY_MS, horizon // 4))
        # every rules stage of a pipeline keeps its state in the same maps: each sweeps only its own keys (and
        # those of rules no stage has any more), so a stage's shorter horizon cannot drop another's cooldowns
        self._names = frozenset(c.label for c in self._rules)
        self._owners = _owners(context.state)
        for name in self._names:  # a set: a stage built for a reload that is then rejected leaves the old one's
            self._owners.setdefault(name, weakref.WeakSet()).add(self)
        self._engine = self._native() if self.native else None
        # channel name (aliases included) -> (scan, regex or None, regex gated by literals): what _process() calls;
        # not built when the C engine runs (the automata of 90,000 keywords took 0.9 s at each reload)
        self._scanners: dict[str, tuple[Any, Any, bool]] = {}
        if self._engine is None:
            for shared in {id(m): m for m in self._by_channel.values()}.values():
                shared.freeze()
            for name in (*self._by_channel, *ALIASES):
                cm = self._by_channel.get(canonical(name))
                if cm is not None:
                    self._scanners[name] = (cm.scan.match, cm.regex.match if cm.has_regex else None,  # type: ignore[union-attr]
                                            cm.literal_gate)
        self._written = written_keys(self._last_fired)

    #: Use the C engine when the rules allow it (tests switch it off to compare both paths).
    native = True

    def _native(self) -> Any:
        """The C engine for these rules, or None: it covers whole-word rules without a window (the common
        shape); substring and regex rules, windows and state that is not a dict keep the Python path."""
        if _fastrules is None or not plain_reads(self._last_fired):
            return None
        if any(c.window_ms or c.rule.match != "word" or c.cooldown_ms >= _C_MAX_MS for c in self._rules):
            return None
        tables: list[tuple[Any, str]] = []
        index: dict[str, int] = {}
        words: dict[int, Any] = {}  # one table of words per matcher, whatever the channels sharing it
        for ch, cm in self._by_channel.items():
            index[ch] = len(tables)
            if id(cm) not in words:
                words[id(cm)] = cm.word.words()
            tables.append((words[id(cm)], ch))
        channel_map = {name: index[canonical(name)] for name in (*self._by_channel, *ALIASES)
                       if canonical(name) in index}
        rules = [(c.prefix, c.label, c.severity, c.cooldown_ms, c.names) for c in self._rules]
        return _fastrules.Engine(tables, channel_map, rules, fold, nfc, event_time_ms, _stream_of, _cooled, _source_of)

    @property
    def fired_by(self) -> Counter[tuple[str, str]]:
        """(rule, severity) -> alerts fired, for /metrics."""
        out: Counter[tuple[str, str]] = Counter(self._fired_before)
        for c, n in zip(self._rules, self._counts, strict=True):
            if n:
                out[c.label, c.severity] += n
        return out

    def continue_counts(self, old: Rules) -> None:
        """A reload re-created this stage: its alert counts (in all, per rule) and last alerts go on from `old`'s."""
        self.fired = old.fired
        self._fired_before = old.fired_by
        self.recent.extend(old.recent)

    def process(self, batch: Batch) -> Batch:
        ev = self._evict
        journal: list[tuple[Any, ...]] = []  # the Python path's state writes, (map, key, old) or (map, key)
        saved = (self.fired, list(self._counts), list(self.recent), ev.watermark)
        try:
            engine = self._engine
            if engine is None:
                out = self._process(batch, journal)
            else:
                res, alerts, ev.watermark = engine.process(batch, self._last_fired, self._written, ev.watermark,
                                                           ev.ceiling, self._counts)  # takes back its own writes
                if alerts:
                    self.recent.extend(alerts[-20:])
                    self.fired += len(alerts)
                    self.context.state.note(alerts)  # saved with the cooldowns they set: see `_process`
                out = batch if res is None else res
        except Exception:
            self._undo(journal, saved)
            raise
        self._sweep()
        return out

    def _undo(self, journal: list[tuple[Any, ...]], saved: tuple[int, list[int], list[Event], Any]) -> None:
        """Take back a failed batch's state writes and counts. The chain then retries its events one by one,
        and they must find the state as it was: else an event before the bad one finds its rule cooling down
        (its alert is lost) or its match already counted in a window (counted twice)."""
        for entry in reversed(journal):
            if len(entry) == 3:
                entry[0][entry[1]] = entry[2]
            else:
                entry[0].pop(entry[1], None)
        self.fired, self._counts[:], recent, self._evict.watermark = saved
        self.recent.clear()
        self.recent.extend(recent)

    def _sweep(self) -> None:
        ev = self._evict
        if ev.due(self._last_fired, self._windows):
            ev.sweep(self._last_fired, _last_time, self._mine)
            ev.sweep(self._windows, _newest_time, self._mine)

    def _mine(self, key: Any) -> bool:
        """Is this state key ("<rule>|<stream>") this stage's to forget? Its rule's, or no running stage's."""
        name = str(key).partition("|")[0]
        if name in self._names:
            return True
        return not self._owners.get(name)

    def _process(self, batch: Batch, journal: list[tuple[Any, ...]]) -> Batch:
        """The Python path (and the reference the C engine is held to)."""
        fired: list[tuple[int, list[Event]]] | None = None  # (after event i, its alerts); allocated on the first
        scanners = self._scanners
        isascii = str.isascii  # str's own (as the C engine reads a text); a local: str.isascii cost ~15 ns more
        for i, event in enumerate(batch):
            ch = event.get("channel")
            if not isinstance(ch, str):
                continue
            m = scanners.get(ch)
            if m is None:
                continue
            data = event.get("data")
            text = data.get("text") if isinstance(data, dict) else None
            if not isinstance(text, str) or not text:
                continue
            hits: Hits = {}
            ascii_text = isascii(text)
            if ascii_text:  # NFC already; a str's lower() is then ASCII of its length (no "İ", no sigma)
                norm = text
                lowered = text.lower()
                if type(text) is not str and (len(lowered) != len(text) or FINAL_SIGMA in lowered):
                    lowered = fold(text)  # a str subclass's own lower() may give anything
            else:  # matched in NFC, as the keywords are ("e" + U+0301 is "é")
                norm = nfc(text)
                lowered = norm.lower()
                # "İ" lowers to two characters (keep word boundaries aligned), a sigma may lower to a final one
                if len(lowered) != len(norm) or FINAL_SIGMA in lowered:
                    lowered = fold(norm)
            seen = m[0](lowered, hits)
            if m[1] is not None and (seen or not m[2] or not ascii_text):
                m[1](norm, hits, lowered)
            if hits:
                start = data.get("start")  # type: ignore[union-attr]
                when = start if type(start) is int else event_time_ms(event)  # the common case, inline
                alerts = self._fire(event, text, hits, when, journal)
                if alerts:
                    if fired is None:
                        fired = []
                    fired.append((i, alerts))
        if fired is None:
            return batch
        out: Batch = []  # each alert right after its source event, the rest copied by slices (no per-event work)
        prev = 0
        # the alerts are kept in state.db with the cooldowns they set until every sink has them: a kill -9
        # before then lost them for good (the cooldown saved, the restart never fired them again)
        note = self.context.state.note
        for i, alerts in fired:
            note(alerts)
            out += batch[prev:i + 1]
            out += alerts
            prev = i + 1
        out += batch[prev:]
        return out

    def _fire(self, event: Event, text: str, hits: Hits, when: int, journal: list[tuple[Any, ...]]) -> list[Event]:
        """The alerts this event fires. Why so flat: with keywords everywhere this runs for every other
        event, so cooldowns are checked before anything is built and an alert is a copy of a header."""
        rid = event.get("rtstream_id")
        if type(rid) is not str or not rid:
            rid = _stream_of(event)
        ev = self._evict
        if ev.watermark < when:  # Eviction.seen, inlined: no further than the wall clock
            ev.watermark = when if when <= ev.ceiling else max(ev.watermark, ev.ceiling)
        rules, last_fired = self._rules, self._last_fired
        firing: list[int] = []
        for idx in hits if len(hits) == 1 else sorted(hits):
            c = rules[idx]
            if c.names is not None and not c.names(str(event.get("rtstream_name") or "")):
                continue
            key = c.prefix + rid
            if c.window_ms:
                windows = self._windows
                prev = windows.get(key, _ABSENT)
                journal.append((windows, key) if prev is _ABSENT else (windows, key, prev))
                times = [t for t in (() if prev is _ABSENT else prev) if t > when - c.window_ms]
                times.append(when)
                if len(times) < c.min_count:
                    windows[key] = times[-c.min_count:]
                    continue
                windows[key] = []
            cooldown = c.cooldown_ms
            if cooldown:
                last = last_fired.get(key)
                if last is not None and last <= when < last + cooldown:
                    continue
                journal.append((last_fired, key, last) if last is not None or key in last_fired else (last_fired, key))
                last_fired[key] = when
            firing.append(idx)
        if not firing:
            return []
        head: Event = {"channel": "alert", "origin": "rules"}
        for k in _IDS:
            if k in event:
                head[k] = event[k]
        stamps = {k: event[k] for k in _STAMPS if k in event}
        source = _source_of(event.get("channel"))
        alerts: list[Event] = []
        counts = self._counts
        for idx in firing:
            c = rules[idx]
            alert = head.copy()
            alert["data"] = {"event_label": c.label, "timestamp": when, "text": text, "severity": c.severity,
                             "matched": hits[idx], "source_channel": source}
            if stamps:
                alert.update(stamps)
            alerts.append(alert)
            counts[idx] += 1
        self.recent.extend(alerts)
        self.fired += len(alerts)
        return alerts


def _matchers(rules: list[Rule]) -> dict[str, _ChannelMatcher]:
    """Canonical channel -> the matchers of the rules on it (not frozen). Channels that the same rules watch
    share one: each rule watches three channels by default, and its keywords were added, folded and built into
    an automaton three times (90,000 keywords: 2.4 s at each reload, the event loop held meanwhile)."""
    on: dict[str, list[int]] = {}
    for i, r in enumerate(rules):
        for ch in {canonical(c) for c in r.channels}:
            on.setdefault(ch, []).append(i)
    built: dict[tuple[int, ...], _ChannelMatcher] = {}
    shared: dict[tuple[str, ...], Any] = {}  # a regex rule on channels of different rule sets is compiled once
    out: dict[str, _ChannelMatcher] = {}
    for ch, indices in on.items():
        m = built.get(tuple(indices))
        if m is None:
            m = built[tuple(indices)] = _ChannelMatcher(shared)
            for i in indices:
                r = rules[i]
                for k in r.keywords:
                    if r.match == "regex":
                        m.regex.add(i, k, checked=True)  # the Rule compiled each keyword when it was validated
                    else:
                        getattr(m, r.match).add(i, k)
        out[ch] = m
    return out


def _owners(state: Any) -> dict[str, weakref.WeakSet[Rules]]:
    """Rule name -> the rules stages (weakly) that own its state keys, kept beside the shared maps."""
    owners = getattr(state, "_rule_owners", None)
    if owners is None:
        owners = {}
        try:
            state._rule_owners = owners
        except AttributeError:  # a plugin's store with __slots__: each stage then sweeps as if it were alone
            pass
    return owners  # type: ignore[no-any-return]


def _stream_of(event: Event) -> str:
    """The cooldown key's stream for an event without a usable rtstream_id (both paths check that first):
    its name, within its session (names repeat across sessions)."""
    rid = event.get("rtstream_id")
    return f"{event.get('capture_session_id') or ''}/{rid or event.get('rtstream_name') or ''}"


def _source_of(channel: Any) -> str:
    """An alert's data.source_channel: its event's channel (read when the alert is made), canonical."""
    return canonical(str(channel))


def _cooled(last: Any, when: Any, cooldown: int) -> bool:
    """Is the rule still quiet? (The C engine asks this for times that are not plain 64-bit ints.)"""
    return bool(last <= when < last + cooldown)


def _last_time(value: Any) -> int:
    return value if type(value) is int else 0


def _newest_time(value: Any) -> int:
    """A window entry's newest match (0 for an emptied window: nothing left to remember)."""
    return max(value) if isinstance(value, list) and value and all(type(t) is int for t in value) else 0
