"""`python -m bench [--quick] [--only NAME ...]`: run the benchmarks, print each figure next to its baseline.

A full run (no `--quick`, no `--only`) also rewrites the results section of
bench/RESULTS.md (machine details, figures, command); the optimisation log
there is kept as written.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Final

from bench.common import Result, machine

#: name -> (module, events for a full run, events for --quick)
BENCHMARKS: Final[dict[str, tuple[str, int, int]]] = {
    "replay": ("bench.replay", 1_000_000, 100_000),
    "hits": ("bench.hits", 1_000_000, 100_000),
    "rules_scaling": ("bench.rules_scaling", 200_000, 30_000),
    "state_store": ("bench.state_store", 200_000, 30_000),
    "ws_ingest": ("bench.ws_ingest", 200_000, 20_000),
    "kafka": ("bench.kafka", 200_000, 20_000),
    "latency": ("bench.latency", 10_000, 2_000),
    "memory": ("bench.memory", 1_000_000, 100_000),
    "faust_scaling": ("bench.faust_scaling", 100_000, 10_000),
    "bytewax_peer": ("bench.bytewax_peer", 1_000_000, 100_000),
    "sessions": ("bench.sessions", 1_000, 50),  # concurrent capture sessions, not events
    "session_burst": ("bench.session_burst", 500, 50),  # sessions created while as many stream
    "spool": ("bench.spool", 1_000_000, 100_000),
    "http_view": ("bench.http_view", 1_000_000, 100_000),
}
RESULTS: Final = Path(__file__).resolve().parent / "RESULTS.md"
START: Final = "<!-- results:start (written by python -m bench) -->"
END: Final = "<!-- results:end -->"


def run_one(name: str, n: int, say: Callable[[str], None]) -> list[Result]:
    """Run one benchmark; a crash becomes a single `skipped` line with the reason, never a traceback."""
    module, _, _ = BENCHMARKS[name]
    t0 = time.perf_counter()
    try:
        results: list[Result] = importlib.import_module(module).run(n)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        results = [Result(name, skipped=f"failed: {type(exc).__name__}: {exc}")]
    for r in results:
        say(r.line())
        for note in r.notes:
            say(f"    {note}")
    say(f"    ({name}: {time.perf_counter() - t0:.1f}s)")
    return results


def render(results: dict[str, list[Result]], command: str) -> str:
    m = machine()
    lines = [START, "", f"Last full run: `{command}` on {m['date']}.", "",
             "| machine | |", "|---|---|",
             f"| nproc | {m['nproc']} |", f"| CPU | {m['cpu']} |", f"| memory | {m['memory']} |",
             f"| Python | {m['python']} |", f"| OS | {m['os']} |", "", "```"]
    for name, rs in results.items():
        for r in rs:
            lines.append(r.line())
            lines.extend(f"    {note}" for note in r.notes)
        if not rs:
            lines.append(f"{name}: no result")
    lines += ["```", "", END]
    return "\n".join(lines)


def write_results(results: dict[str, list[Result]], command: str) -> None:
    from pipeline.files import write_private_text

    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else f"# Benchmark results\n\n{START}\n{END}\n"
    head, sep, rest = text.partition(START)
    tail = rest.partition(END)[2] if sep else "\n" + text
    write_private_text(RESULTS, head + render(results, command) + tail)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small N (about a minute in all); RESULTS.md untouched")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help=f"run only these (repeatable or comma-separated): {', '.join(BENCHMARKS)}")
    args = p.parse_args(argv)
    only = [x for item in args.only for x in item.split(",") if x]
    unknown = [x for x in only if x not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})")
    m = machine()
    print(f"# {m['nproc']} x {m['cpu']}, Python {m['python']}, {m['date']}", flush=True)
    results: dict[str, list[Result]] = {}
    for name, (_, full, quick) in BENCHMARKS.items():
        if only and name not in only:
            continue
        results[name] = run_one(name, quick if args.quick else full, lambda s: print(s, flush=True))
    if not args.quick and not only:
        write_results(results, "make bench")
        print(f"# wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
