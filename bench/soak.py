"""Chaos soak: a real `pipeline run` against the emulator while seeded faults hit it at random moments.

    python -m bench.soak --minutes 4 --seed 1

The emulator runs in this process (so every event it produced is known and its WebSocket can be dropped on
demand) and plays one capture session of 4 rtstreams (about 4 events/s, some with a rule keyword) for
`--minutes`. `pipeline run` (videodb source + capture_session controller -> filter -> enrich -> rules) writes
to a jsonl sink with `buffer: {type: disk}`, a jsonl sink with the memory buffer, and a gated sink
(`tests.slow_sink:GatedLines`, disk buffer) that the soak stalls. Faults, at seeded random moments: drop the
WebSocket, `kill -9` and restart, stall the gated sink for a few seconds, SIGHUP with the same or a slightly
changed config. At the end the session is exported and the run ends by itself; then every transcript, visual
and audio event the emulator produced must be in every sink at least once, each rule alert the events call for
must be there, and no run may report `LOST`. Exit code 1 when a check fails. Not part of `make test`.

`--sessions N` soaks the session API (`controller.api`) instead, with N sessions: see bench/soak_sessions.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import signal
import socket
import sys
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import orjson
import yaml

from bench.common import ROOT
from pipeline.emulator import Emulator

API_KEY = "k-soak-0123456789"
KEYWORD = "password"
TRACKED = ("transcript", "visual_index", "audio_index")
DUP_WINDOW_MS = 45_000
PIPELINE = [sys.executable, "-m", "pipeline.cli", "run"]


def scenario(path: Path, seconds: int, rng: random.Random) -> Path:
    """4 rtstreams: a transcript per second per audio stream, a visual-index text every 2 s per screen, an
    audio-index text every 8 s per audio stream; about one text in 12 holds the rule keyword."""
    streams = [{"rtstream_id": "rts-mic", "name": "mic:default", "media_types": ["audio"], "type": "mic"},
               {"rtstream_id": "rts-sys", "name": "system_audio:default", "media_types": ["audio"],
                "type": "system_audio"},
               {"rtstream_id": "rts-d1", "name": "display:1", "media_types": ["video"], "type": "screen"},
               {"rtstream_id": "rts-d2", "name": "display:2", "media_types": ["video"], "type": "screen"}]

    def text(kind: str, t: int) -> str:
        word = KEYWORD if rng.random() < 1 / 12 else "release"
        return f"{kind} {t}: we talk about the {word} for thursday"

    events: list[dict[str, Any]] = []
    for t in range(seconds):
        for name in ("mic:default", "system_audio:default"):
            events.append({"at": t + 0.5, "channel": "transcript", "rtstream": name, "is_final": True, "span": 1,
                           "text": text("said", t)})
            if t % 8 == 0:
                events.append({"at": t + 0.7, "channel": "audio_index", "rtstream": name, "span": 8,
                               "text": text("heard", t)})
        if t % 2 == 0:
            for name in ("display:1", "display:2"):
                events.append({"at": t + 1.0, "channel": "visual_index", "rtstream": name, "span": 2,
                               "text": text("screen", t)})
    head = {"name": "soak", "end": seconds + 1, "rtstreams": streams}
    path.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in (head, *events)))
    return path


def config(out: Path, base_url: str, severity: str) -> dict[str, Any]:
    return {
        "name": "soak",
        "videodb": {"api_key": "${VIDEO_DB_API_KEY}", "base_url": base_url},
        "source": {"type": "videodb", "backoff_initial": "100ms", "backoff_max": "2s"},
        "controller": {"type": "capture_session", "end_user_id": "soak", "status_poll_interval": "1s",
                       "on_active": {"transcript": True,
                                     "index_visuals": {"prompt": "Describe the screen"},
                                     "index_audio": {"prompt": "Summarize"}}},
        "stages": [{"type": "filter", "channels": ["transcript", "visual_index", "audio_index", "alert",
                                                   "capture_session"]},
                   {"type": "enrich"},
                   {"type": "rules", "rules": [{"name": "secret", "keywords": [KEYWORD], "cooldown": 0,
                                                "severity": severity}]}],
        "sinks": [{"type": "jsonl", "path": str(out / "disk.jsonl"), "flush_interval": "200ms",
                   "buffer": {"type": "disk"}},
                  {"type": "jsonl", "path": str(out / "memory.jsonl"), "flush_interval": "200ms"},
                  {"type": "tests.slow_sink:GatedLines", "path": str(out / "gated.jsonl"),
                   "buffer": {"type": "disk"}}],
        "state_dir": str(out / "state"),
        "dead_letter": str(out / "dead-letter.jsonl"),
        "runtime": {"drain_timeout": "20s"},
    }


class Soak:
    def __init__(self, out: Path, minutes: float, seed: int) -> None:
        self.out, self.seed = out, seed
        self.rng = random.Random(seed)
        self.seconds = max(20, int(minutes * 60))
        self.cfg_path = out / "soak.yaml"
        self.proc: asyncio.subprocess.Process | None = None
        self.runs: list[tuple[int | None, str]] = []  # (exit code, log file) per pipeline process
        self.faults: Counter[str] = Counter()
        self.severity = "warning"
        self.http = ""
        self.scrapes = 0
        self.bad_metrics: set[str] = set()
        self.kills_ms: list[float] = []  # wall clock of each kill -9

    def write_config(self, url: str) -> None:
        text = yaml.safe_dump(config(self.out, url, self.severity), sort_keys=False)
        tmp = self.cfg_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.cfg_path)

    async def start(self) -> None:
        log = self.out / f"run-{len(self.runs)}.log"
        env = {**os.environ, "VIDEO_DB_API_KEY": API_KEY, "PYTHONPATH": str(ROOT)}
        with socket.socket() as sock:  # a free port for this run's /metrics
            sock.bind(("127.0.0.1", 0))
            self.http = f"127.0.0.1:{sock.getsockname()[1]}"
        with log.open("wb") as fh:
            self.proc = await asyncio.create_subprocess_exec(*PIPELINE, str(self.cfg_path), "--http", self.http,
                                                             cwd=self.out, env=env, stdout=fh, stderr=fh)
        self.runs.append((None, str(log)))

    async def scrape(self) -> None:
        """Every 2 s: the running pipeline's lost-event and sink-error counters (any above 0 fails the soak)."""
        import aiohttp

        async with aiohttp.ClientSession() as http:
            while True:
                await asyncio.sleep(2)
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with http.get(f"http://{self.http}/metrics", timeout=aiohttp.ClientTimeout(2)) as r:
                        text = await r.text()
                    self.scrapes += 1
                    self.bad_metrics.update(f"run {len(self.runs) - 1}: {m}" for m in bad_counters(text))

    async def reap(self) -> int:
        assert self.proc is not None
        code = await self.proc.wait()
        self.runs[-1] = (code, self.runs[-1][1])
        return code

    @staticmethod
    async def release(hold: Path, after: float) -> None:
        await asyncio.sleep(after)
        hold.unlink(missing_ok=True)

    async def faults_loop(self, emu: Emulator, until: float) -> None:
        hold = self.out / "gated.jsonl.hold"
        stalls: list[asyncio.Task[None]] = []
        while time.monotonic() < until:
            await asyncio.sleep(self.rng.uniform(4, 15))
            if time.monotonic() >= until:
                return
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise RuntimeError(f"pipeline exited {self.proc.returncode} mid-soak: see {self.runs[-1][1]}")
            fault = self.rng.choice(["drop", "drop", "kill", "stall", "hup", "hup-changed"])
            self.faults[fault] += 1
            print(f"  t+{time.monotonic() - self.t0:6.1f}s fault {fault}", flush=True)
            if fault == "drop":
                await emu.hub.drop()
            elif fault == "kill":
                self.kills_ms.append(time.time() * 1000)
                self.proc.send_signal(signal.SIGKILL)
                await self.reap()
                await asyncio.sleep(self.rng.uniform(0.2, 3.0))  # events produced now go to a dead connection
                await self.start()
            elif fault == "stall":  # released later, in the background: a kill or drop may come meanwhile
                hold.touch()
                stalls.append(asyncio.create_task(self.release(hold, self.rng.uniform(2, 20))))
            else:
                if fault == "hup-changed":
                    self.severity = "critical" if self.severity == "warning" else "warning"
                self.write_config(emu.base_url)
                self.proc.send_signal(signal.SIGHUP)

    async def run(self) -> int:
        scn = scenario(self.out / "scenario.jsonl", self.seconds, self.rng)
        emu = Emulator(scn, speed=1.0, api_key=API_KEY)
        emu.player.emitted = deque()  # keep every event for the check, not the newest 10,000
        await emu.start()
        try:
            self.write_config(emu.base_url)
            self.t0 = time.monotonic()
            await self.start()
            scraper = asyncio.create_task(self.scrape())
            await self.faults_loop(emu, self.t0 + self.seconds - 5)
            (self.out / "gated.jsonl.hold").unlink(missing_ok=True)
            try:
                async with asyncio.timeout(120):  # the session stops, is exported, and the run ends by itself
                    await self.reap()
            except TimeoutError:
                assert self.proc is not None
                self.proc.send_signal(signal.SIGTERM)
                await self.reap()
            scraper.cancel()
        finally:
            if self.proc is not None and self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
            await emu.stop()
        return self.check(emu)

    def check(self, emu: Emulator) -> int:
        def key(ev: dict[str, Any]) -> tuple[Any, ...]:
            d = ev.get("data") or {}
            return (ev.get("rtstream_id"), ev.get("channel"), d.get("start"), d.get("text"))

        produced = {key(r["event"]) for r in emu.emitted if r["event"].get("channel") in TRACKED}
        not_live = {key(r["event"]) for r in emu.emitted if r["event"].get("channel") in TRACKED} - \
            {key(r["event"]) for r in emu.emitted if r["live"] and r["event"].get("channel") in TRACKED}
        pattern = re.compile(rf"\b{KEYWORD}\b", re.I)
        want_alerts = {(k[0], k[1], k[2], k[3]) for k in produced if pattern.search(k[3] or "")}
        failures: list[str] = []
        print(f"seed {self.seed}: {self.seconds}s scenario, faults {dict(self.faults)}, "
              f"{len(self.runs)} pipeline process(es), WebSocket drops {emu.hub.drops}; "
              f"{len(produced)} events produced, {len(not_live)} never sent live, {len(want_alerts)} alerts due")
        for name in ("disk", "memory", "gated"):
            path = self.out / f"{name}.jsonl"
            lines = path.read_bytes().splitlines() if path.exists() else []
            events = []
            for line in lines:
                try:
                    events.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    failures.append(f"{name}: a line that is not JSON: {line[:80]!r}")
            got = Counter(key(e) for e in events if e.get("channel") in TRACKED)
            alerts = Counter((e.get("rtstream_id"), (e.get("data") or {}).get("source_channel"),
                              (e.get("data") or {}).get("timestamp"), (e.get("data") or {}).get("text"))
                             for e in events if e.get("channel") == "alert")
            missing = produced - set(got)
            extra = set(got) - produced
            dups = sum(n - 1 for n in got.values() if n > 1)
            # documented: a restart may write again what started up to 30 s before its checkpoint (saved every
            # 2 s, one period behind), an audio-index segment starting up to 8 s before it is produced
            odd_dups = [k for k, n in got.items() if n > 1 and not any(
                t - DUP_WINDOW_MS <= (k[2] or 0) <= t for t in self.kills_ms)]
            lost_alerts = want_alerts - set(alerts)
            odd_alerts = set(alerts) - want_alerts
            backfilled = sum(1 for e in events if e.get("backfill"))
            print(f"  {name}: {len(events)} lines, {len(got)} distinct tracked events ({backfilled} backfilled), "
                  f"{dups} duplicate(s), missing {len(missing)}, alerts {sum(alerts.values())} "
                  f"({len(alerts)} distinct), alerts missing {len(lost_alerts)}")
            if odd_dups:
                failures.append(f"{name}: {len(odd_dups)} duplicate(s) not within {DUP_WINDOW_MS / 1000:g} s before a "
                                f"kill -9, e.g. {sorted(odd_dups)[:3]}")
            if missing:
                failures.append(f"{name}: {len(missing)} produced event(s) missing, e.g. {sorted(missing)[:3]}")
            if extra:
                failures.append(f"{name}: {len(extra)} event(s) nobody produced, e.g. {sorted(extra)[:3]}")
            if lost_alerts:
                failures.append(f"{name}: {len(lost_alerts)} alert(s) missing, e.g. {sorted(lost_alerts)[:3]}")
            if odd_alerts:
                failures.append(f"{name}: {len(odd_alerts)} alert(s) no event calls for, e.g. {sorted(odd_alerts)[:3]}")
        failures += run_failures(self.runs)
        if self.runs and "ended: capture session exported" not in Path(self.runs[-1][1]).read_text(errors="replace"):
            failures.append(f"last run did not end on the export: {self.runs[-1][1]}")
        return verdict(failures, self.scrapes, self.bad_metrics, self.out, self.seed)


