"""Load and validate a pipeline YAML file into typed, resolved stage specs.

Every error is one line: `file:line:col: key.path: what was expected`; every error
of a file is reported at once. Relative paths of files a config reads resolve
against the config file's directory (see `pipeline.paths`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from pipeline.api import Options, Stage
from pipeline.channels import check_channels
from pipeline.configfile import base_dir, read_text
from pipeline.deadletter import DEFAULT_MAX_BYTES, MIN_MAX_BYTES, size_text
from pipeline.errors import ConfigError, suggest
from pipeline.net import VIDEODB_URL_EXAMPLE, http_url
from pipeline.paths import resolve_inputs
from pipeline.registry import LookupFailed, Registry, default_registry
from pipeline.rulenames import check_rule_names
from pipeline.types import Duration, Secret, parse_bytes
from pipeline.windowkeys import check_window_keys
from pipeline.yamlpos import Path_, Positions, load

TOP_KEYS = ("name", "videodb", "source", "controller", "stages", "sinks", "runtime", "dead_letter",
            "dead_letter_max_bytes", "state_dir", "channels")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class EmulatorSettings(Options):
    """Run the local VideoDB emulator in-process and point the SDK at it (offline demos)."""

    scenario: str | None = Field(default=None, description="scenario file; default config/scenarios/meeting.yaml",
                                 json_schema_extra={"path": "input"})
    speed: float = Field(default=1.0, ge=0, description="1 = scenario timing, 20 = 20x faster, 0 = no waiting")
    drop_after: int | None = Field(default=None, ge=1, description="close the WebSocket after N events")
    queue_on_drop: bool = Field(default=False, description="resend what a dropped connection missed (VideoDB does not)")
    garbage_every: int | None = Field(default=None, ge=1, description="send a non-JSON frame every N events")


class VideoDBSettings(Options):
    """Shared by the videodb source and the capture-session controller."""

    api_key: Secret | None = None
    base_url: str | None = None
    collection_id: str = "default"
    emulator: EmulatorSettings | None = Field(default=None, description="start a local emulator instead of the cloud")

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str | None) -> str | None:
        return None if v is None else http_url(v, VIDEODB_URL_EXAMPLE)


class RuntimeSettings(Options):
    """How the pipeline runs: one process (local) or faust workers over Kafka."""

    engine: Literal["local", "faust"] = "local"
    broker: str = "kafka://localhost:9092"
    partitions: int = Field(default=4, ge=1, le=1024, description="faust: partitions of <name>-ingest and the "
                            "state changelogs, the most workers that can share the work")
    queue_size: int = Field(default=16, ge=1, description="batches buffered per sink before backpressure")
    fetch_max_wait: Duration = Field(default=0.01, gt=0, le=30, description="faust workers: longest a fetch "
                                     "waits at the broker for new records (some brokers answer only then)")
    batch_wait: Duration = Field(default=0.0, ge=0, le=30, description="faust workers: 0 = process the "
                                 "records waiting as soon as they arrive; else wait up to this long to fill a "
                                 "batch (up to 1,000 records) before processing it")
    publish_interval: Duration = Field(default=0.015, ge=0, le=30, description="faust ingest: at most one publish "
                                       "round per interval; what arrives meanwhile goes out together in the next")
    drain_timeout: Duration = Field(default=30.0, description="on shutdown, how long sinks may take to flush")
    http: str | None = Field(default=None, description="serve /metrics, /healthz, /ready, /tap and a status page "
                             "at HOST:PORT, e.g. 127.0.0.1:9464 (off by default)",
                             json_schema_extra={"anyOf": [{"type": "string"}, {"type": "null"},  # `9464` alone too
                                                          {"type": "integer", "minimum": 0, "maximum": 65535}]})
    http_token: Secret | None = Field(default=None, description="bearer token for /tap and the status page; "
                                      "needed for them on a non-loopback address")
    status_interval: Duration = Field(default=60.0, description="log a status line this often (0 = never; "
                                      "else at least 1s)")

    @field_validator("http_token", mode="before")
    @classmethod
    def _no_empty_token(cls, v: object) -> object:
        return None if v == "" else v  # `${PIPELINE_HTTP_TOKEN:-}` unset means no token

    @field_validator("broker")
    @classmethod
    def _broker(cls, v: str) -> str:
        from pipeline.kafka import bootstrap_list

        bootstrap_list(v)  # a typo is one config line here, not a traceback or endless retries at run time
        return v

    @field_validator("status_interval")
    @classmethod
    def _status_every(cls, v: float) -> float:
        if 0 < v < 1:  # a line every millisecond would bury everything else in the log
            raise ValueError("expected at least 1s (0 turns it off)")
        return v

    @field_validator("http", mode="before")
    @classmethod
    def _port_alone(cls, v: object) -> object:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v  # `http: 9464` (YAML: a number)

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
    dead_letter_max_bytes: int = DEFAULT_MAX_BYTES  # past it, rejects are counted and not written
    state_dir_setting: Path | None = None  # top-level `state_dir:`; None = out/<name>
    new_session: bool = False  # `pipeline run --new-session`: never attach to the saved capture session
    http_override: str | None = None  # `--http ADDR` on the command line: runtime.http, also after a reload
    disabled: list[StageSpec] = field(default_factory=list)
    channels: list[str] = field(default_factory=list)
    digest: bytes | None = None  # sha256 of the file as read (`--watch` reloads when the file no longer has it)
    key_where: dict[str, str] = field(default_factory=dict)  # `source.path` -> `p.yaml:7:3`, for later checks

    def where(self, key: str, default: str) -> str:
        """`file:line:col` of a key path such as `sinks[0].ca_file` (for checks made after loading)."""
        return self.key_where.get(key, default)

    @property
    def state_dir(self) -> Path:
        """Where everything that must survive a restart lives (see pipeline.state)."""
        return self.state_dir_setting or Path("out") / self.name

    @property
    def out_dir(self) -> Path:
        return self.state_dir

    def settings(self) -> dict[str, Any]:
        """Plain settings handed to stages through Context.settings."""
        key = self.videodb.api_key
        return {"videodb": {"api_key": key.get_secret_value() if key else None,
                            "base_url": self.videodb.base_url,
                            "collection_id": self.videodb.collection_id},
                "new_session": self.new_session,
                "drain_timeout": self.runtime.drain_timeout}  # a source's stop reads on at most this long


_PLAIN_KEY = re.compile(r"[\w-]+")


def path_str(path: Path_) -> str:
    """`stages[2].rules[0].cooldown`; odd keys are quoted (`source['a b']`) so a message stays one line."""
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not _PLAIN_KEY.fullmatch(p):
            out += f"[{p!r}]"
        else:
            out += f".{p}" if out else p
    return out or "<top>"


MAX_ERRORS = 20


class _Checker:
    """Collects every error of one file (up to MAX_ERRORS), each `file:line:col: key.path: message`."""

    def __init__(self, filename: str, positions: Positions, registry: Registry,
                 search: tuple[Path, ...] = (), placeholders: Sequence[str] = (),
                 texts: Mapping[Path_, str] | None = None, typed: Mapping[Path_, Any] | None = None) -> None:
        self.texts = texts or {}  # see yamlpos.load
        self.typed = typed or {}  # see yamlpos.load
        self.filename = filename
        self.positions = positions
        self.registry = registry
        self.search = search
        self.placeholders = placeholders  # unset ${VAR}s that `validate --offline` left in place
        self.errors: list[str] = []

    def where(self, path: Path_) -> str:
        for n in range(len(path), -1, -1):
            pos = self.positions.get(tuple(path[:n]))
            if pos:
                return f"{self.filename}:{pos[0]}:{pos[1]}"
        return self.filename

    def line(self, path: Path_, message: str) -> str:
        return f"{self.where(path)}: {path_str(path)}: {message}"

    def fail(self, path: Path_, message: str) -> ConfigError:
        return ConfigError(self.line(path, message))

    def add(self, path: Path_, message: str) -> None:
        text = self.line(path, message)
        if text not in self.errors:
            self.errors.append(text)

    def raise_errors(self) -> None:
        if self.errors:
            errs = sorted(self.errors, key=_position_key)
            shown = errs[:MAX_ERRORS]
            if len(errs) > MAX_ERRORS:
                shown.append(f"{self.filename}: ... and {len(errs) - MAX_ERRORS} more errors")
            raise ConfigError("\n".join(shown))

    def model(self, model: type[BaseModel], data: Any, path: Path_) -> Any:
        """The validated model, or None after recording every error in `data`."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.add(path, f"expected a mapping, got {_type_name(data)}")
            return None
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            retry = self._as_text(exc, data, path)
            if retry is None:
                retry = self._as_typed(exc, data, path)
            if retry is not None:
                return self.model(model, retry, path)
            for p, msg in explain(model, exc, data):
                self.add((*path, *p), self._offline(_value_at(data, p)) or msg)
            return None
        except Exception as exc:  # a plugin's validator raising what pydantic does not turn into an error (KeyError)
            why = (str(exc).splitlines() or [""])[0][:300]
            self.add(path, f"checking the options raised {type(exc).__name__}: {why} (a bug in {model.__name__})")
            return None

    def _as_text(self, exc: ValidationError, data: dict[str, Any], path: Path_) -> dict[str, Any] | None:
        """`data` with the `${VAR}` texts back where a string was expected and YAML had read a number (COLL=42 in
        `collection_id: ${COLL}`), a boolean or null; None when there is none."""
        fixes = {}
        for err in exc.errors(include_url=False):
            if err["type"] == "string_type":
                loc = _data_loc(data, err["loc"], keep_last=False)
                if (*path, *loc) in self.texts and loc:
                    fixes[loc] = self.texts[(*path, *loc)]
        return _replaced(data, fixes)

    def _as_typed(self, exc: ValidationError, data: dict[str, Any], path: Path_) -> dict[str, Any] | None:
        """`data` with each quoted `"${VAR}"` that failed as a string replaced by what YAML reads unquoted (a
        number, a boolean or null; `{max_text: "${N:-80}"}`: flow mappings need the quotes); None when none."""
        fixes = {}
        for err in exc.errors(include_url=False):
            loc = _data_loc(data, err["loc"], keep_last=False)
            if loc and (*path, *loc) in self.typed and isinstance(_value_at(data, loc), str):
                fixes[loc] = self.typed[(*path, *loc)]
        return _replaced(data, fixes)

    def _offline(self, value: Any) -> str | None:
        """For a value that is an --offline placeholder: why it fails, instead of the validator's words."""
        names = placeholders_in(value, self.placeholders)
        if not names:
            return None
        return (f"{names[0]} is not set, and its --offline placeholder is not a valid value here; "
                f"export it, or give it a default: ${{{names[0]}:-value}}")

    def stage(self, kind: str, data: Any, path: Path_) -> StageSpec | None:
        if not isinstance(data, dict):
            self.add(path, f"expected a mapping with a 'type' key, got {_type_name(data)}")
            return None
        type_name = data.get("type")
        if not isinstance(type_name, str) or not type_name:
            self.add((*path, "type") if "type" in data else path,
                     f"expected a {kind} type name such as {', '.join(self.registry.names(kind)[:4])}")
            return None
        try:
            cls = self.registry.resolve(kind, type_name, search=self.search)
        except LookupFailed as exc:
            self.add((*path, "type"), str(exc))
            return None
        enabled = data.get("enabled", True)
        if isinstance(enabled, str) and isinstance(self.typed.get((*path, "enabled")), bool):
            enabled = self.typed[(*path, "enabled")]  # `{type: kafka, enabled: "${KAFKA_SINK:-false}"}`
        if not isinstance(enabled, bool):
            self.add((*path, "enabled"), f"expected true or false, got {enabled!r}")
        opts = {k: v for k, v in data.items() if k not in ("type", "enabled")}
        options = self.model(cls.Options, opts, path)  # checked either way: every error of the stage at once
        if options is None or not isinstance(enabled, bool):
            return None
        return StageSpec(kind, type_name, cls, options, path_str(path), self.where(path), enabled)


