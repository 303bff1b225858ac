"""`pipeline test [FILES|DIRS] [--junit PATH]`: run every case, one line each, a diff on failure."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError
from pipeline.termsafe import visible

if TYPE_CHECKING:  # the CLI builds its parser from this module: keep it light
    from pipeline.deadletter import DeadLetter
    from pipeline.testing.run import Result

_SKIP = {"out", "node_modules", "__pycache__"}
DEFAULT_TIMEOUT = 60.0  # seconds a case may take: a processor that never returned held the run (and CI) for ever


class _TooSlow(BaseException):
    """Raised in the case's processor when its time is up (not an Exception: the chain retries on those)."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise _TooSlow in whatever runs after `seconds` (a Python loop, a sleep, a blocking call; not a C loop
    that never checks for signals)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise _TooSlow

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def find_files(paths: list[str]) -> list[Path]:
    """Test files named on the command line, or found (`*.test.yaml`) under named directories."""
    found: list[Path] = []
    for raw in paths or ["."]:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob("*.test.yaml")):
                rel = f.relative_to(p).parts[:-1]
                if any(part.startswith(".") or part in _SKIP for part in rel):
                    continue
                if _is_pipe(f):  # reading it waited for a writer for ever: `pipeline test dir/` hung
                    raise ConfigError(f"{f}: a named pipe, not a test file: not read when found in a directory "
                                      "(name it to read from a pipe)")
                found.append(f)
        elif p.is_file():
            found.append(p)
        else:
            raise ConfigError(f"{raw}: no such test file or directory")
    return found


def shown(text: str) -> str:
    """A failure's text (from a test file and its events), lines kept, control characters made visible. Case
    names (one line: a newline is shown too) and such text printed raw let ESC sequences retitle or clear the
    terminal and a newline forge an `ok` line, and made the JUnit XML unreadable (XML has no such characters)."""
    return "\n".join(visible(line) for line in text.split("\n"))


def _is_pipe(path: Path) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False  # reported by the read that follows


def run_file(path: Path, dead: DeadLetter, timeout: float = DEFAULT_TIMEOUT) -> list[Result]:
    results = []
    for r in _run_file(path, dead, timeout):
        r.file, r.name, r.failures = visible(r.file), visible(r.name), [shown(f) for f in r.failures]
        results.append(r)
    return results


def _run_file(path: Path, dead: DeadLetter, timeout: float) -> list[Result]:
    from pipeline.testing.model import load_tests
    from pipeline.testing.run import Result, load_pipeline, run_case

    try:
        tf, cases = load_tests(path)
        cfg = load_pipeline(path, tf)
    except ConfigError as exc:
        return [Result(str(path), "(test file)", str(exc).splitlines(), error=True)]
    results = []
    for lc in cases:
        started = time.perf_counter()
        error = False
        try:
            with _time_limit(timeout):
                failures = run_case(cfg, lc, dead)
        except _TooSlow:
            failures = [f"did not finish within {timeout:g}s (--timeout): a processor that never returns?"]
        except ConfigError as exc:
            failures, error = str(exc).splitlines(), True
        except Exception as exc:  # a processor that raises is a failed case, not a crashed run
            failures = [f"raised {type(exc).__name__}: {exc}"]
        except SystemExit as exc:  # a plugin's sys.exit(0) ended the whole run with 0: every case "passed"
            failures = [f"called sys.exit({exc.code!r})"]
        results.append(Result(str(path), lc.case.name, failures, time.perf_counter() - started, error))
    return results


def cmd_test(args: argparse.Namespace) -> int:
    import tempfile

    from pipeline.deadletter import DeadLetter

    files = find_files(args.paths)
    if not files:
        print(f"pipeline test: no *.test.yaml files under {' '.join(args.paths) or '.'}", file=sys.stderr)
        return 1
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="pipeline-test-") as tmp:
        dead = DeadLetter(Path(tmp) / "dead-letter.jsonl")
        for f in files:
            for r in run_file(f, dead, args.timeout):
                results.append(r)
                print(f"{'ok   ' if r.ok else 'ERROR' if r.error else 'FAIL '} {r.file}: {r.name}")
                for failure in r.failures:
                    print("      " + failure.replace("\n", "\n      "))
        dead.close()
    failed = sum(not r.ok for r in results)
    errors = sum(r.error for r in results)
    print(f"{len(results) - failed} passed, {failed - errors} failed, {errors} errors "
          f"({len(files)} file{'s' if len(files) != 1 else ''})")
    if args.junit:
        from pipeline.testing.junit import write_junit

        write_junit(Path(args.junit), results)
    return 2 if errors else 1 if failed else 0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86400:  # (NaN too)
        raise argparse.ArgumentTypeError(f"expected seconds from 0 (no limit) to 86400, got {text!r}")
    return value


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    t = sub.add_parser("test", help="run rule tests (*.test.yaml beside a config)", parents=[common])
    t.add_argument("paths", nargs="*", metavar="FILE|DIR", help="test files, or directories to search (default .)")
    t.add_argument("--junit", metavar="PATH", help="also write a JUnit XML report here")
    t.add_argument("--timeout", metavar="SECONDS", type=_seconds, default=DEFAULT_TIMEOUT,
                   help=f"a case that runs longer fails (default {DEFAULT_TIMEOUT:g}; 0: no limit)")
    t.set_defaults(func=cmd_test)
