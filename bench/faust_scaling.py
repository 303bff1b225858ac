"""Benchmark 7: the faust runtime with 1 and 2 workers on the same input; the scaling factor.

Ingest (`pipeline run` with `engine: faust`) publishes the replayed events to
`<name>-ingest`; then 1, and in a second run 2, `pipeline worker` processes run
filter -> enrich -> rules -> jsonl on their partitions. Timed from the first
worker start until the workers' jsonl files hold every event that passed the
filter (counted from a local run of the same config).
"""

from __future__ import annotations

import importlib.util

from bench.common import Result


def available() -> str | None:
    if importlib.util.find_spec("pipeline.runtime.faust") is None:
        return "the faust runtime (pipeline/runtime/faust.py) has not landed yet"
    return None


def run(n: int) -> list[Result]:
    why = available()
    if why is not None:
        return [Result("faust runtime, 2 workers vs 1", skipped=why)]
    return [Result("faust runtime, 2 workers vs 1", skipped="not implemented")]