def placeholders_in(value: Any, names: Sequence[str]) -> list[str]:
    """Which of the unset variables `names` a value still holds as `${NAME}` (what `--offline` leaves)."""
    return [name for name in names if f"${{{name}}}" in value] if isinstance(value, str) else []


def _replaced(data: dict[str, Any], fixes: dict[tuple[Any, ...], Any]) -> dict[str, Any] | None:
    """A copy of `data` with the value at each location of `fixes` replaced; None when there is none."""
    if not fixes:
        return None
    out: dict[str, Any] = copy.deepcopy(data)
    for loc, value in fixes.items():
        node: Any = out
        for key in loc[:-1]:
            node = node[key]
        node[loc[-1]] = value
    return out


def _value_at(data: Any, path: Path_) -> Any:
    """The user's value at a key path, or None."""
    for key in path:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _position_key(line: str) -> tuple[int, int]:
    parts = line.split(":", 3)
    try:
        return int(parts[1]), int(parts[2])
    except (IndexError, ValueError):
        return 0, 0


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", int: "an integer", float: "a number",
            bool: "true/false", type(None): "nothing"}.get(type(value), type(value).__name__)


def _plain(err: Any, got: Any) -> str:
    """pydantic's message in plain words (`expected an integer, got 'lots'`)."""
    kind, ctx = err["type"], err.get("ctx") or {}
    simple = {"int_parsing": "expected an integer", "int_type": "expected an integer",
              "int_from_float": "expected a whole number", "float_parsing": "expected a number",
              "float_type": "expected a number", "finite_number": "expected a finite number",
              "bool_parsing": "expected true or false",
              "bool_type": "expected true or false", "string_type": "expected a string",
              "list_type": "expected a list", "dict_type": "expected a mapping", "model_type": "expected a mapping",
              "model_attributes_type": "expected a mapping", "tuple_type": "expected a list",
              "url_parsing": "expected a URL", "url_scheme": "expected a URL"}
    if kind in simple:
        return f"{simple[kind]}, got {_show_type(got)}"
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected', '')}, got {got!r}".replace(" or ", ", ")
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        limit = next(iter(ctx.values()), "?")
        return f"expected a number {op} {limit}, got {got!r}"
    if kind == "too_short":
        n = ctx.get("min_length", 1)
        return f"expected at least {n} item{'s' if n != 1 else ''}"
    if kind == "too_long":
        return f"expected at most {ctx.get('max_length', '?')} items"
    if kind == "string_too_short":
        return "expected a non-empty string"
    msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if msg[:1].isupper() and not msg[1:2].isupper():
        msg = msg[0].lower() + msg[1:]
    return msg


