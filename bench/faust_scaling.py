"""Benchmark 7: the faust runtime with 1 and 2 workers on the same input; the scaling factor.

For each worker count, a fresh pipeline name (fresh topic and consumer group):
ingest (`pipeline run` with `engine: faust`) publishes the replayed events to
`<name>-ingest` (4 partitions) first; then the workers (`pipeline worker`
processes) start together and run filter -> enrich -> rules -> jsonl. Timed
from the first line a worker writes until the output holds everything a local
run of the same config writes (compared by size, so polling costs nothing).
Broker, ingest and workers share the machine's cores.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, Result, pipeline_config, rules_spec, timed_run, workdir, write_config
from bench.gen import dataset
from pipeline.files import open_private

CLI = [sys.executable, "-m", "pipeline.cli"]
PARTITIONS = 4


def available() -> str | None:
    if importlib.util.find_spec("pipeline.runtime.faust") is None:
        return "the faust runtime (pipeline/runtime/faust.py) is not there"
    from bench.kafka import available as broker_available

    return broker_available()


def _config(out: Path, name: str, src: Path, engine: str, bootstrap: str) -> Path:
    runtime: dict[str, Any] = {"engine": engine}
    if engine == "faust":
        runtime.update(broker=f"kafka://{bootstrap}", partitions=PARTITIONS)
    cfg = pipeline_config(name, {"type": "replay", "path": str(src)},
                          [{"type": "jsonl", "path": str(out / f"{name}.jsonl"), "clear": engine == "local"}],
                          out, rules=rules_spec(100), runtime=runtime)
    return write_config(out / f"{name}.yaml", cfg)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PIPELINE_LOG_LEVEL": "warning"}


def _workers(cfg: Path, out: Path, k: int, want: int, timeout: float) -> float:
    """Start `k` workers; seconds from their first output line until `want` bytes are written."""
    result = out / (cfg.stem + ".jsonl")
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for i in range(k):
            log = out / f"{cfg.stem}-worker-{i}.log"
            with open_private(log, truncate=True) as fh:
                procs.append((subprocess.Popen(
                    [*CLI, "worker", str(cfg), "--workers-dir", str(out / f"{cfg.stem}-workers"),
                     "--session-timeout", "3s"], cwd=out, env=_env(), stdout=fh, stderr=subprocess.STDOUT), log))
        deadline = time.monotonic() + timeout
        first = 0.0
        while time.monotonic() < deadline:
            size = result.stat().st_size if result.exists() else 0
            if size and not first:
                first = time.perf_counter()
            if size >= want:
                return time.perf_counter() - first
            for proc, log in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"worker exited {proc.returncode}: {log.read_text()[-1500:]}")
            time.sleep(0.05)
        raise RuntimeError(f"{k} worker(s): {size} of {want} bytes after {timeout:.0f}s")
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run(n: int) -> list[Result]:
    why = available()
    if why is not None:
        return [Result("faust runtime, 2 workers vs 1", skipped=why)]
    from tests.broker import running_broker

    src = dataset(n)
    out = workdir("faust")
    timeout = 120 + n / 500
    rates: dict[int, float] = {}
    with running_broker(log_path=out / "tansu.log") as broker:
        local = _config(out, "bench-local", src, "local", broker.bootstrap)
        timed_run(local)
        want = (out / "bench-local.jsonl").stat().st_size
        for k in (1, 2):
            cfg = _config(out, f"bench-faust-{k}", src, "faust", broker.bootstrap)
            res = subprocess.run([*CLI, "run", str(cfg)], cwd=out, env=_env(), capture_output=True, text=True,
                                 timeout=timeout)
            if res.returncode != 0:
                raise RuntimeError(f"ingest exited {res.returncode}: {res.stderr[-1500:]}")
            rates[k] = n / _workers(cfg, out, k, want, timeout)
    r = Result("faust runtime, 2 workers vs 1", rates[2], baseline=rates[1], baseline_name="1 worker")
    r.notes.append(f"{n:,} events, {PARTITIONS} partitions; broker and workers share {os.cpu_count()} cores; "
                   "output equals a local run's")
    return [r]
