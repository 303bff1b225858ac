"""Benchmark 2: the rules stage with 10, 100, 1,000 and 10,000 keywords (20 word/substring rules).

Why: all keywords of a channel share one automaton, so the cost per event must
not grow with the rule set. Measured on the rules stage alone, on events parsed
beforehand, so nothing else dilutes the comparison.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from bench.common import Result, rules_spec
from bench.gen import dataset
from pipeline.api import Context, StateStore
from pipeline.deadletter import DeadLetter
from pipeline.session import SessionLink
from pipeline.stats import StageStats
from stages.processors.rules import Rules, RulesOptions

SIZES = (10, 100, 1_000, 10_000)


def rate(events: list[bytes], n_keywords: int, dead: str, repeats: int = 3) -> tuple[float, int, float]:
    """(events/s through the rules stage, alerts fired, seconds to build the matchers); best of `repeats`."""
    opts = RulesOptions.model_validate({"rules": rules_spec(n_keywords, regex=False)})
    best, fired, build = 0.0, 0, 0.0
    for _ in range(repeats):
        parsed: list[dict[str, Any]] = [orjson.loads(x) for x in events]
        batches = [parsed[i:i + 1024] for i in range(0, len(parsed), 1024)]
        ctx = Context(pipeline="bench", stage="rules", dead_letter=DeadLetter(dead), session=SessionLink(),
                      stats=StageStats("rules", "processor"), state=StateStore())
        t0 = time.perf_counter()
        rules = Rules(opts, ctx)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        for b in batches:
            rules.process(b)
        best = max(best, len(parsed) / (time.perf_counter() - t0))
        fired = rules.fired
    return best, fired, build


def run(n: int) -> list[Result]:
    lines = dataset(n).read_bytes().splitlines()[: min(n, 200_000)]
    dead = str(dataset(n).parent / "rules-scaling-dead.jsonl")
    rates = {k: rate(lines, k, dead) for k in SIZES}
    base = rates[SIZES[0]][0]
    out = []
    for k in SIZES:
        r, fired, build = rates[k]
        res = Result(f"rules stage, {k:,} keywords", r, baseline=base, baseline_name=f"{SIZES[0]} keywords")
        if k == SIZES[-1]:
            res.target, res.ok = "≥ 0.5", r / base >= 0.5
        res.notes.append(f"{fired:,} alerts; matchers built in {build * 1000:.0f} ms; {len(lines):,} events")
        out.append(res)
    return out
