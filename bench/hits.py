"""Benchmark: the whole pipeline when keywords are everywhere, and an alert storm.

Why: the `replay` benchmark's rule set hits rarely, so it hides what a hit
costs. Here 20 rules of 5 keywords watch transcript, visual and audio index;
the keywords are picked from the generated texts so that about half of all
events contain one. Two workloads:

- `hits`: cooldown 30 s per rule and rtstream (about a quarter of events fire);
- `storm`: cooldown 0, every hit fires (more alerts than source events).

Each is timed stage by stage (replay -> jsonl; + filter + enrich; + rules) in a
fresh interpreter, best of several, against the bare loop and the seed-style
loop of the `replay` benchmark from the same run. The rules stage is also timed
alone on parsed events, with the hit-heavy rule set and with a rule set of the
same size whose keywords never occur, to give the cost of a hit.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import orjson

from bench.common import FILTER, Result, python_child, ratio_result, workdir, write_config
from bench.gen import dataset, keywords
from bench.replay import SEED_LOOP_MAX, bare_loop, seed_loop

N_RULES: Final = 20
PER_RULE: Final = 5
TEXT_CHANNELS: Final = ["transcript", "visual_index", "audio_index"]
#: Share of events that should contain at least one keyword.
COVERAGE: Final = 0.5
#: Most share of text events one keyword may cover (a rule author does not watch for "the").
MAX_SHARE: Final = 0.08
#: A cooldown long enough that almost no hit fires: the rules stage's cost of a hit apart from its alert.
QUIET_COOLDOWN: Final = "24h"
_WORD = re.compile(r"[a-z]{4,}")
_STOP: Final = frozenset((
    "about", "again", "another", "before", "down", "done", "from", "have", "into", "just", "last", "more", "next",
    "okay", "sure", "that", "them", "then", "they", "this", "through", "time", "told", "what", "when", "with",
    "would", "should", "showing", "called", "asked", "said",
))


def _texts(src: Path, limit: int) -> list[str]:
    out: list[str] = []
    with open(src, "rb") as fh:
        for line in fh:
            ev = orjson.loads(line)
            if ev.get("channel") in ("transcript", "visual_index", "scene_index", "audio_index"):
                out.append(str(ev["data"].get("text", "")).lower())
            if len(out) >= limit:
                break
    return out


def hot_keywords(src: Path, n: int = N_RULES * PER_RULE, coverage: float = COVERAGE) -> tuple[list[str], float]:
    """`n` keywords such that about `coverage` of text events contain one; (keywords, coverage measured).

    Words a rule author would watch for (not stop words, at most MAX_SHARE of texts each) are taken most frequent
    first until the share is reached; the rest are invented names that never occur, as in real rule sets.
    """
    texts = _texts(src, 20_000)
    sets = [set(_WORD.findall(t)) for t in texts]
    freq = Counter(w for s in sets for w in s)
    chosen: list[str] = []
    covered = [False] * len(sets)
    hit = 0
    for word, count in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(chosen) >= n or hit >= coverage * len(sets):
            break
        if word in _STOP or count > MAX_SHARE * len(sets):
            continue
        chosen.append(word)
        for i, s in enumerate(sets):
            if not covered[i] and word in s:
                covered[i] = True
                hit += 1
    filler = [k for k in keywords(n * 3) if k not in freq and " " not in k]
    chosen += filler[: n - len(chosen)]
    return chosen, hit / max(1, len(sets))


def hit_rules(kws: list[str], cooldown: str) -> list[dict[str, Any]]:
    """20 rules of 5 keywords each (the hot words fill the first rules, as one topic's words share a rule)."""
    return [{"name": f"hot-{i:02d}", "channels": TEXT_CHANNELS, "keywords": kws[i * PER_RULE:(i + 1) * PER_RULE],
             "cooldown": cooldown, "severity": ("info", "warning", "critical")[i % 3]} for i in range(N_RULES)]


def _config(src: Path, out: Path, stages: list[dict[str, Any]], tag: str) -> Path:
    cfg = {"name": f"bench-hits-{tag}", "source": {"type": "replay", "path": str(src)}, "stages": stages,
           "sinks": [{"type": "jsonl", "path": str(out / f"{tag}.jsonl"), "clear": True}],
           "dead_letter": str(out / "dead-letter.jsonl")}
    return write_config(out / f"{tag}.yaml", cfg)


_CHILD = """
import sys
from pathlib import Path
import pipeline.build, pipeline.config, pipeline.runtime.local
from bench.common import timed_run
from stages.processors.rules import Rules
Rules.native = sys.argv[2] == "native"
seconds, built = timed_run(Path(sys.argv[1]))
print(seconds, built.chain.alerts_fired)
"""


def _best(config: Path, repeats: int, native: bool = True,
          before: Callable[[], None] | None = None) -> tuple[float, int]:
    """(best seconds, alerts) of `repeats` fresh runs; `native=False`: the rules stage's Python path;
    `before()` runs before each (the baseline, timed right next to ours)."""
    best, fired = float("inf"), 0
    for _ in range(repeats):
        if before is not None:
            before()
        secs, alerts = python_child(_CHILD, str(config), "native" if native else "python").split()
        if float(secs) < best:
            best, fired = float(secs), int(alerts)
    return best, fired


def rules_alone(src: Path, rules: list[dict[str, Any]], limit: int, repeats: int = 3,
                native: bool = True, saved: bool = False) -> tuple[float, int]:
    """(seconds per event in the rules stage alone, alerts fired), best of `repeats`, on parsed final events
    (`native=False`: the stage's Python path instead of its C engine; `saved`: its state in the saved
    state's change-tracking dicts, as in a live run with a `state_dir`)."""
    from pipeline.api import Context, StateStore
    from pipeline.deadletter import DeadLetter
    from pipeline.session import SessionLink
    from pipeline.state.store import TrackedDict
    from pipeline.stats import StageStats
    from stages.processors.rules import Rules, RulesOptions

    class SavedState(StateStore):
        def get(self, name: str) -> Any:
            return self._maps.setdefault(name, TrackedDict())

    lines = src.read_bytes().splitlines()[:limit]
    opts = RulesOptions.model_validate({"rules": rules})
    best, fired = float("inf"), 0
    for _ in range(repeats):
        parsed = [orjson.loads(x) for x in lines]
        batches = [parsed[i:i + 256] for i in range(0, len(parsed), 256)]
        ctx = Context(pipeline="bench", stage="rules", dead_letter=DeadLetter(str(src.parent / "hits-dead.jsonl")),
                      session=SessionLink(), stats=StageStats("rules", "processor"),
                      state=SavedState() if saved else StateStore())
        was, Rules.native = Rules.native, native
        try:
            stage = Rules(opts, ctx)
        finally:
            Rules.native = was
        t0 = time.perf_counter()
        for b in batches:
            stage.process(b)
        best = min(best, (time.perf_counter() - t0) / len(parsed))
        fired = stage.fired
    return best, fired


def run(n: int, repeats: int = 3) -> list[Result]:
    src = dataset(n)
    out = workdir("hits")
    kws, coverage = hot_keywords(src)
    cold = [k for k in keywords(N_RULES * PER_RULE * 4) if " " not in k][-N_RULES * PER_RULE:]
    bare = 0.0

    def time_bare() -> None:  # before each of our runs, best of all: both sides see the same machine
        nonlocal bare
        t0 = time.perf_counter()
        bare = max(bare, bare_loop(src, out / "bare.jsonl") / (time.perf_counter() - t0))

    limit = min(n, SEED_LOOP_MAX)
    t0 = time.perf_counter()
    seed = seed_loop(src, out / "seed.jsonl", limit) / (time.perf_counter() - t0)
    plain = _best(_config(src, out, [], "plain"), repeats, before=time_bare)[0]
    fe = _best(_config(src, out, [FILTER, {"type": "enrich"}], "filter-enrich"), repeats, before=time_bare)[0]
    measured = []
    for tag, cooldown, bare_target, seed_target in (("hits", "30s", 0.5, 6.0), ("storm", "0s", 0.35, None)):
        rules = hit_rules(kws, cooldown)
        cfg = _config(src, out, [FILTER, {"type": "enrich"}, {"type": "rules", "rules": rules}], tag)
        secs, fired = _best(cfg, repeats, before=time_bare)
        py_secs, _ = _best(cfg, repeats, native=False)
        limit_alone = min(n, 200_000)
        alone = (rules_alone(src, rules, limit_alone), rules_alone(src, hit_rules(cold, cooldown), limit_alone)[0],
                 rules_alone(src, rules, limit_alone, native=False)[0],
                 rules_alone(src, hit_rules(cold, cooldown), limit_alone, native=False)[0],
                 rules_alone(src, rules, limit_alone, saved=True)[0],
                 rules_alone(src, hit_rules(kws, QUIET_COOLDOWN), limit_alone))
        measured.append((tag, cooldown, bare_target, seed_target, secs, fired, py_secs, alone))
    results: list[Result] = []
    us = 1e6 / n
    for tag, cooldown, bare_target, seed_target, secs, fired, py_secs, alone in measured:
        rate = n / secs
        r = ratio_result(f"{tag} {n:,} events vs bare loop", rate, bare, bare_target, "bare loop")
        r.notes.append(f"{fired:,} alerts from {n:,} events ({coverage:.0%} of text events hold a keyword), "
                       f"cooldown {cooldown}; best of {repeats} (bare loop: best of all, each timed just before ours)")
        r.notes.append(f"per event: replay->jsonl {plain * us:.2f} us, filter+enrich +{(fe - plain) * us:.2f} us, "
                       f"rules (+ alert lines) +{(secs - fe) * us:.2f} us; total {secs * us:.2f} us")
        r.notes.append(f"same run, rules on their Python path: total {py_secs * us:.2f} us "
                       f"({n / py_secs / bare:.2f}x bare)")
        results.append(r)
        if seed_target is not None:
            results.append(ratio_result(f"{tag} vs seed-style loop", rate, seed, seed_target, "seed-style loop"))
        (hot, hot_fired), cold_s, py_hot, py_cold, saved_hot, (quiet, quiet_fired) = alone
        c = Result(f"{tag}: rules stage per event, hits vs no hits", hot * 1e6, "us", cold_s * 1e6, "no hits",
                   "≤ 1.5", hot / cold_s <= 1.5)
        c.notes.append(f"rules stage alone on {min(n, 200_000):,} parsed events: {hot_fired:,} alerts with hits")
        c.notes.append(f"Python path, same run: {py_hot * 1e6:.2f} us with hits, {py_cold * 1e6:.2f} us without "
                       f"({py_hot / py_cold:.2f}x)")
        c.notes.append(f"with a saved state (a live run's change-tracking dicts): {saved_hot * 1e6:.2f} us with hits")
        c.notes.append(f"the same hits with a {QUIET_COOLDOWN} cooldown ({quiet_fired:,} alerts: what a hit costs "
                       f"without its alert): {quiet * 1e6:.2f} us ({quiet / cold_s:.2f}x no hits)")
        if hot_fired > quiet_fired:  # what the rest of the difference costs, per alert
            per_alert = (hot - quiet) * min(n, 200_000) / (hot_fired - quiet_fired)
            c.notes.append(f"so each alert adds {per_alert * 1e6:.2f} us (two dicts, its matched list, its "
                           f"cooldown write); a hit that does not fire adds {(quiet - cold_s) * 1e6:.2f} us per event")
        results.append(c)
    return results
