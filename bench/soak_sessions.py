"""Chaos soak of the session API (`controller.api`): `python -m bench.soak --sessions 8 --minutes 2 --seed 1`.

The emulator runs in this process (manual start, so this soak plays the desktop clients) and every session plays
the single-session soak's scenario (4 rtstreams, about 4 events/s, some with a rule keyword) for 60% of
`--minutes`. `pipeline run` (videodb source, capture_session controller with `api:`, filter, enrich, rules)
writes every session to `by-session/{capture_session_id}.jsonl` (disk buffer) and all of them to `all.jsonl`
(memory buffer). `--sessions` sessions are created through POST /v1/sessions (each with an Idempotency-Key,
retried with it until it answers 201) and started; then, at seeded random moments for `--minutes`: the
emulator drops the WebSocket (POST /_emulator/ws/drop), the run is `kill -9`ed and restarted, VideoDB calls
fail (injected 5xx and 429 answers), sessions are stopped with POST /v1/sessions/{id}/stop and new ones are
created and started. Afterwards the desktop clients stop what still runs, every session ends, and per session:
every transcript, visual and audio event the emulator produced for it is in both sinks under its id, nothing
is there that it did not produce, each rule alert its events call for fired, a session stopped through the API
ends stopped (or exported), the others exported; GET /v1/sessions never lost a session across restarts, no
session was made twice, `/metrics` never showed a lost event or a sink error, no run logged a traceback or LOST.
Exit code 1 when a check fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import socket
import time
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from bench.common import ROOT
from bench.soak import API_KEY, DUP_WINDOW_MS, KEYWORD, PIPELINE, TRACKED, bad_counters, run_failures, scenario, verdict
from pipeline.emulator import Emulator

TOKEN = "soak-session-api-token-0123456789"
Key = tuple[Any, ...]
#: injected VideoDB faults: (method, path part, status, times, Retry-After)
API_FAULTS = [("GET", "/capture/session", 500, 3, None), ("POST", "/capture/session", 503, 1, None),
              ("POST", "/capture/session", 429, 1, "1"), ("POST", "/transcription", 500, 2, None),
              ("POST", "/index/scene", 502, 2, None), ("GET", "/transcription", 500, 2, None),
              ("GET", "/index/scene/", 500, 2, None), ("PATCH", "/status", 500, 1, None)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def key(ev: dict[str, Any]) -> Key:
    d = ev.get("data") or {}
    return (ev.get("rtstream_id"), ev.get("channel"), d.get("start"), d.get("text"))


def alert_key(ev: dict[str, Any]) -> Key:
    d = ev.get("data") or {}
    return (ev.get("rtstream_id"), d.get("source_channel"), d.get("timestamp"), d.get("text"))


class SessionSoak:
    def __init__(self, out: Path, minutes: float, seed: int, sessions: int) -> None:
        self.out, self.seed, self.n = out, seed, sessions
        self.rng = random.Random(seed)
        self.window = max(20.0, minutes * 60)
        self.cfg_path = out / "soak.yaml"
        self.api = f"http://127.0.0.1:{free_port()}"
        self.proc: asyncio.subprocess.Process | None = None
        self.runs: list[tuple[int | None, str]] = []
        self.metrics_at = ""
        self.faults: Counter[str] = Counter()
        self.api_faults: Counter[str] = Counter()
        self.injected: list[Any] = []  # the emulator's Fault objects (their hits)
        self.kills_ms: list[float] = []
        self.created: dict[str, str] = {}  # Idempotency-Key -> session id
        self.tokens: dict[str, str] = {}  # session id -> client token
        self.api_stopped: set[str] = set()
        self.client_stopped: set[str] = set()
        self.failures: list[str] = []
        self.scrapes = 0
        self.bad_metrics: set[str] = set()
        self.retries: Counter[str] = Counter()
        self.tasks: set[asyncio.Task[None]] = set()
        self.http: aiohttp.ClientSession | None = None

    # --- the pipeline process --------------------------------------------------------------------
    def write_config(self, base_url: str) -> None:
        cfg = {
            "name": "soak-sessions",
            "videodb": {"api_key": "${VIDEO_DB_API_KEY}", "base_url": base_url},
            "source": {"type": "videodb", "backoff_initial": "100ms", "backoff_max": "2s"},
            "controller": {"type": "capture_session", "status_poll_interval": "1s",
                           "api": {"listen": self.api.removeprefix("http://"), "token": TOKEN,
                                   "silent_check_interval": "5s"},
                           "on_active": {"transcript": True, "index_visuals": {"prompt": "Describe the screen"},
                                         "index_audio": {"prompt": "Summarize"}}},
            "stages": [{"type": "filter", "channels": [*TRACKED, "alert", "capture_session"]},
                       {"type": "enrich"},
                       {"type": "rules", "rules": [{"name": "secret", "keywords": [KEYWORD], "cooldown": 0}]}],
            "sinks": [{"type": "jsonl", "path": str(self.out / "by-session" / "{capture_session_id}.jsonl"),
                       "flush_interval": "200ms", "buffer": {"type": "disk"}},
                      {"type": "jsonl", "path": str(self.out / "all.jsonl"), "flush_interval": "200ms"}],
            "state_dir": str(self.out / "state"),
            "dead_letter": str(self.out / "dead-letter.jsonl"),
            "runtime": {"drain_timeout": "20s"},
        }
        self.cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    async def start(self) -> None:
        log = self.out / f"run-{len(self.runs)}.log"
        env = {**os.environ, "VIDEO_DB_API_KEY": API_KEY, "PYTHONPATH": str(ROOT)}
        self.metrics_at = f"127.0.0.1:{free_port()}"
        with log.open("wb") as fh:
            self.proc = await asyncio.create_subprocess_exec(*PIPELINE, str(self.cfg_path), "--http",
                                                             self.metrics_at, cwd=self.out, env=env,
                                                             stdout=fh, stderr=fh)
        self.runs.append((None, str(log)))

    async def reap(self) -> int:
        assert self.proc is not None
        code = await self.proc.wait()
        self.runs[-1] = (code, self.runs[-1][1])
        return code

    # --- HTTP ----------------------------------------------------------------------------------
    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        """One session API request; (0, error) when the pipeline did not answer (down, restarting)."""
        assert self.http is not None
        headers = {"Authorization": f"Bearer {TOKEN}", **kw.pop("headers", {})}
        try:
            async with self.http.request(method, self.api + path, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=40), **kw) as r:
                return r.status, await r.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            return 0, repr(exc)

    async def until_ok(self, what: str, attempt: Callable[[], Awaitable[tuple[int, Any]]],
                       ok: tuple[int, ...], deadline: float = 90.0) -> Any:
        """Retry `attempt` while the pipeline is down or answers 5xx; a 4xx other than `ok` fails the soak."""
        until = time.monotonic() + deadline
        while True:
            status, body = await attempt()
            if status in ok:
                return body
            if 400 <= status < 500 and status != 429:
                self.failures.append(f"{what}: {status} {body}")
                return None
            if time.monotonic() > until:
                self.failures.append(f"{what}: no answer within {deadline:g} s, last {status} {body}")
                return None
            self.retries[what.split()[0]] += 1
            await asyncio.sleep(0.5)

    async def emulator(self, emu: Emulator, path: str, body: dict[str, Any] | None = None) -> Any:
        assert self.http is not None
        async with self.http.post(f"{emu.base_url}/_emulator/{path}", json=body) as r:
            data = await r.json()
            if r.status != 200:
                self.failures.append(f"emulator {path}: {r.status} {data}")
            return data.get("data")

    async def all_sessions(self) -> dict[str, dict[str, Any]] | None:
        """Every session GET /v1/sessions lists (all pages), or None when the pipeline does not answer."""
        seen: dict[str, dict[str, Any]] = {}
        after = ""
        while True:
            status, body = await self.call("GET", "/v1/sessions?limit=1000" + (f"&after={after}" if after else ""))
            if status != 200:
                return None
            seen.update((s["session_id"], s) for s in body["sessions"])
            after = body.get("next_after") or ""
            if not after:
                return seen

    # --- what the backend and the desktop clients do ----------------------------------------------
    def spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def create_and_start(self, emu: Emulator, n: int) -> None:
        idem = f"soak-{self.seed}-{n}"
        body = {"end_user_id": f"user-{n}", "metadata": {"n": n}}
        made = await self.until_ok(f"create {idem}", lambda: self.call(
            "POST", "/v1/sessions", json=body, headers={"Idempotency-Key": idem}), (201, 200))
        if made is None:
            return
        sid = made["session_id"]
        if idem in self.created and self.created[idem] != sid:
            self.failures.append(f"{idem}: a retry returned {sid}, the first answer {self.created[idem]}")
        self.created[idem], self.tokens[sid] = sid, made["client_token"]
        await asyncio.sleep(self.rng.uniform(0.2, 3.0))  # the desktop client starts capturing
        await self.emulator(emu, f"sessions/{sid}/start", {"client_token": made["client_token"]})

    async def stop(self, sid: str) -> None:
        self.api_stopped.add(sid)
        await self.until_ok(f"stop {sid}", lambda: self.call("POST", f"/v1/sessions/{sid}/stop"), (202,))

    # --- faults --------------------------------------------------------------------------------
    async def restart(self) -> None:
        """kill -9, a pause, a new run; then GET /v1/sessions must list every session made so far."""
        assert self.proc is not None
        self.kills_ms.append(time.time() * 1000)
        self.proc.send_signal(signal.SIGKILL)
        await self.reap()
        await asyncio.sleep(self.rng.uniform(0.2, 3.0))
        known = set(self.created.values())
        await self.start()
        listed = await self.until_ok("list after restart", self.listing, (200,))
        if listed is not None and (lost := known - set(listed)):
            self.failures.append(f"run {len(self.runs) - 1}: GET /v1/sessions lost {sorted(lost)}")

    async def listing(self) -> tuple[int, Any]:
        got = await self.all_sessions()
        return (0, None) if got is None else (200, got)

    def api_fault(self, emu: Emulator) -> None:
        method, path, status, times, retry_after = self.rng.choice(API_FAULTS)
        self.api_faults[f"{method} {path} {status}"] += 1
        self.injected.append(emu.fault(method, path, status=status, times=times,
                                       headers={"Retry-After": retry_after} if retry_after else None))

    async def faults_loop(self, emu: Emulator) -> None:
        until = self.t0 + self.window
        made = self.n
        while True:
            await asyncio.sleep(self.rng.uniform(3, 10))
            if time.monotonic() >= until:
                return
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise RuntimeError(f"pipeline exited {self.proc.returncode} mid-soak: see {self.runs[-1][1]}")
            fault = self.rng.choice(["drop", "drop", "kill", "api-error", "api-error", "stop", "create"])
            running = sorted(s.id for s in emu.registry.sessions.values()
                             if s.status in ("created", "starting", "active") and s.id not in self.api_stopped
                             and s.id in self.tokens)
            if fault == "stop" and not running:
                fault = "create"
            self.faults[fault] += 1
            print(f"  t+{time.monotonic() - self.t0:6.1f}s fault {fault}", flush=True)
            if fault == "drop":
                await self.emulator(emu, "ws/drop")
            elif fault == "kill":
                await self.restart()
            elif fault == "api-error":
                self.api_fault(emu)
            elif fault == "stop":
                self.spawn(self.stop(self.rng.choice(running)))
            else:
                self.spawn(self.create_and_start(emu, made))
                made += 1

    async def scrape(self) -> None:
        assert self.http is not None
        while True:
            await asyncio.sleep(2)
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with self.http.get(f"http://{self.metrics_at}/metrics",
                                         timeout=aiohttp.ClientTimeout(2)) as r:
                    text = await r.text()
                self.scrapes += 1
                self.bad_metrics.update(f"run {len(self.runs) - 1}: {m}" for m in bad_counters(text))

    # --- the run -------------------------------------------------------------------------------
    async def run(self) -> int:
        scn = scenario(self.out / "scenario.jsonl", int(self.window * 0.6), self.rng)
        emu = Emulator(scn, speed=1.0, api_key=API_KEY, autostart=False)
        emu.player.emitted = deque()  # every event, for the check
        await emu.start()
        self.http = aiohttp.ClientSession()
        listed: dict[str, dict[str, Any]] | None = None
        try:
            self.write_config(emu.base_url)
            self.t0 = time.monotonic()
            await self.start()
            scraper = asyncio.create_task(self.scrape())
            for n in range(self.n):
                self.spawn(self.create_and_start(emu, n))
            await self.faults_loop(emu)
            emu.faults.clear()
            if self.tasks:
                await asyncio.wait(set(self.tasks))
            listed = await self.finish(emu)
            scraper.cancel()
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(60):
                    await self.reap()
            except TimeoutError:
                self.failures.append("the last run did not end within 60 s of SIGTERM")
        finally:
            if self.proc is not None and self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
            await self.http.close()
            await emu.stop()
        return self.check(emu, listed or {})

    async def finish(self, emu: Emulator) -> dict[str, dict[str, Any]] | None:
        """The desktop clients stop what still runs; wait for every session to end at VideoDB and in the API,
        then for the sinks to settle. The last listing of GET /v1/sessions."""
        for s in list(emu.registry.sessions.values()):
            if s.status in ("created", "starting", "active") and s.id not in self.api_stopped:
                self.client_stopped.add(s.id)
                await self.emulator(emu, f"sessions/{s.id}/stop", {"client_token": self.tokens.get(s.id)})
        ended = ("exported", "stopped", "failed")
        listed: dict[str, dict[str, Any]] | None = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(120):
                while True:
                    listed = await self.all_sessions()
                    if emu.registry.all_finished() and listed is not None and all(
                            listed.get(sid, {}).get("status") in ended for sid in self.created.values()):
                        break
                    await asyncio.sleep(1)
        sizes: list[int] = []
        until = time.monotonic() + 60
        while time.monotonic() < until and (len(sizes) < 4 or len(set(sizes[-4:])) > 1):
            sizes.append(sum(p.stat().st_size for p in self.out.glob("**/*.jsonl") if p.is_file()))
            await asyncio.sleep(1)
        return await self.all_sessions() or listed

    # --- checks --------------------------------------------------------------------------------
    def check(self, emu: Emulator, listed: dict[str, dict[str, Any]]) -> int:
        owner = {rid: s.id for rid, s in emu.registry.by_stream.items()}
        produced: dict[str, set[Key]] = defaultdict(set)
        for r in emu.emitted:
            ev = r["event"]
            if ev.get("channel") in TRACKED:
                produced[owner[ev["rtstream_id"]]].add(key(ev))
        pattern = re.compile(rf"\b{KEYWORD}\b", re.I)
        made = set(self.created.values())
        failures = self.failures
        retried = self.failed_backfills(emu)
        print(f"seed {self.seed}: {len(made)} sessions ({len(self.api_stopped)} stopped through the API, "
              f"{len(self.client_stopped)} by their client at the end), faults {dict(self.faults)}, "
              f"VideoDB errors {dict(self.api_faults)} ({sum(f.hits for f in self.injected)} hit), "
              f"{len(self.runs)} pipeline process(es), WebSocket drops {emu.hub.drops}, "
              f"API retries {dict(self.retries)}; {sum(map(len, produced.values()))} events produced")
        if orphans := set(emu.registry.sessions) - made:
            failures.append(f"{len(orphans)} session(s) made at VideoDB that no create returned: {sorted(orphans)}")
        sinks = {"by-session": self.by_session(failures), "all": self.read(self.out / "all.jsonl", failures)}
        for sink, lines in sinks.items():
            per: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for ev in lines:
                per[str(ev.get("capture_session_id"))].append(ev)
            if strays := set(per) - made:
                failures.append(f"{sink}: events of session(s) nobody made: {sorted(strays)}")
            dups_total = missing_total = after_failed = 0
            for sid in sorted(made):
                evs = per.get(sid, [])
                got = Counter(key(e) for e in evs if e.get("channel") in TRACKED)
                alerts = {alert_key(e) for e in evs if e.get("channel") == "alert"}
                want = produced.get(sid, set())
                want_alerts = {k for k in want if pattern.search(k[3] or "")}
                missing, extra = want - set(got), set(got) - want
                dups = sum(n - 1 for n in got.values() if n > 1)
                odd = [k for k, n in got.items() if n > 1 and (k[0], k[1]) not in retried and not any(
                    t - DUP_WINDOW_MS <= (k[2] or 0) <= t for t in self.kills_ms)]
                dups_total += dups
                after_failed += sum(n - 1 for k, n in got.items() if n > 1 and (k[0], k[1]) in retried)
                missing_total += len(missing)
                tag = f"{sink} {sid}"
                if missing:
                    failures.append(f"{tag}: {len(missing)} of {len(want)} produced event(s) missing, "
                                    f"e.g. {sorted(missing)[:2]}")
                if extra:
                    failures.append(f"{tag}: {len(extra)} event(s) it did not produce, e.g. {sorted(extra)[:2]}")
                if odd:
                    failures.append(f"{tag}: {len(odd)} duplicate(s) not within {DUP_WINDOW_MS / 1000:g} s before "
                                    f"a kill -9, e.g. {sorted(odd)[:2]}")
                if lost := want_alerts - alerts:
                    failures.append(f"{tag}: {len(lost)} alert(s) missing, e.g. {sorted(lost)[:2]}")
                if odd_alerts := alerts - want_alerts:
                    failures.append(f"{tag}: {len(odd_alerts)} alert(s) no event of it calls for")
            print(f"  {sink}: {len(lines)} lines, {dups_total} duplicate(s) ({after_failed} on a channel whose "
                  f"backfill failed once), {missing_total} missing")
        for sid in sorted(made):
            status = listed.get(sid, {}).get("status")
            want = ("stopped", "exported") if sid in self.api_stopped else ("exported",)
            if sid not in listed:
                failures.append(f"{sid}: not in the last GET /v1/sessions")
            elif status not in want:
                failures.append(f"{sid}: ends {status} ({listed[sid].get('error')}), expected {' or '.join(want)}")
        print("  sessions: " + ", ".join(f"{sid} {listed.get(sid, {}).get('status')}"
                                        f"{' (API stop)' if sid in self.api_stopped else ''}"
                                        f" {len(produced.get(sid, ()))} ev" for sid in sorted(made)))
        return verdict(failures + run_failures(self.runs), self.scrapes, self.bad_metrics, self.out, self.seed)

    def failed_backfills(self, emu: Emulator) -> set[tuple[str, str]]:
        """(rtstream id, channel) of every backfill a run logged as failed. Its gap mark stays, and the retry
        (at the next re-bind) reads again from 30 s before it: what arrived live meanwhile and is more than 30 s
        older than the newest event is written again (documented: past the dedupe window)."""
        out: set[tuple[str, str]] = set()
        for _code, log in self.runs:
            for m in re.finditer(r"capture_session (cap-\S+): backfill (\S+) (\w+) failed", Path(log).read_text()):
                s = emu.registry.sessions.get(m.group(1))
                out.update((rid, m.group(3)) for rid, st in (s.streams.items() if s else ()) if st.name == m.group(2))
        return out

    def by_session(self, failures: list[str]) -> list[dict[str, Any]]:
        """Every line of by-session/*.jsonl; one under another session's file name fails the soak."""
        out: list[dict[str, Any]] = []
        for path in sorted((self.out / "by-session").glob("*.jsonl")):
            for ev in self.read(path, failures):
                if ev.get("capture_session_id") != path.stem:
                    failures.append(f"{path.name}: an event of {ev.get('capture_session_id')!r}")
                out.append(ev)
        return out

    @staticmethod
    def read(path: Path, failures: list[str]) -> list[dict[str, Any]]:
        out = []
        for line in path.read_bytes().splitlines() if path.exists() else []:
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                failures.append(f"{path.name}: a line that is not JSON: {line[:80]!r}")
        return out
