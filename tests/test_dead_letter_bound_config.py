"""`dead_letter_max_bytes`, the dead-letter file's bound, as `pipeline run`, `validate`, `schema` and a reload
read it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.build import build
from pipeline.cli import _all_stage_classes
from pipeline.config import load_config
from pipeline.runtime.local import LocalRuntime
from pipeline.runtime.reload import Reloader
from pipeline.schema import json_schema
from tests.test_config_hostile import config_errors

ROOT = Path(__file__).resolve().parents[1]
BASE = "name: x\nsource: {type: replay, path: in.jsonl}\nsinks: [{type: console}]\n"


@pytest.mark.parametrize(("value", "size"), [(None, 1 << 30), ("64MiB", 64 << 20), ("1048576", 1 << 20),
                                             ("${DL_MAX:-2MiB}", 2 << 20), ("${DL_MAX}", 5_000_000)])
def test_the_bound_is_a_size_and_reaches_the_dead_letter_file(tmp_path: Path, value: str | None, size: int) -> None:
    (tmp_path / "in.jsonl").write_text("")
    p = tmp_path / "p.yaml"
    p.write_text(BASE + (f"dead_letter_max_bytes: {value}\n" if value else ""))
    cfg = load_config(p, env={"DL_MAX": "5MB"} if value == "${DL_MAX}" else {})
    assert cfg.dead_letter_max_bytes == size
    assert build(cfg).dead_letter.max_bytes == size


@pytest.mark.parametrize(("line", "error"), [
    ("dead_letter_max_bytes: 512KiB", "4:1: dead_letter_max_bytes: expected at least 1 MiB, got '512KiB'"),
    ("dead_letter_max_bytes: 0", "4:1: dead_letter_max_bytes: expected at least 1 MiB, got 0"),
    ("dead_letter_max_bytes: lots", "4:1: dead_letter_max_bytes: expected a size like 64MiB or 1GiB, got 'lots'"),
    ("dead_letter_max_bytes: -5", "4:1: dead_letter_max_bytes: expected a size like 64MiB or 1GiB, got -5"),
    ("dead_letter_max_byte: 1GiB", "4:1: dead_letter_max_byte: unknown key (did you mean 'dead_letter_max_bytes'?)"),
])
def test_a_bad_bound_is_one_config_error_at_its_line(tmp_path: Path, line: str, error: str) -> None:
    p, errors = config_errors(tmp_path, BASE + line + "\n")
    assert errors == [f"{p}:{error}"]


def test_validate_and_schema_know_the_key(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text("")
    (tmp_path / "p.yaml").write_text(BASE + "dead_letter_max_bytes: 100KB\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", "p.yaml", "--offline"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.strip().endswith(
        "p.yaml:4:1: dead_letter_max_bytes: expected at least 1 MiB, got '100KB'"), r.stderr
    assert "Traceback" not in r.stderr
    (tmp_path / "p.yaml").write_text(BASE + "dead_letter_max_bytes: ${DL_MAX}\n")
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", "p.yaml", "--offline"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.stderr.strip().endswith("p.yaml:4:1: dead_letter_max_bytes: DL_MAX is not set, and its --offline "
                                     "placeholder is not a valid value here; export it, or give it a default: "
                                     "${DL_MAX:-value}"), r.stderr
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json_schema(_all_stage_classes()))
    doc = yaml.safe_load(BASE)
    assert [validator.is_valid({**doc, "dead_letter_max_bytes": v})
            for v in ("256MiB", 1 << 20, "${DL_MAX:-1GiB}", "lots", True)] == [True, True, True, False, False]

async def test_a_reload_does_not_change_the_bound(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """As for `dead_letter`: the open file and its counters belong to the running process; a restart applies it."""
    (tmp_path / "in.jsonl").write_text("")
    p = tmp_path / "p.yaml"
    p.write_text(BASE + "dead_letter_max_bytes: 64MiB\n")
    cfg = load_config(p)
    rt = LocalRuntime(build(cfg), install_signals=False)
    reloader = Reloader(rt, p, cfg)
    p.write_text(BASE + "dead_letter_max_bytes: 2MiB\n")
    caplog.set_level(logging.INFO, logger="pipeline.reload")
    assert await reloader.reload("test")
    assert "needs a restart, not applied: dead_letter_max_bytes" in caplog.text
    assert reloader.current.dead_letter_max_bytes == rt.b.dead_letter.max_bytes == 64 << 20
