"""Starting `pipeline run` for tests, and stopping the processes tests and benchmarks start: never one left
behind."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]


def pipeline_run(config: str | Path, *args: str, cwd: Path, stderr: IO[Any] | int = subprocess.PIPE,
                 stdout: IO[Any] | int = subprocess.DEVNULL, plugins: bool = False) -> subprocess.Popen[str]:
    """`pipeline run CONFIG ARGS...` in `cwd` (this checkout on its PYTHONPATH; `plugins`: `cwd` too, where a
    test wrote its plugin modules), text output."""
    path = f"{ROOT}{os.pathsep}{cwd}" if plugins else str(ROOT)
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config), *args], cwd=cwd, text=True,
                            env={**os.environ, "PYTHONPATH": path}, stdout=stdout, stderr=stderr)


async def pipeline_started(config: Path, cwd: Path, **env: str) -> asyncio.subprocess.Process:
    """`pipeline run CONFIG` started in `cwd` with `env` added, its output appended to `cwd/run.log`."""
    with (cwd / "run.log").open("ab") as log:
        return await asyncio.create_subprocess_exec(sys.executable, "-m", "pipeline.cli", "run", str(config),
                                                    cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                                                    stdout=log, stderr=log)


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """(stdout, stderr) of `proc` once it exits; killed (and reaped) if it has not within `timeout`."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out or "", err or ""


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    """Send `sig` if it still runs and wait up to `timeout` for it; then SIGKILL. Returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


async def communicate(proc: asyncio.subprocess.Process, timeout: float) -> tuple[bytes, bytes]:
    """(stdout, stderr) of `proc` once it exits; killed (and reaped) if it has not within `timeout`."""
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return out or b"", err or b""