def _show_type(got: Any) -> str:
    if isinstance(got, dict | list) or got is None:
        return _type_name(got)
    return repr(got)


def explain(model: type[BaseModel], exc: ValidationError, data: Any) -> list[tuple[Path_, str]]:
    """Every error of a ValidationError as (path in the user's data, plain message).

    A missing required key beside an unknown key that is a near miss of it becomes
    one "did you mean" error at the unknown key.
    """
    out: list[tuple[Path_, str]] = []
    errors = exc.errors(include_url=False)
    missing: dict[tuple[Any, ...], list[str]] = {}
    for err in errors:
        if err["type"] == "missing":
            loc = _data_loc(data, err["loc"], keep_last=True)
            missing.setdefault(loc[:-1], []).append(str(loc[-1]))
    explained_missing: set[tuple[Any, ...]] = set()
    seen: set[Path_] = set()
    for err in errors:
        kind = err["type"]
        loc = _data_loc(data, err["loc"], keep_last=kind == "missing")
        if kind == "extra_forbidden":
            fields = _fields_at(model, loc[:-1])
            near = difflib.get_close_matches(str(loc[-1]), missing.get(loc[:-1], []), n=1, cutoff=0.6)
            if near:
                explained_missing.add((*loc[:-1], near[0]))
                out.append((loc, f"unknown key (did you mean {near[0]!r}? it is required)"))
                continue
            msg = "unknown key" + suggest(str(loc[-1]), fields)
        elif kind == "missing":
            if loc in explained_missing:
                continue
            msg = "required key is missing"
        else:
            got = err.get("input")
            msg = _plain(err, "***" if _secret_path(loc) else got)
        if loc in seen and kind not in ("extra_forbidden", "missing"):
            continue  # a union reports once per member: the first is enough
        seen.add(loc)
        out.append((loc, msg))
    return [(p, m) for p, m in out if not (m == "required key is missing" and p in explained_missing)]


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


