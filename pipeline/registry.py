"""Where stage types come from: built-ins, the `pipeline.stages` entry points, `module:Class`.

Built-ins are listed by import path so that nothing heavy (aiokafka, videodb)
is imported until a config actually uses it.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Final

from pydantic import BaseModel

from pipeline.api import Controller, Processor, Sink, Source, Stage
from pipeline.errors import ConfigError, suggest

KINDS: Final[dict[str, type[Stage]]] = {
    "source": Source, "processor": Processor, "sink": Sink, "controller": Controller,
}

BUILTINS: Final[dict[str, dict[str, str]]] = {
    "source": {
        "replay": "stages.sources.replay:ReplaySource",
        "websocket": "stages.sources.websocket:WebSocketSource",
        "videodb": "stages.sources.videodb:VideoDBSource",
        "kafka": "stages.sources.kafka:KafkaSource",
    },
    "processor": {
        "filter": "stages.processors.filter:Filter",
        "enrich": "stages.processors.enrich:Enrich",
        "rules": "stages.processors.rules:Rules",
        "window": "stages.processors.window:Window",
    },
    "sink": {
        "jsonl": "stages.sinks.jsonl:JsonlSink",
        "console": "stages.sinks.console:ConsoleSink",
        "kafka": "stages.sinks.kafka:KafkaSink",
        "alert_forwarder": "stages.sinks.alert_forwarder:AlertForwarder",
        "parquet": "stages.sinks.parquet:ParquetSink",
    },
    "controller": {
        "capture_session": "stages.controller.capture_session:CaptureSessionController",
    },
}

ENTRY_POINT_GROUP: Final = "pipeline.stages"


class LookupFailed(ConfigError):
    """A stage type could not be resolved; the message is user-facing (one line where it escapes, exit 2)."""


def _import(module_name: str, search: Sequence[Path]) -> ModuleType:
    """Import a module; when it is not found, retry with each `search` directory on sys.path."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = module_name.partition(".")[0]
        if exc.name != top or not search:
            raise
        for d in search:
            if (d / top).is_dir() or (d / f"{top}.py").is_file():
                sys.path.insert(0, str(d.resolve()))
                return importlib.import_module(module_name)
        raise


_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def import_path(path: str, search: Sequence[Path] = ()) -> type[Stage]:
    """Import `package.module:Class`; `search`: directories tried when the module is not importable.

    Whatever the module does while it is imported (raise, a syntax error, `sys.exit()`) is one LookupFailed.
    """
    module_name, _, attr = path.partition(":")
    if not _DOTTED.fullmatch(module_name) or not attr.isidentifier():
        raise LookupFailed(f"expected module:Class, such as my_plugins.mood:Mood, got {path!r}")
    try:
        module = _import(module_name, search)
    except ImportError as exc:
        where = " and ".join(dict.fromkeys(str(d.resolve()) for d in search)) or "sys.path"
        raise LookupFailed(f"cannot import module {module_name!r}: {exc} (searched {where}; put the module "
                           "beside the config, install its package, or set PYTHONPATH)") from None
    except SystemExit as exc:
        raise LookupFailed(f"importing module {module_name!r} called sys.exit({exc.code!r})") from None
    except Exception as exc:  # the plugin's own failure; PIPELINE_DEBUG=1 shows its traceback
        why = (str(exc).splitlines() or [""])[0][:300]
        raise LookupFailed(f"importing module {module_name!r} raised {type(exc).__name__}: {why}") from exc
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise LookupFailed(f"module {module_name!r} has no attribute {attr!r}") from None
    if not (isinstance(obj, type) and issubclass(obj, Stage)):
        raise LookupFailed(f"{path} is not a Source, Processor, Sink or Controller class")
    options = getattr(obj, "Options", None)
    if not (isinstance(options, type) and issubclass(options, BaseModel)):
        raise LookupFailed(f"{path}.Options is {options!r}, not an options class (subclass pipeline.api.Options)")
    return obj


class Registry:
    """Resolves `type:` names for one kind of stage. An object, so tests can build their own."""

    def __init__(self, builtins: dict[str, dict[str, str]] | None = None, *, use_entry_points: bool = True):
        self.builtins = {k: dict(v) for k, v in (BUILTINS if builtins is None else builtins).items()}
        self.use_entry_points = use_entry_points
        self._plugins: dict[str, str] | None = None

    def plugins(self) -> dict[str, str]:
        """Entry-point name -> `module:Class`; a name registered twice is an error naming both."""
        if self._plugins is None:
            found: dict[str, str] = {}
            if self.use_entry_points:
                for ep in entry_points(group=ENTRY_POINT_GROUP):
                    if ep.name in found and found[ep.name] != ep.value:
                        raise LookupFailed(
                            f"stage type {ep.name!r} is registered twice: {found[ep.name]} and {ep.value}")
                    found[ep.name] = ep.value
            self._plugins = found
        return self._plugins

    def names(self, kind: str) -> list[str]:
        return sorted(set(self.builtins.get(kind, {})) | set(self.plugins()))

    def resolve(self, kind: str, name: str, search: Sequence[Path] = ()) -> type[Stage]:
        """The class for a `type:` name; `module:Class` names are also looked for in `search` directories."""
        if ":" in name:
            cls = import_path(name, search)
        elif name in self.builtins.get(kind, {}):
            cls = import_path(self.builtins[kind][name])
        elif name in self.plugins():
            cls = import_path(self.plugins()[name])
        else:
            raise LookupFailed(f"unknown {kind} type {name!r}"
                               + suggest(name, self.names(kind), shown=self.builtins.get(kind, {})))
        if not issubclass(cls, KINDS[kind]):
            raise LookupFailed(f"{name!r} is a {cls.kind or 'stage'}, not a {kind}")
        return cls


default_registry = Registry()
