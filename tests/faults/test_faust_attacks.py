"""Attacks on the distributed runtime: broker addresses a user can mistype, state after a worker dies mid-batch.

Real `pipeline` processes, the real test broker, real SIGKILL.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "pipeline.cli"]

pytestmark = pytest.mark.timeout(120)


def cli(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


# -- a mistyped broker address: one line, exit 2, from every command ----------------------------------

def faust_config(path: Path, broker: str) -> Path:
    path.write_text(f"""name: t
source: {{type: replay, path: in.jsonl}}
sinks: [{{type: console}}]
runtime: {{engine: faust, broker: "{broker}", partitions: 4}}
""")
    return path


@pytest.mark.parametrize(("broker", "why"), [
    ("kafka://", "expected host:port"),
    ("kafka://localhost:notaport", "the port must be a number"),
    ("http://localhost:9092", "expected host:port (or kafka://host:port)"),
    ("localhost:99999", "the port must be a number"),
    ("kafka://a:9092;::1", "[::1]:9092 for IPv6"),
])
def test_a_malformed_runtime_broker_is_a_config_error(tmp_path: Path, broker: str, why: str) -> None:
    with pytest.raises(ConfigError, match=r"p\.yaml:4:\d+: runtime\.broker: .*" + re.escape(why)):
        load_config(faust_config(tmp_path / "p.yaml", broker))


@pytest.mark.parametrize(("command", "broker"), [
    ("run", "kafka://"),                        # was a pydantic traceback
    ("worker", "kafka://localhost:notaport"),   # was retried forever ("cannot reach ... (ValueError)")
    ("validate", "http://localhost:9092"),      # was "ok"; the worker then failed inside faust
])
def test_a_malformed_runtime_broker_is_one_line_exit_2_from_the_cli(tmp_path: Path, command: str,
                                                                     broker: str) -> None:
    (tmp_path / "in.jsonl").write_text('{"channel": "transcript"}\n')
    res = cli(command, str(faust_config(tmp_path / "p.yaml", broker).name), cwd=tmp_path, timeout=20)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipeline: p.yaml:4:") and "runtime.broker" in lines[0], lines


def test_a_kafka_sink_or_source_address_with_a_bad_port_is_a_config_error(tmp_path: Path) -> None:
    """Was accepted by validate, then a ValueError at the first connect (`invalid literal for int()`)."""
    (tmp_path / "p.yaml").write_text("""name: t
source: {type: kafka, bootstrap_servers: "localhost:9092,localhost:90x2", topic: t, group: g}
sinks: [{type: kafka, bootstrap_servers: ["localhost:9092", "localhost:"]}]
""")
    res = cli("validate", "p.yaml", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "source.bootstrap_servers" in res.stderr and "'localhost:90x2'" in res.stderr, res.stderr
