"""Benchmark 6: peak RSS of the replay pipeline over 250k and 1M events, each in a fresh process.

Why: a month of events must replay in bounded memory (bounded queues, bounded
rule state, buffered but bounded jsonl writes): peak RSS must stay under the
target and must not grow with the number of events.
"""

from __future__ import annotations

from bench.common import Result, python_child
from bench.gen import dataset

TARGET_MB = 150
#: RSS may differ this much between the two sizes and still count as flat (allocator noise).
FLAT_MB = 10

# VmHWM, not getrusage(): ru_maxrss survives exec, so a child would report its parent's peak at fork.
_CHILD = """
import sys
from pathlib import Path
from bench.common import workdir
from bench.replay import ours
seconds, built = ours(Path(sys.argv[1]), workdir("memory-" + sys.argv[2]))
status = Path("/proc/self/status").read_text().splitlines()
print(next(int(x.split()[1]) for x in status if x.startswith("VmHWM:")) / 1024)
"""


def peak_rss_mb(n: int) -> float:
    return float(python_child(_CHILD, str(dataset(n)), str(n)).split()[-1])


def run(n: int) -> list[Result]:
    small_n = max(1, n // 4)
    small, big = peak_rss_mb(small_n), peak_rss_mb(n)
    res = Result(f"peak RSS, {n:,} events", big, "MB", small, f"{small_n:,} events",
                 f"< {TARGET_MB} MB, flat within {FLAT_MB} MB", big < TARGET_MB and big - small <= FLAT_MB)
    res.notes.append(f"growth {big - small:+.1f} MB from {small_n:,} to {n:,} events")
    return [res]
