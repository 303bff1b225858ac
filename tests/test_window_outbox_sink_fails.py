"""A window stage's kept metrics make the runtime flush the sinks once a second: a sink whose flush fails there
ends the run with one line naming the sink (it said `commit: RuntimeError: ...`, the name of an internal task,
on a run with no committing source), and one whose close fails keeps them for the next run."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.procs import finish, pipeline_run
from tests.test_window_kill import SOURCE, T0, write_config

SINK = '''
import os
from pipeline.api import Options, Sink


class FlakyOptions(Options):
    path: str
    fail: str  # "flush", "close" or "" (none)


class Flaky(Sink):
    """Lines kept in memory, written at close; its flush or close fails as told."""

    name = "flaky"
    Options = FlakyOptions

    async def start(self):
        self.lines = []

    async def write(self, batch):
        self.lines += [e["window"]["start"] for e in batch if e.get("channel") == "metrics"]

    async def flush(self):
        if self.options.fail == "flush":
            raise RuntimeError("disk on fire")

    async def close(self):
        if self.options.fail == "close":
            raise RuntimeError("disk on fire")
        with open(self.options.path, "a") as f:
            f.writelines(f"{s}\\n" for s in self.lines)
'''


def start(tmp_path: Path, fail: str, part: range, hold: bool) -> subprocess.Popen[str]:
    """`pipeline run` of a window stage into a jsonl sink and a Flaky one failing as told."""
    (tmp_path / "lines_src.py").write_text(SOURCE)
    (tmp_path / "flaky_sink.py").write_text(SINK)
    cfg = write_config(tmp_path, part, hold)
    flaky = f"  - {{type: 'flaky_sink:Flaky', path: {tmp_path}/flaky.txt, fail: '{fail}'}}\ndead_letter:"
    cfg.write_text(cfg.read_text().replace("dead_letter:", flaky))
    return pipeline_run(cfg, cwd=tmp_path, plugins=True)


def test_a_sink_whose_flush_fails_is_named(tmp_path: Path) -> None:
    proc = start(tmp_path, "flush", range(0, 100), hold=True)  # a window closes: the sinks get flushed
    _, err = finish(proc, 60)
    assert proc.returncode == 1, err
    assert "sinks[1]:flaky_sink:Flaky: flush failed: RuntimeError: disk on fire" in err, err
    assert "Traceback" not in err and "commit:" not in err, err


def test_windows_a_sink_could_not_close_on_are_handed_out_by_the_next_run(tmp_path: Path) -> None:
    first = start(tmp_path, "close", range(0, 100), hold=False)  # [0, 60 s) and, at the end, [60 s, 120 s)
    _, err = finish(first, 60)
    assert first.returncode == 1 and "close failed" in err, err
    assert not (tmp_path / "flaky.txt").exists()
    second = start(tmp_path, "", range(200, 210), hold=False)
    _, err = finish(second, 60)
    assert second.returncode == 0, err
    got = sorted(int(x) for x in (tmp_path / "flaky.txt").read_text().split())
    assert got == [T0, T0 + 60_000, T0 + 180_000], got