def bad_counters(metrics: str) -> list[str]:
    """The lost-event and sink-error counters above 0 in a /metrics page, as their lines."""
    return [m.group(0) for m in re.finditer(r"^(videodb_pipeline_(?:events_lost|sink_errors)_total)(\{[^}]*\})? "
                                            r"([0-9.e+]+)$", metrics, re.M) if float(m.group(3)) > 0]


def run_failures(runs: list[tuple[int | None, str]]) -> list[str]:
    """What the runs' logs and exit codes show: LOST or a traceback in any run, a last run that did not exit 0."""
    failures = []
    for i, (code, log) in enumerate(runs):
        text = Path(log).read_text(errors="replace")
        if "LOST" in text:
            failures.append(f"run {i}: reports LOST: {log}")
        if "Traceback" in text:
            failures.append(f"run {i}: a traceback: {log}")
        if i == len(runs) - 1 and code != 0:
            failures.append(f"last run exited {code}: {log}")
    return failures


def verdict(failures: list[str], scrapes: int, bad_metrics: set[str], out: Path, seed: int) -> int:
    """Add the /metrics and dead-letter checks, print every failure and the seed's PASS or FAIL; the exit code."""
    print(f"  /metrics scraped {scrapes} times")
    failures = failures + [f"metrics: {m}" for m in sorted(bad_metrics)]
    dl = out / "dead-letter.jsonl"
    if dl.exists() and dl.stat().st_size:
        failures.append(f"dead-letter file not empty: {dl}")
    for f in failures:
        print(f"  FAIL {f}")
    print(f"seed {seed}: {'FAIL' if failures else 'PASS'}", flush=True)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=3.0, help="length of the emulated session (default 3)")
    p.add_argument("--seed", type=int, default=1, help="seed of the scenario texts and the fault schedule")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "soak"), help="work directory (emptied)")
    p.add_argument("--sessions", type=int, default=0, metavar="N",
                   help="soak the session API instead: N sessions at first, more created as it runs "
                        "(see bench/soak_sessions.py)")
    args = p.parse_args(argv)
    if args.sessions < 0:
        p.error("--sessions must be >= 0")
    out = Path(args.out) / (f"sessions-{args.sessions}-seed-{args.seed}" if args.sessions else f"seed-{args.seed}")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, mode=0o700)
    with contextlib.suppress(KeyboardInterrupt):
        if args.sessions:
            from bench.soak_sessions import SessionSoak

            return asyncio.run(SessionSoak(out, args.minutes, args.seed, args.sessions).run())
        return asyncio.run(Soak(out, args.minutes, args.seed).run())
    return 130


if __name__ == "__main__":
    sys.exit(main())