#: option names with "key" in them that hold no secret: a wrong value in them is shown, so it can be fixed
_NOT_SECRET = frozenset({"keywords", "max_state_keys", "dedupe_keys"})


def _secret_path(path: Path_) -> bool:
    return any(isinstance(p, str) and p not in _NOT_SECRET and ("key" in p or "secret" in p or "token" in p)
               for p in path)


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


def parse(data: Any, positions: Positions, filename: str, registry: Registry | None = None,
          placeholders: Sequence[str] = (), texts: Mapping[Path_, str] | None = None,
          typed: Mapping[Path_, Any] | None = None) -> PipelineConfig:
    """Validate already-loaded YAML data into a PipelineConfig; every error found is reported at once."""
    base = base_dir(Path(filename))
    chk = _Checker(filename, positions, registry or default_registry, search=(base, Path.cwd()),
                   placeholders=placeholders, texts=texts, typed=typed)
    if not isinstance(data, Mapping):
        raise chk.fail((), "expected a mapping with name, source, stages and sinks")
    if texts:  # `name: ${NAME}` with NAME=2024: the text, as for every string option
        data = {k: texts.get((k,), v) if k in ("name", "dead_letter", "state_dir") else v for k, v in data.items()}
    for key in data:
        if key not in TOP_KEYS:
            chk.add((key,), "unknown key" + suggest(key, TOP_KEYS))
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        chk.add(("name",), "expected a pipeline name (letters, digits, _.-, starting with a letter or digit), "
                f"got {name!r}")
        name = "pipeline"
    source = None
    if "source" not in data:
        chk.add((), "required key 'source' is missing")
    elif isinstance(data["source"], dict) and data["source"].get("enabled") is False:
        chk.add(("source", "enabled"), "the source cannot be disabled")
    else:
        source = chk.stage("source", data["source"], ("source",))
    sinks = data.get("sinks")
    if not isinstance(sinks, list) or not sinks:
        chk.add(("sinks",), "expected a non-empty list of sinks")
        sinks = []
    elif all(isinstance(s, dict) and s.get("enabled") is False for s in sinks):
        chk.add(("sinks",), "every sink is disabled (enabled: false)")
    stages = data.get("stages") or []
    if not isinstance(stages, list):
        chk.add(("stages",), "expected a list of processors")
        stages = []
    dead = data.get("dead_letter", f"out/{name}/dead-letter.jsonl")
    if not isinstance(dead, str) or not dead.strip():  # ('   ' made a file named by three spaces)
        chk.add(("dead_letter",), f"expected a file path, got {dead!r}")
        dead = f"out/{name}/dead-letter.jsonl"
    dead_max = _dead_letter_max(chk, data.get("dead_letter_max_bytes", DEFAULT_MAX_BYTES))
    state_dir = data.get("state_dir", f"out/{name}")
    if not isinstance(state_dir, str) or not state_dir.strip():
        chk.add(("state_dir",), f"expected a directory path, got {state_dir!r}")
        state_dir = f"out/{name}"
    extra = data.get("channels") or []
    if not isinstance(extra, list) or not all(isinstance(c, str) and c for c in extra):
        chk.add(("channels",), "expected a list of channel names that plugins emit")
        extra = []
    videodb = chk.model(VideoDBSettings, data.get("videodb"), ("videodb",))
    controller = (chk.stage("controller", data["controller"], ("controller",))
                  if data.get("controller") is not None else None)
    procs = [chk.stage("processor", s, ("stages", i)) for i, s in enumerate(stages)]
    outs = [chk.stage("sink", s, ("sinks", i)) for i, s in enumerate(sinks)]
    runtime = chk.model(RuntimeSettings, data.get("runtime"), ("runtime",))
    every = [s for s in (source, controller, *procs, *outs) if s is not None]
    check_channels(chk, data, every, extra)
    check_rule_names(chk, data)
    if runtime is not None:
        check_window_keys(chk, data, runtime.engine)
    for path in _huge_ints(data, ()):  # (unless the option's own check already refused the number)
        if not any(f": {path_str(path)}: " in e for e in chk.errors):
            chk.add(path, f"whole number out of range (at most {MAX_INT:,}): no option counts that far")
    chk.raise_errors()
    assert source is not None and videodb is not None and runtime is not None
    videodb = resolve_inputs(videodb, base)
    return PipelineConfig(
        name=name,
        file=Path(filename),
        videodb=videodb,
        source=_resolved(source, base),
        controller=controller if controller is not None and controller.enabled else None,
        stages=[_resolved(s, base) for s in procs if s is not None and s.enabled],
        sinks=[_resolved(s, base) for s in outs if s is not None and s.enabled],
        runtime=runtime,
        dead_letter=Path(dead),
        dead_letter_max_bytes=dead_max,
        state_dir_setting=Path(state_dir).expanduser(),
        disabled=[s for s in every if not s.enabled],
        channels=list(extra),
        key_where={path_str(path): f"{filename}:{line}:{col}" for path, (line, col) in positions.items()},
    )


