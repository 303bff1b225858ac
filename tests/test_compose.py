"""docker-compose.yml names only commands, configs and files that exist, and wires the faust runtime."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.cli import parser
from pipeline.config import load_config
from pipeline.runtime.faust import _parser as worker_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
PIPELINE_SERVICES = {"ingest", "worker", "emulator"}


def subcommands() -> set[str]:
    sub = next(a for a in parser()._actions if a.dest == "command")
    return set(sub.choices)  # type: ignore[arg-type]


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment as a container would see it, `${VAR:-default}` resolved to the default."""
    env = {}
    for key, value in (service.get("environment") or {}).items():
        env[key] = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))
    return env


def test_services_and_profiles() -> None:
    assert {"kafka", *PIPELINE_SERVICES} <= set(SERVICES)
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")
    assert "broker,controller" in SERVICES["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, one node
    assert SERVICES["emulator"]["profiles"] == ["emulator"]
    assert "profiles" not in SERVICES["worker"] and "container_name" not in SERVICES["worker"]  # --scale works
    for name in ("ingest", "worker"):
        assert SERVICES[name]["depends_on"]["kafka"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", sorted(PIPELINE_SERVICES))
def test_build_files_exist(name: str) -> None:
    build = SERVICES[name]["build"]
    context = ROOT / build["context"]
    dockerfile = context / build["dockerfile"]
    assert dockerfile.is_file()
    for line in dockerfile.read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "COPY" and not any(p.startswith("--from") for p in parts):
            for src in parts[1:-1]:
                assert (context / src).exists(), f"{dockerfile}: COPY {src} does not exist"


@pytest.mark.parametrize("name", sorted(PIPELINE_SERVICES))
def test_commands_and_paths_exist(name: str) -> None:
    command = SERVICES[name]["command"]
    assert command[0] in subcommands(), f"{name}: `pipeline {command[0]}` is not a command"
    for arg in command[1:]:
        if arg.startswith("config/"):
            assert (ROOT / arg).is_file(), f"{name}: {arg} does not exist"


@pytest.mark.parametrize("name", ["ingest", "worker"])
def test_pipeline_configs_load_with_the_faust_runtime(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    service = SERVICES[name]
    for key, value in compose_env(service).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("VIDEO_DB_API_KEY", "test-key")  # the user supplies it
    config = next(a for a in service["command"] if a.endswith(".yaml"))
    cfg = load_config(ROOT / config)
    assert cfg.runtime.engine == "faust"
    assert cfg.runtime.broker == "kafka://kafka:9092"
    if name == "worker":
        args = worker_parser().parse_args(service["command"][1:])
        assert args.config == config and args.workers_dir.startswith("out/")


def test_emulator_command_parses() -> None:
    from pipeline.emulator.cli import _parser as emulator_parser

    args = emulator_parser().parse_args(SERVICES["emulator"]["command"][1:])
    assert args.host == "0.0.0.0" and args.port == 8700
