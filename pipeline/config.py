"""Load and validate a pipeline YAML file into typed, resolved stage specs.

Every error is one line: `file:line:col: key.path: what was expected`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from pipeline.api import Options, Stage
from pipeline.errors import ConfigError
from pipeline.registry import LookupFailed, Registry, default_registry
from pipeline.types import Duration, Secret
from pipeline.yamlpos import Path_, Positions, load

TOP_KEYS = ("name", "videodb", "source", "controller", "stages", "sinks", "runtime", "dead_letter")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class EmulatorSettings(Options):
    """Run the local VideoDB emulator in-process and point the SDK at it (offline demos)."""

    scenario: str | None = Field(default=None, description="scenario file; default config/scenarios/meeting.yaml")
    speed: float = Field(default=1.0, ge=0, description="1 = scenario timing, 20 = 20x faster, 0 = no waiting")
    drop_after: int | None = Field(default=None, ge=1, description="close the WebSocket after N events")
    garbage_every: int | None = Field(default=None, ge=1, description="send a non-JSON frame every N events")


class VideoDBSettings(Options):
    """Shared by the videodb source and the capture-session controller."""

    api_key: Secret | None = None
    base_url: str | None = None
    collection_id: str = "default"
    emulator: EmulatorSettings | None = Field(default=None, description="start a local emulator instead of the cloud")


class RuntimeSettings(Options):
    """How the pipeline runs: one process (local) or faust workers over Kafka."""

    engine: Literal["local", "faust"] = "local"
    broker: str = "kafka://localhost:9092"
    partitions: int = Field(default=4, ge=1)
    queue_size: int = Field(default=16, ge=1, description="batches buffered per sink before backpressure")
    drain_timeout: Duration = Field(default=30.0, description="on shutdown, how long sinks may take to flush")
    http: str | None = Field(default=None, description="serve /metrics, /healthz, /ready, /tap and a status page "
                             "at HOST:PORT, e.g. 127.0.0.1:9464 (off by default)")
    http_token: Secret | None = Field(default=None, description="bearer token for /tap and the status page; "
                                      "needed for them on a non-loopback address")
    status_interval: Duration = Field(default=60.0, description="log a status line this often (0 = never)")

    @field_validator("http")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None:
            from pipeline.http.address import parse_address

            parse_address(v)
        return v


@dataclass
class StageSpec:
    """One configured stage: its class, validated options and where it was written."""

    kind: str
    type_name: str
    cls: type[Stage]
    options: Options
    path: str
    where: str
    enabled: bool = True

    @property
    def label(self) -> str:
        return f"{self.path}:{self.type_name}"


@dataclass
class PipelineConfig:
    name: str
    file: Path
    source: StageSpec
    sinks: list[StageSpec]
    stages: list[StageSpec] = field(default_factory=list)
    controller: StageSpec | None = None
    videodb: VideoDBSettings = field(default_factory=VideoDBSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    dead_letter: Path = Path("out/dead-letter.jsonl")

    @property
    def out_dir(self) -> Path:
        return Path("out") / self.name

    def settings(self) -> dict[str, Any]:
        """Plain settings handed to stages through Context.settings."""
        key = self.videodb.api_key
        return {"videodb": {"api_key": key.get_secret_value() if key else None,
                            "base_url": self.videodb.base_url,
                            "collection_id": self.videodb.collection_id}}


_PLAIN_KEY = re.compile(r"^[\w-]+$")


def path_str(path: Path_) -> str:
    """`stages[2].rules[0].cooldown`; odd keys are quoted (`source['a b']`) so a message stays one line."""
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not _PLAIN_KEY.match(p):
            out += f"[{p!r}]"
        else:
            out += f".{p}" if out else p
    return out or "<top>"


class _Checker:
    def __init__(self, filename: str, positions: Positions, registry: Registry) -> None:
        self.filename = filename
        self.positions = positions
        self.registry = registry

    def where(self, path: Path_) -> str:
        for n in range(len(path), -1, -1):
            pos = self.positions.get(tuple(path[:n]))
            if pos:
                return f"{self.filename}:{pos[0]}:{pos[1]}"
        return self.filename

    def fail(self, path: Path_, message: str) -> ConfigError:
        return ConfigError(f"{self.where(path)}: {path_str(path)}: {message}")

    def model(self, model: type[BaseModel], data: Any, path: Path_) -> Any:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise self.fail(path, f"expected a mapping, got {type(data).__name__}")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise self.explain(model, exc, path, data) from None

    def explain(self, model: type[BaseModel], exc: ValidationError, base: Path_, data: Any) -> ConfigError:
        errors = exc.errors(include_url=False)
        err = errors[0]
        loc = _data_loc(data, err["loc"], keep_last=err["type"] == "missing")
        full = (*base, *loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            fields = _fields_at(model, loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), fields, n=1)
            msg = f"unknown key{' (did you mean ' + repr(hint[0]) + '?)' if hint else ''}"
            if not hint and fields:
                msg += f"; expected one of: {', '.join(fields)}"
        elif kind == "missing":
            msg = "required key is missing"
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            got = err.get("input")
            if "got" not in msg and not isinstance(got, dict | list):
                msg += f", got {_show(got, full)}"
        more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        return self.fail(full, msg + more)

    def stage(self, kind: str, data: Any, path: Path_) -> StageSpec:
        if not isinstance(data, dict):
            raise self.fail(path, f"expected a mapping with a 'type' key, got {type(data).__name__}")
        type_name = data.get("type")
        if not isinstance(type_name, str) or not type_name:
            raise self.fail((*path, "type") if "type" in data else path,
                            f"expected a {kind} type name such as {self.registry.names(kind)[:4]}")
        try:
            cls = self.registry.resolve(kind, type_name)
        except LookupFailed as exc:
            raise self.fail((*path, "type"), str(exc)) from None
        enabled = data.get("enabled", True)
        if not isinstance(enabled, bool):
            raise self.fail((*path, "enabled"), f"expected true or false, got {enabled!r}")
        opts = {k: v for k, v in data.items() if k not in ("type", "enabled")}
        options = self.model(cls.Options, opts, path)
        return StageSpec(kind, type_name, cls, options, path_str(path), self.where(path), enabled)


def _data_loc(data: Any, loc: tuple[Any, ...], *, keep_last: bool) -> tuple[Any, ...]:
    """The part of a pydantic error location that is a path in the user's data.

    pydantic adds union-member tags (`list[str]`, `function-before[...]`) to locations; they are
    not in the data, so they are dropped. A missing key is kept: it is what the message is about.
    """
    out: list[Any] = []
    node = data
    for n, p in enumerate(loc):
        present = (isinstance(node, dict) and p in node) or (
            isinstance(node, list) and isinstance(p, int) and 0 <= p < len(node))
        if present:
            node = node[p]
        elif not (keep_last and n == len(loc) - 1):
            continue
        out.append(p)
    return tuple(out)


def _show(value: Any, path: Path_) -> str:
    if any(isinstance(p, str) and ("key" in p or "secret" in p or "token" in p) for p in path):
        return "***"
    return repr(value)


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field_info = getattr(current, "model_fields", {}).get(part)
        if field_info is None:
            return []
        current = inner_model(field_info.annotation)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = inner_model(arg)
        if found is not None:
            return found
    return None


def _enabled(spec: StageSpec | None) -> StageSpec | None:
    return spec if spec is not None and spec.enabled else None


def parse(data: Any, positions: Positions, filename: str, registry: Registry | None = None) -> PipelineConfig:
    """Validate already-loaded YAML data into a PipelineConfig."""
    chk = _Checker(filename, positions, registry or default_registry)
    if not isinstance(data, Mapping):
        raise chk.fail((), "expected a mapping with name, source, stages and sinks")
    for key in data:
        if key not in TOP_KEYS:
            hint = difflib.get_close_matches(key, TOP_KEYS, n=1)
            raise chk.fail((key,), "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else
                                                    f"; expected one of: {', '.join(TOP_KEYS)}"))
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise chk.fail(("name",), f"expected a pipeline name (letters, digits, _.-), got {name!r}")
    if "source" not in data:
        raise chk.fail((), "required key 'source' is missing")
    if isinstance(data["source"], dict) and data["source"].get("enabled") is False:
        raise chk.fail(("source", "enabled"), "the source cannot be disabled")
    sinks = data.get("sinks")
    if not isinstance(sinks, list) or not sinks:
        raise chk.fail(("sinks",), "expected a non-empty list of sinks")
    if all(isinstance(s, dict) and s.get("enabled") is False for s in sinks):
        raise chk.fail(("sinks",), "every sink is disabled (enabled: false)")
    stages = data.get("stages") or []
    if not isinstance(stages, list):
        raise chk.fail(("stages",), "expected a list of processors")
    dead = data.get("dead_letter", f"out/{name}/dead-letter.jsonl")
    if not isinstance(dead, str) or not dead:
        raise chk.fail(("dead_letter",), f"expected a file path, got {dead!r}")
    return PipelineConfig(
        name=name,
        file=Path(filename),
        videodb=chk.model(VideoDBSettings, data.get("videodb"), ("videodb",)),
        source=chk.stage("source", data["source"], ("source",)),
        controller=_enabled(chk.stage("controller", data["controller"], ("controller",))
                            if data.get("controller") is not None else None),
        stages=[s for s in (chk.stage("processor", s, ("stages", i)) for i, s in enumerate(stages)) if s.enabled],
        sinks=[s for s in (chk.stage("sink", s, ("sinks", i)) for i, s in enumerate(sinks)) if s.enabled],
        runtime=chk.model(RuntimeSettings, data.get("runtime"), ("runtime",)),
        dead_letter=Path(dead),
    )


def load_config(path: str | Path, env: Mapping[str, str] | None = None,
                registry: Registry | None = None) -> PipelineConfig:
    """Read, interpolate and validate a pipeline file. Raises ConfigError (one line)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read config: {exc}") from None
    data, positions = load(text, str(p), env)
    return parse(data, positions, str(p), registry)
