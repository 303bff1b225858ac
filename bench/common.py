"""What every benchmark shares: the result line, machine details, pipeline configs and runs."""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import yaml

from bench.gen import OUT, keywords
from pipeline.files import ensure_private_dir, write_private_text

ROOT: Final = Path(__file__).resolve().parents[1]


#: The benchmarks' filter stage: every channel, partial transcripts dropped.
FILTER: Final = {"type": "filter", "channels": ["transcript", "visual_index", "audio_index", "alert",
                                                 "capture_session"], "final_only": True}


@dataclass
class Result:
    """One printed figure next to its baseline from the same run, and whether it meets its target."""

    name: str
    ours: float | None = None
    unit: str = "ev/s"
    baseline: float | None = None
    baseline_name: str = "baseline"
    target: str = ""  # e.g. "≥ 0.4" (ratio) or "< 5 ms"
    ok: bool | None = None
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.baseline:
            return None
        return self.ours / self.baseline

    def line(self) -> str:
        if self.skipped is not None:
            return f"{self.name}: skipped: {self.skipped}"
        parts = [f"{self.name}: ours {fmt(self.ours)} {self.unit}"]
        if self.baseline is not None:
            parts.append(f"{self.baseline_name} {fmt(self.baseline)} {self.unit}")
            parts.append(f"ratio {self.ratio:.2f}" if self.ratio is not None else "ratio n/a")
        verdict = "" if self.ok is None else (" PASS" if self.ok else " MISS")
        if self.target:
            parts[-1] += f" (target {self.target}){verdict}"
        elif verdict:
            parts[-1] += verdict
        return " | ".join(parts)


def fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    if x >= 1000:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def ratio_result(name: str, ours: float, baseline: float, target: float, baseline_name: str = "baseline",
                 unit: str = "ev/s") -> Result:
    """`ours / baseline >= target`."""
    return Result(name, ours, unit, baseline, baseline_name, f"≥ {target:g}", ours / baseline >= target)


def machine() -> dict[str, str]:
    """nproc, CPU model, Python version, OS and date, for RESULTS.md."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {"nproc": str(os.cpu_count()), "cpu": cpu or "unknown", "memory": mem,
            "python": platform.python_version(), "os": f"{platform.system()} {platform.release()}",
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}


def workdir(name: str) -> Path:
    """A fresh private directory under bench/out/ for one benchmark's files."""
    d = OUT / name
    ensure_private_dir(d)
    for p in d.iterdir():
        if p.is_file():
            p.unlink()
    return d


def rules_spec(n_keywords: int, n_rules: int = 20, *, regex: bool = True) -> list[dict[str, Any]]:
    """A realistic rule set: `n_keywords` spread over `n_rules` word/substring(/regex) rules, with cooldowns."""
    kws = keywords(n_keywords)
    n_rules = max(1, min(n_rules, n_keywords))
    rules: list[dict[str, Any]] = []
    for i in range(n_rules):
        mine = kws[i::n_rules]
        rule: dict[str, Any] = {"name": f"rule-{i:02d}", "keywords": mine, "cooldown": "10m",
                                "severity": ("info", "warning", "critical")[i % 3]}
        if i % 4 == 1:
            rule["channels"] = ["visual_index"]
            rule["rtstream_names"] = ["display:*"]
        elif i % 4 == 2:
            rule["channels"] = ["transcript"]
        if i % 7 == 3:
            rule["match"] = "substring"
        if i % 5 == 4:
            rule.update(window="5m", min_count=3)
        rules.append(rule)
    if regex and n_rules >= 20:  # one regex rule, as real rule sets have (api keys, card numbers)
        rules[-1] = {"name": "secret-pattern", "match": "regex", "channels": ["visual_index", "transcript"],
                     "keywords": [r"\bsk-[A-Za-z0-9]{16,}", r"\bAKIA[0-9A-Z]{16}\b"], "severity": "critical"}
    return rules


def pipeline_config(name: str, source: dict[str, Any], sinks: list[dict[str, Any]], out: Path, *,
                    rules: list[dict[str, Any]] | None = None, processors: bool = True, enrich: bool = True,
                    runtime: dict[str, Any] | None = None) -> dict[str, Any]:
    """filter -> enrich -> rules (the benchmarks' standard chain) between `source` and `sinks`."""
    stages: list[dict[str, Any]] = []
    if processors:
        stages = [FILTER]
        if enrich:
            stages.append({"type": "enrich"})
        if rules:
            stages.append({"type": "rules", "rules": rules})
    cfg: dict[str, Any] = {"name": name, "source": source, "stages": stages, "sinks": sinks,
                           "dead_letter": str(out / "dead-letter.jsonl")}
    if runtime:
        cfg["runtime"] = runtime
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    write_private_text(path, yaml.safe_dump(cfg, sort_keys=False))
    return path


async def run_pipeline(config: Path) -> tuple[int, Any]:
    """Build and run one pipeline in this loop; returns (exit code, the built pipeline)."""
    from pipeline.build import build
    from pipeline.config import load_config
    from pipeline.runtime.local import LocalRuntime

    built = build(load_config(config))
    rt = LocalRuntime(built, install_signals=False)
    code = await rt.run()
    if code != 0:
        raise RuntimeError(f"{config}: pipeline exited {code}: {rt.error}")
    return code, built


def timed_run(config: Path) -> tuple[float, Any]:
    """Run a pipeline to completion in a fresh event loop; (seconds, built)."""
    t0 = time.perf_counter()
    code, built = asyncio.run(run_pipeline(config))
    dt = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"{config}: pipeline exited {code}")
    return dt, built


def count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            n += chunk.count(b"\n")
    return n


def python_child(code: str, *args: str, timeout: float = 900) -> str:
    """Run `code` in a fresh interpreter (isolation, own RSS); returns stdout, raises on failure."""
    res = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if res.returncode != 0:
        raise RuntimeError(f"child failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return res.stdout
