"""Benchmark 1: replay throughput, filter -> enrich -> rules (20 rules, 100 keywords) -> jsonl.

Baselines from the same run and the same file: a bare loop (orjson read, stamp,
dump, buffered write) and a loop written the way the seed's listener writes
(json, stamp, open-append-close per event). Ours is timed from loading the
config to the sink closed, in a fresh interpreter (imports done first, as for
the baselines); each side's best of several runs counts (the machine is shared).
"""

from __future__ import annotations

import io
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson

from bench.common import (
    Result,
    pipeline_config,
    python_child,
    ratio_result,
    rules_spec,
    timed_run,
    workdir,
    write_config,
)
from bench.gen import dataset
from pipeline.events import stamp
from pipeline.files import open_private

#: The seed-style loop opens and closes the file per event; this many events give a stable rate.
SEED_LOOP_MAX = 200_000


def bare_loop(src: Path, dst: Path) -> int:
    """The least a replay can do: orjson read, stamp, orjson dump, 1 MiB buffered writes."""
    loads, dumps, nl = orjson.loads, orjson.dumps, orjson.OPT_APPEND_NEWLINE
    n = 0
    with open(src, "rb") as fin, io.BufferedWriter(open_private(dst, truncate=True), 1 << 20) as fout:
        write = fout.write
        for line in fin:
            event = loads(line)
            stamp(event)
            write(dumps(event, option=nl))
            n += 1
    return n


def seed_loop(src: Path, dst: Path, limit: int) -> int:
    """What the seed listener does per message: json, stamp, dumps, open-append-close."""
    open_private(dst, truncate=True).close()
    n = 0
    with open(src, encoding="utf-8") as fin:
        for line in fin:
            if n >= limit:
                break
            msg = json.loads(line)
            now = datetime.now(UTC)
            record = {"ts": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                      "unix_ts": now.timestamp(), **msg}
            with open(dst, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            n += 1
    return n


def ours(src: Path, out: Path, *, n_keywords: int = 100, n_rules: int = 20) -> tuple[float, object]:
    """The real pipeline (config file, build, local runtime); returns (seconds, built)."""
    cfg = pipeline_config("bench-replay", {"type": "replay", "path": str(src)},
                          [{"type": "jsonl", "path": str(out / "events.jsonl"), "clear": True}], out,
                          rules=rules_spec(n_keywords, n_rules))
    return timed_run(write_config(out / "replay.yaml", cfg))


# Framework imports happen before the clock starts, as the bare loop's do; config load, build and run are timed.
_OURS = """
import sys
from pathlib import Path
import pipeline.build, pipeline.config, pipeline.runtime.local
from bench.replay import ours
seconds, built = ours(Path(sys.argv[1]), Path(sys.argv[2]))
print(seconds, built.chain.alerts_fired)
"""


def run(n: int, repeats: int = 5) -> list[Result]:
    """Best of `repeats` for each side; ours runs in a fresh interpreter each time, like `pipeline run`."""
    src = dataset(n)
    out = workdir("replay")
    bare = seed = rate = 0.0
    limit = min(n, SEED_LOOP_MAX)
    alerts = seconds = 0.0
    for i in range(repeats):
        t0 = time.perf_counter()
        count = bare_loop(src, out / "bare.jsonl")
        bare = max(bare, count / (time.perf_counter() - t0))
        secs, fired = python_child(_OURS, str(src), str(out)).split()
        if n / float(secs) > rate:
            rate, seconds, alerts = n / float(secs), float(secs), int(fired)
        if i < 2:
            t0 = time.perf_counter()
            seeded = seed_loop(src, out / "seed.jsonl", limit)
            seed = max(seed, seeded / (time.perf_counter() - t0))
    r1 = ratio_result(f"replay {n:,} events vs bare loop", rate, bare, 0.4, "bare loop")
    r1.notes.append(f"{alerts:,.0f} alerts fired; {seconds:.2f}s; best of {repeats}, ours in a fresh process")
    r2 = ratio_result("replay vs seed-style loop", rate, seed, 5, "seed-style loop")
    r2.notes.append(f"seed-style loop timed on the first {limit:,} events (its rate is per event)")
    return [r1, r2]