def _dead_letter_max(chk: _Checker, value: Any) -> int:
    """`dead_letter_max_bytes` (a ByteSize) in bytes; an error is recorded and the default returned."""
    try:
        n = parse_bytes(value)
    except ValueError as exc:  # (`validate --offline` leaves an unset `${VAR}` in place: say that instead)
        chk.add(("dead_letter_max_bytes",), chk._offline(value) or str(exc))
        return DEFAULT_MAX_BYTES
    if n < MIN_MAX_BYTES:  # a few rejects (frames of up to 1 MiB) would fill a smaller one
        chk.add(("dead_letter_max_bytes",), f"expected at least {size_text(MIN_MAX_BYTES)}, got {value!r}")
        return DEFAULT_MAX_BYTES
    return n


#: whole numbers past this fit no option (counts, sizes, ports); they crashed C code (`islice`) at run time
MAX_INT = (1 << 63) - 1


def _huge_ints(data: Any, path: Path_) -> list[Path_]:
    """Key paths of whole numbers past MAX_INT (nesting is bounded by the YAML loader)."""
    if type(data) is int:
        return [path] if not -MAX_INT <= data <= MAX_INT else []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    return [p for k, v in items for p in _huge_ints(v, (*path, k))]


def _resolved(spec: StageSpec, base: Path) -> StageSpec:
    return dataclasses.replace(spec, options=resolve_inputs(spec.options, base))


