"""A restart hands out the alerts an earlier run kept (see `pipeline.state.outbox`) with its first source batch.
Before, it took them out of state.db at start and held them only in memory until then: a save before that batch
(a SIGHUP reload that changed a rule saves the rule state at once) committed their removal, and a `kill -9`
while the source was still idle (a quiet meeting) lost them for good. Now they stay in state.db until written."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.procs import finish, pipeline_run
from tests.test_rules_kill import alerts, cooldown_saved
from tests.test_rules_kill import run as first_run
from tests.test_window_kill import LINES_STOP, T0

IDLE = '''
import asyncio
from pipeline.api import Options, Source


class IdleOptions(Options):
    hold: bool = True
    ready: str


class Idle(Source):
    """Yields nothing; with `hold`, waits for the stop (a live source with nothing to say yet)."""

    name = "idle"
    Options = IdleOptions

    async def batches(self):
        self._stopped = asyncio.Event()
        open(self.options.ready, "w").close()
        if self.options.hold:
            await self._stopped.wait()
        return
        yield
''' + LINES_STOP + '''

class Committing(Idle):
    """Yields one empty batch (its number 0), then waits; notes every commit (a kafka source's offsets)."""

    name = "committing"

    async def batches(self):
        self._stopped = asyncio.Event()
        yield []
        open(self.options.ready, "w").close()
        await self._stopped.wait()

    async def commit(self, upto):
        with open(self.options.ready + ".commits", "a") as f:
            f.write(f"{upto}\\n")
'''


def idle_config(tmp_path: Path, keywords: str, hold: bool, source: str = "Idle") -> Path:
    (tmp_path / "idle_src.py").write_text(IDLE)
    cfg = tmp_path / "w.yaml"
    cfg.write_text(f"""
name: w
state_dir: {tmp_path}/state
source: {{type: "idle_src:{source}", hold: {str(hold).lower()}, ready: {tmp_path}/ready}}
stages:
  - {{type: rules, rules: [{{name: secret, keywords: [{keywords}], cooldown: 1h}}]}}
sinks:
  - {{type: jsonl, path: {tmp_path}/alert.jsonl, channels: [alert], flush_interval: 60s}}
dead_letter: {tmp_path}/dead.jsonl
""")
    return cfg


def kept_rows(state_db: Path) -> int:
    db = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT count(*) FROM state WHERE map = '~outbox'").fetchone()[0])
    finally:
        db.close()


def test_kept_alerts_survive_a_reload_and_a_kill_9_before_the_first_batch(tmp_path: Path) -> None:
    db = tmp_path / "state" / "state.db"
    first = first_run(tmp_path, range(0, 10), hold=True, match="word")  # fires once; the line dies with the kill
    try:
        deadline = time.monotonic() + 30
        while not cooldown_saved(db):
            assert time.monotonic() < deadline and first.poll() is None, first.stderr.read() if first.stderr else ""
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
    finally:
        finish(first, 10)
    assert alerts(tmp_path) == [] and kept_rows(db) == 1
    with (tmp_path / "second.log").open("w") as log:
        second = pipeline_run(idle_config(tmp_path, "password", hold=True), cwd=tmp_path, plugins=True, stderr=log)
    try:
        wait_for((tmp_path / "ready").exists, second)
        idle_config(tmp_path, "password, secret", hold=True)  # the rule's matching changed: its state is saved now
        second.send_signal(signal.SIGHUP)
        wait_for(lambda: not cooldown_saved(db), second)  # the reload saved the rule state
        second.send_signal(signal.SIGKILL)
    finally:
        finish(second, 10)
    err = (tmp_path / "second.log").read_text()
    assert kept_rows(db) == 1 or alerts(tmp_path) == [T0], err  # kept until written
    third = pipeline_run(idle_config(tmp_path, "password, secret", hold=False), cwd=tmp_path, plugins=True)
    _, err = finish(third, 60)
    assert third.returncode == 0, err
    assert alerts(tmp_path) in ([T0], [T0, T0]), err  # the first run's alert: at least once, never lost
    assert kept_rows(db) == 0, err


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while not cond():
        assert time.monotonic() < deadline and proc.poll() is None, "gave up waiting"
        time.sleep(0.05)


def killed_with_a_kept_alert(tmp_path: Path) -> Path:
    """A first run that fired the alert, killed once its cooldown was saved (the alert kept): its state.db."""
    db = tmp_path / "state" / "state.db"
    first = first_run(tmp_path, range(0, 10), hold=True, match="word")
    try:
        wait_for(lambda: cooldown_saved(db), first)
        first.send_signal(signal.SIGKILL)
    finally:
        finish(first, 10)
    return db


def test_kept_alerts_go_out_at_once_while_the_restarted_source_is_idle(tmp_path: Path) -> None:
    """Before, they waited for the source's first batch: a quiet source held a page back until someone spoke."""
    db = killed_with_a_kept_alert(tmp_path)
    assert alerts(tmp_path) == [] and kept_rows(db) == 1
    cfg = idle_config(tmp_path, "password", hold=True)
    cfg.write_text(cfg.read_text().replace("flush_interval: 60s", "flush_interval: 0s"))
    second = pipeline_run(cfg, cwd=tmp_path, plugins=True)
    try:
        wait_for(lambda: alerts(tmp_path) == [T0], second)  # written while the source has nothing yet
        wait_for(lambda: kept_rows(db) == 0, second)  # ... and forgotten
        wait_for((tmp_path / "ready").exists, second)  # (the test source hears a stop only once it runs)
        second.send_signal(signal.SIGTERM)
        _, err = finish(second, 30)
    finally:
        finish(second, 10)
    assert second.returncode == 0, err
    assert alerts(tmp_path) == [T0], err


def test_a_committing_source_is_told_its_own_batch_numbers_after_the_kept_batch(tmp_path: Path) -> None:
    """The kept alerts go out as batch 0: the source's first batch is the runtime's 1, but still its own 0 (a
    commit of 1 would commit a kafka batch not read yet: lost if the run died then)."""
    db = killed_with_a_kept_alert(tmp_path)
    second = pipeline_run(idle_config(tmp_path, "password", hold=True, source="Committing"), cwd=tmp_path,
                          plugins=True)
    commits = tmp_path / "ready.commits"
    try:
        wait_for(commits.exists, second)
        wait_for(lambda: kept_rows(db) == 0, second)
        second.send_signal(signal.SIGTERM)
        _, err = finish(second, 30)
    finally:
        finish(second, 10)
    assert second.returncode == 0, err
    assert {int(x) for x in commits.read_text().split()} == {0}, err
    assert alerts(tmp_path) == [T0], err
