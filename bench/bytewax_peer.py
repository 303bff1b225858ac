"""Benchmark 8: a peer on the same work. Bytewax (Rust-core dataflow) runs our filter and rules.

Both sides read the same file and run the same stage code (`Filter.process` and
`Rules.process`, 20 rules / 100 keywords, over whole batches: bytewax's
`flat_map_batch`), then write JSON lines with 1 MiB buffered writes. Bytewax
reads with its own `FileSource`; its own `FileSink` fsyncs every batch, so the
peer gets a buffered sink like ours instead. Each side runs in a fresh process.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.common import FILTER, Result, pipeline_config, python_child, rules_spec, workdir, write_config

_CHILD = """
import sys
from bench.bytewax_peer import peer
print(peer(sys.argv[1], sys.argv[2]))
"""

_OURS = """
import sys
from pathlib import Path
import pipeline.build, pipeline.config, pipeline.runtime.local
from bench.common import timed_run
print(timed_run(Path(sys.argv[1]))[0])
"""


def available() -> str | None:
    """None when bytewax is importable, else why not."""
    try:
        import bytewax.dataflow  # noqa: F401
    except ImportError as exc:
        return f"bytewax is not installed ({exc}); `pip install -e '.[bench]'`"
    return None


def peer(src: str, out: str) -> float:
    """Run the Bytewax dataflow over `src` into `out`; returns wall seconds."""
    import io

    import bytewax.operators as op
    import orjson
    from bytewax.connectors.files import FileSource
    from bytewax.dataflow import Dataflow
    from bytewax.outputs import DynamicSink, StatelessSinkPartition
    from bytewax.testing import run_main

    from pipeline.api import Context, StateStore
    from pipeline.deadletter import DeadLetter
    from pipeline.events import Stamper
    from pipeline.files import open_private
    from pipeline.session import SessionLink
    from pipeline.stats import StageStats
    from stages.processors.filter import Filter, FilterOptions
    from stages.processors.rules import Rules, RulesOptions

    def ctx(name: str) -> Context:
        return Context(pipeline="bytewax", stage=name, dead_letter=DeadLetter(Path(out).with_suffix(".dead")),
                       session=SessionLink(), stats=StageStats(name, "processor"), state=StateStore())

    flt = Filter(FilterOptions.model_validate({k: v for k, v in FILTER.items() if k != "type"}), ctx("filter"))
    rules = Rules(RulesOptions.model_validate({"rules": rules_spec(100)}), ctx("rules"))
    stamp = Stamper()
    loads, dumps, nl = orjson.loads, orjson.dumps, orjson.OPT_APPEND_NEWLINE

    def parse(lines: list[str]) -> list[dict[str, Any]]:
        return [stamp(loads(line)) for line in lines if line]

    class _Part(StatelessSinkPartition[dict[str, Any]]):
        def __init__(self) -> None:
            self.fh = io.BufferedWriter(open_private(out, truncate=True), 1 << 20)

        def write_batch(self, items: list[dict[str, Any]]) -> None:
            for e in items:
                self.fh.write(dumps(e, option=nl, default=str))

        def close(self) -> None:
            self.fh.close()

    class _Sink(DynamicSink[dict[str, Any]]):
        def build(self, step_id: str, worker_index: int, worker_count: int) -> _Part:
            return _Part()

    flow = Dataflow("bench_peer")
    lines = op.input("read", flow, FileSource(src, batch_size=1024))
    events = op.flat_map_batch("parse", lines, parse)
    kept = op.flat_map_batch("filter", events, flt.process)
    alerted = op.flat_map_batch("rules", kept, rules.process)
    op.output("jsonl", alerted, _Sink())
    t0 = time.perf_counter()
    run_main(flow)
    return time.perf_counter() - t0


def run(n: int) -> list[Result]:
    from bench.gen import dataset

    why = available()
    if why is not None:
        return [Result("bytewax peer", skipped=why)]
    src = dataset(n)
    out = workdir("bytewax")
    theirs = float(python_child(_CHILD, str(src), str(out / "bytewax.jsonl")).split()[-1])
    cfg = pipeline_config("bench-peer", {"type": "replay", "path": str(src)},
                          [{"type": "jsonl", "path": str(out / "ours.jsonl"), "clear": True}], out,
                          rules=rules_spec(100), enrich=False)
    ours = float(python_child(_OURS, str(write_config(out / "peer.yaml", cfg))).split()[-1])
    res = Result("same work as Bytewax (filter, rules, jsonl)", n / ours, baseline=n / theirs,
                 baseline_name="bytewax")
    same = (out / "ours.jsonl").stat().st_size == (out / "bytewax.jsonl").stat().st_size
    res.notes.append("outputs identical in size" if same else "output sizes differ (check!)")
    return [res]
