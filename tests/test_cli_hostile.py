"""What a user types or redirects: output to a full disk or a closed stdout, config paths that are not
config files (a device, a fifo nobody writes, something huge). One line and an exit code, never a
traceback or a hang."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
ENV.pop("PIPELINE_DEBUG", None)


def sh(command: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run `command` in sh with `pipeline` meaning this tree's CLI (redirections are the point)."""
    cli = f"{sys.executable} -m pipeline.cli"
    return subprocess.run(["sh", "-c", command.replace("pipeline ", cli + " ", 1)], capture_output=True, text=True,
                          env=ENV, timeout=timeout, cwd=ROOT)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_output_to_a_full_disk_is_one_line_and_exit_1() -> None:
    """`pipeline stages -v > /dev/full` printed an OSError traceback (from print, or from the final flush)."""
    res = sh("pipeline stages -v > /dev/full")
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == ["pipeline: cannot write its output: No space left on device"]


def test_output_to_a_closed_stdout_is_one_line_not_a_traceback() -> None:
    """`pipeline schema >&-`: stdout is None in Python; the final flush raised AttributeError with a traceback.
    The schema cannot be printed, so that is an error; `validate` only reports (its exit code says it all)."""
    res = sh("pipeline schema >&-")
    assert (res.returncode, res.stderr.strip()) == (1, "pipeline: cannot write its output: stdout is closed")
    res = sh("pipeline validate config/replay.yaml >&-")
    assert (res.returncode, res.stderr) == (0, "")
