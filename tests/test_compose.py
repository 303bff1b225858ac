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


# --- monitoring: every pipeline process serves /metrics; Prometheus scrapes them; Grafana shows the dashboard ---

def _http_arg(command: list[str]) -> str:
    return command[command.index("--http") + 1]


def test_pipeline_processes_serve_metrics_on_9464() -> None:
    from pipeline.http.address import parse_address

    ingest = SERVICES["ingest"]["command"]
    args = parser().parse_args(ingest)
    assert args.http == _http_arg(ingest) and parse_address(args.http) == ("0.0.0.0", 9464)
    worker = SERVICES["worker"]["command"]
    assert worker_parser().parse_args(worker[1:]).http == "0.0.0.0:9464"
    assert "127.0.0.1:9464:9464" in SERVICES["ingest"]["ports"]  # the status page on the host's loopback only
    assert "PIPELINE_HTTP_TOKEN" in compose_env(SERVICES["ingest"])


def test_meeting_config_takes_the_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIDEO_DB_API_KEY", "test-key")
    monkeypatch.delenv("PIPELINE_HTTP_TOKEN", raising=False)
    assert load_config(ROOT / "config/meeting.yaml").runtime.http_token is None  # unset: no token
    monkeypatch.setenv("PIPELINE_HTTP_TOKEN", "tok-123456")
    token = load_config(ROOT / "config/meeting.yaml").runtime.http_token
    assert token is not None and token.get_secret_value() == "tok-123456"


def test_prometheus_scrapes_the_ingest_and_every_worker() -> None:
    prom = SERVICES["prometheus"]
    assert prom["image"].startswith("prom/prometheus:v") and prom["profiles"] == ["monitoring"]
    host, _, inside = prom["volumes"][0].partition(":")
    assert (ROOT / host).is_file() and inside.startswith("/etc/prometheus/prometheus.yml")
    scrape = yaml.safe_load((ROOT / host).read_text())["scrape_configs"]
    jobs = {job["job_name"]: job for job in scrape}
    assert jobs["pipeline-ingest"]["static_configs"][0]["targets"] == ["ingest:9464"]
    dns = jobs["pipeline-worker"]["dns_sd_configs"][0]
    assert dns["names"] == ["worker"] and dns["port"] == 9464  # every scaled worker, found by DNS
    assert all(j["job_name"].startswith("pipeline-") for j in scrape)  # the dashboard's job=~"pipeline-.*"


def test_grafana_has_the_dashboard_provisioned() -> None:
    graf = SERVICES["grafana"]
    assert graf["image"].startswith("grafana/grafana:") and graf["profiles"] == ["monitoring"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in graf["volumes"])
    assert mounts["./config/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./config/grafana/dashboards"] == "/var/lib/grafana/dashboards"
    for host in mounts:
        assert (ROOT / host).is_dir()
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / "config/grafana/dashboards" / Path(home).name).is_file()
    assert "prometheus" in graf["depends_on"]