def load_config(path: str | Path, env: Mapping[str, str] | None = None,
                registry: Registry | None = None, *, missing: list[str] | None = None) -> PipelineConfig:
    """Read, interpolate and validate a pipeline file. Raises ConfigError (one line per error).

    `missing`: a list to collect unset `${VAR}` names into (they become placeholders) instead of failing.
    """
    p = Path(path)
    text = read_text(p)
    texts: dict[Path_, str] = {}
    typed: dict[Path_, Any] = {}
    unset: list[str] = []
    unset_paths: set[str] = set()
    data, positions = load(text, str(p), env, missing=missing, texts=texts,
                           unset=None if missing is not None else unset, unset_paths=unset_paths, typed=typed)
    if not unset:
        cfg = parse(data, positions, str(p), registry, placeholders=missing or (), texts=texts, typed=typed)
        return dataclasses.replace(cfg, digest=hashlib.sha256(text.encode()).digest())
    names = _UNSET.findall("\n".join(unset))
    try:  # the rest of the file is checked too, the unset variables' `${VAR}`s in place: every error at once
        parse(data, positions, str(p), registry, placeholders=names, texts=texts, typed=typed)
        others: list[str] = []
    except ConfigError as exc:  # (an error about a value that still holds a `${VAR}` is that variable's)
        others = [line for line in str(exc).splitlines() if "${" not in line and "--offline placeholder" not in line
                  and "more errors" not in line and not _under(line, unset_paths)]
    errors = sorted(unset + others, key=_position_key)
    more = [f"{p}: ... and {len(errors) - MAX_ERRORS} more errors"] if len(errors) > MAX_ERRORS else []
    raise ConfigError("\n".join(errors[:MAX_ERRORS] + more))


_UNSET = re.compile(r"environment variable ([A-Za-z_][A-Za-z0-9_]*) is not set")


def _under(line: str, paths: set[str]) -> bool:
    """Whether an error line (`file:l:c: key.path: message`) is about one of `paths` or inside one."""
    key = line.split(": ", 2)[1] if line.count(": ") >= 2 else ""
    return any(key == p or key.startswith((p + ".", p + "[")) for p in paths)
