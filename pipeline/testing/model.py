"""The `*.test.yaml` format: which config, and cases of input events with expectations."""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from pydantic import Field, field_validator, model_validator

from pipeline.api import Options
from pipeline.configfile import read_bytes, read_text
from pipeline.errors import ConfigError
from pipeline.events import deeper_than
from pipeline.yamlpos import MAX_DEPTH, load

INPUT_FILE_BYTES = 64 << 20  # a case's input_file: events, not a recording of a whole day
#: events in a case's input_file: 64 MiB of tiny lines (`{}`) were 20 million events, 5.7 GB of memory
MAX_INPUT_EVENTS = 100_000
BASE_UNIX = 1_700_000_000  # `at: 90s` in an input event = this + 90 seconds (unix_ts)
NO_EVENTS = "no events: without input every expectation that can pass passes whatever the rules do"


class AlertExpect(Options):
    label: str | None = Field(default=None, description="the rule name (data.event_label)")
    rtstream: str | None = Field(default=None, description="rtstream_id or rtstream_name of the alert")
    matched: list[str] | None = Field(default=None, description="keywords that must all be in data.matched")
    severity: str | None = None
    count: int | None = Field(default=None, ge=0, description="exactly this many such alerts; default: at least 1")


class Expect(Options):
    alerts: list[AlertExpect] | None = Field(default=None, description="alerts that must be fired")
    only_these_alerts: bool = Field(default=False, description="every fired alert must match one expectation")
    no_alerts: bool = Field(default=False, description="no alert may be fired")
    events_out: list[dict[str, Any]] | None = Field(
        default=None, description="each must match (subset) an event that comes out, in this order")
    dropped: int | list[dict[str, Any]] | None = Field(
        default=None, description="how many input events are dropped, or input events (subset) that must be")

    @model_validator(mode="after")
    def _something(self) -> Expect:
        if self.no_alerts and self.alerts:
            raise ValueError("no_alerts: true and alerts: [...] contradict each other; keep one")
        if not (self.alerts or self.no_alerts or self.only_these_alerts or self.events_out
                or self.dropped not in (None, [])):  # `dropped: []` names no event: it checks nothing
            raise ValueError("expects nothing, so the case would pass whatever happens; give alerts, no_alerts, "
                             "events_out or dropped")
        return self


class Case(Options):
    name: str
    input: list[dict[str, Any]] | None = Field(default=None, description="events, inline")
    input_file: str | None = Field(default=None, description="events as JSON lines (relative: to the test file)")
    stages: list[str] | None = Field(default=None, description="processors to run, by type or stages[N]")
    expect: Expect

    @field_validator("input")
    @classmethod
    def _some_events(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if v == []:
            raise ValueError(NO_EVENTS)
        return v

    @model_validator(mode="after")
    def _one_input(self) -> Case:
        if (self.input is None) == (self.input_file is None):
            raise ValueError("give exactly one of input (inline events) or input_file")
        return self


class TestFile(Options):
    config: str = Field(description="the pipeline file (relative: to the test file)")
    env: dict[str, str] = Field(default_factory=dict, description="variables for ${VAR} in the config")
    cases: list[Case] = Field(min_length=1)


@dataclass
class LoadedCase:
    case: Case
    events: list[dict[str, Any]]
    where: str


def _at(event: dict[str, Any], where: str) -> dict[str, Any]:
    """The event with `at:` turned into its unix_ts; `where` starts the error line (the event's own `at`, or its
    input_file line: the case's line alone left a bad `at` among 100,000 events to be searched by hand)."""
    if "at" not in event:
        return event
    from pipeline.types import parse_duration

    e = dict(event)
    try:
        e["unix_ts"] = BASE_UNIX + parse_duration(e.pop("at"))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return e


def load_tests(path: Path) -> tuple[TestFile, list[LoadedCase]]:
    """Parse and validate a test file (errors are ConfigErrors with file:line:col)."""
    from pipeline.config import _Checker, path_str
    from pipeline.registry import default_registry

    text = read_text(path, "test")
    unset: list[str] = []
    data, positions = load(text, str(path), {}, unset)
    if isinstance(data, dict) and "cases" not in data and "config" not in data and ("source" in data
                                                                                   or "sinks" in data):
        test = path.with_name(path.name.removesuffix(".yaml").removesuffix(".yml") + ".test.yaml")
        raise ConfigError(f"{path}: a pipeline config, not a test file: tests go in a *.test.yaml file that names "
                          f"it (`config: {path.name}`){f', such as {test}' if test.exists() else ''}")
    if unset:
        data, positions = load(text, str(path), {})  # raises: each unset variable, with its line
    chk = _Checker(str(path), positions, default_registry)
    tf = chk.model(TestFile, data, ())
    chk.raise_errors()
    assert isinstance(tf, TestFile)
    if _is_pipe(path.parent / tf.config):
        raise chk.fail(("config",), _pipe(path.parent / tf.config))
    cases = []
    for i, case in enumerate(tf.cases):
        where = chk.where(("cases", i))
        if case.input is not None:
            raw = [_at(e, f"{chk.where(at)}: {path_str(at)}") for j, e in enumerate(case.input)
                   for at in [("cases", i, "input", j, "at")]]
        else:
            assert case.input_file is not None
            if _is_pipe(path.parent / case.input_file):
                raise chk.fail(("cases", i, "input_file"), _pipe(path.parent / case.input_file))
            raw = _read_jsonl(path.parent / case.input_file, chk.where(("cases", i, "input_file")))
            if not raw:
                why = NO_EVENTS.replace("no events", f"no events in {case.input_file}", 1)
                raise chk.fail(("cases", i, "input_file"), why)
        cases.append(LoadedCase(case, raw, where))
    return tf, cases


def _is_pipe(p: Path) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(p).st_mode)
    except OSError:
        return False  # reported by the read that follows


def _pipe(p: Path) -> str:
    """A config or input_file that is a pipe: reading it waited for a writer for ever (`pipeline test DIR`)."""
    return f"{p}: a named pipe: a test reads only regular files (a pipe waits for a writer and can be read once)"


def _read_jsonl(p: Path, where: str) -> list[dict[str, Any]]:
    try:
        data = read_bytes(p, "JSON lines", INPUT_FILE_BYTES)
    except ConfigError as exc:
        raise ConfigError(f"{where}: input_file: {exc}") from None
    out: list[dict[str, Any]] = []
    for n, line in enumerate(io.BytesIO(data), 1):  # one line at a time: a list of them all cost 36 bytes each
        if not line.strip():
            continue
        if len(out) == MAX_INPUT_EVENTS:
            raise ConfigError(f"{where}: input_file: more than {MAX_INPUT_EVENTS:,} events in {p}: a rule test "
                              "needs a few; cut it to the part the case is about")
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"{p}:{n}: not a JSON line: {exc}") from None
        if not isinstance(event, dict):
            raise ConfigError(f"{p}:{n}: expected a JSON object per line")
        if deeper_than(line, event, MAX_DEPTH):  # as in YAML; deeper, copying it for the case raised RecursionError
            raise ConfigError(f"{p}:{n}: nested more than {MAX_DEPTH} levels deep")
        out.append(_at(event, f"{p}:{n}: at"))
    return out
