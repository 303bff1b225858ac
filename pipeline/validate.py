"""`pipeline validate`: is this config ready to run? Options, files, and (with --check) connections.

Prints the resolved stages (disabled ones marked), the `videodb:` block with secrets
masked, and checks that input files exist and output directories can be created.
`--offline` accepts unset `${VAR}`s as placeholders and says which.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
from pathlib import Path

from pipeline import secrets
from pipeline.config import PipelineConfig, StageSpec, VideoDBSettings, load_config
from pipeline.configfile import kind_of
from pipeline.errors import ConfigError
from pipeline.paths import file_options

_PLACEHOLDER = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}")


def creatable(path: Path) -> str | None:
    """None when `path`'s directory exists and is writable or could be created, with no symlink on the way
    (the run refuses one anywhere in a path it writes); else why not."""
    link = _symlink_in(path)
    if link is not None:
        return f"{link} is a symlink (-> {os.readlink(link)}); give the real path"
    d = path.parent if str(path.parent) else Path(".")
    while not d.exists():
        if d.parent == d:
            return f"no existing parent directory for {path}"
        d = d.parent
    if not d.is_dir():
        return f"{d} is not a directory"
    if not os.access(d, os.W_OK | os.X_OK):
        return f"directory {d} is not writable"
    return None


def _symlink_in(path: Path) -> Path | None:
    """The first existing component of `path` (as given: from / or the current directory) that is a symlink."""
    here = Path(path.anchor) if path.is_absolute() else Path()
    for part in path.parts[1 if path.is_absolute() else 0:]:
        here /= part
        try:
            if stat.S_ISLNK(os.lstat(here).st_mode):
                return here
        except OSError:  # it does not exist (yet): nothing further can be a link
            return None
    return None


def file_problems(cfg: PipelineConfig) -> list[str]:
    """Input files that do not exist and output files whose directory cannot be created."""
    return input_problems(cfg) + _output_problems(cfg)


def input_problems(cfg: PipelineConfig) -> list[str]:
    """Input files (a replay `path`, a `ca_file`...) that do not exist or are a directory, a device or a socket
    (`pipeline run` checks them too: a replay of /dev/zero read one endless line until memory ran out)."""
    problems: list[str] = []
    inputs = [(f"{cfg.file}", f"videodb.{k}", v) for k, v in file_options(cfg.videodb, "input")]
    for spec in _specs(cfg):
        inputs += [(spec.where, f"{spec.path}.{k}", v) for k, v in file_options(spec.options, "input")]
    for where, key, value in inputs:
        if _PLACEHOLDER.search(value):
            continue
        where = cfg.where(key, where)
        p = Path(value).expanduser()
        if not p.exists():
            problems.append(f"{where}: {key}: input file {value} does not exist")
        elif kind_of(p) is not None:  # a regular file or a named pipe (events written into it live) is fine
            problems.append(f"{where}: {key}: input file {value} is not a file ({kind_of(p)})")
    return problems


def _specs(cfg: PipelineConfig) -> list[StageSpec]:
    return [cfg.source, *([cfg.controller] if cfg.controller else []), *cfg.stages, *cfg.sinks]


def _output_problems(cfg: PipelineConfig) -> list[str]:
    problems: list[str] = []
    if getattr(cfg.source.cls, "resumes", True) and not _PLACEHOLDER.search(str(cfg.state_dir)):
        # the run creates and locks it (a replay leaves it alone)
        why = creatable(cfg.state_dir / "lock")
        if why:
            problems.append(f"{cfg.where('state_dir', str(cfg.file))}: state_dir: cannot use {cfg.state_dir}: {why}")
    outputs = [(f"{cfg.file}", "dead_letter", str(cfg.dead_letter))]
    for spec in _specs(cfg):
        outputs += [(spec.where, f"{spec.path}.{k}", v) for k, v in file_options(spec.options, "output")]
    for where, key, value in outputs:
        if _PLACEHOLDER.search(value):
            continue
        where = cfg.where(key, where)
        try:
            concrete = value.format(channel="channel", date="2000-01-01")
        except (KeyError, IndexError, ValueError):
            concrete = value
        why = creatable(Path(concrete).expanduser())
        if why:
            problems.append(f"{where}: {key}: cannot write {value}: {why}")
    return problems


def videodb_line(cfg: PipelineConfig, missing: list[str]) -> str:
    v = cfg.videodb
    key = v.api_key.get_secret_value() if v.api_key else None
    if key is None:
        shown = "(not set)"
    elif _PLACEHOLDER.fullmatch(key) and key[2:-1] in missing:
        shown = f"{key} (placeholder)"
    else:
        shown = "***"
    parts = [f"base_url={v.base_url or '(SDK default)'}", f"collection_id={v.collection_id}"]
    if v.emulator is not None:
        parts.append(f"emulator={json.dumps(v.emulator.model_dump(mode='json', exclude_defaults=True))}")
    return f"  videodb: api_key={shown} " + secrets.mask(" ".join(parts))


def _index(path: str) -> int:
    """`stages[10]` -> 10 (sorted as text, stages[10] came before stages[2])."""
    m = re.search(r"\[(\d+)\]", path)
    return int(m.group(1)) if m else -1


def cmd_validate(args: argparse.Namespace) -> int:
    missing: list[str] | None = [] if args.offline else None
    cfg = load_config(args.config, missing=missing)
    problems = file_problems(cfg)
    if problems:
        raise ConfigError("\n".join(problems))
    print(f"{args.config}: ok: pipeline {cfg.name!r}, engine {cfg.runtime.engine}")
    if missing:
        print(f"  offline: not set, checked as placeholders: {', '.join(missing)}")
    enabled_types = {s.type_name for s in [cfg.source, *([cfg.controller] if cfg.controller else [])]}
    if cfg.videodb != VideoDBSettings() or enabled_types & {"videodb", "capture_session"}:
        print(videodb_line(cfg, missing or []))
    enabled = [cfg.source, *([cfg.controller] if cfg.controller else []), *cfg.stages, *cfg.sinks]
    order = {"source": 0, "controller": 1, "processor": 2, "sink": 3}
    specs = sorted([*((s, True) for s in enabled), *((s, False) for s in cfg.disabled)],
                   key=lambda x: (order.get(x[0].kind, 9), _index(x[0].path)))
    for spec, on in specs:
        opts = spec.options.model_dump(mode="json", exclude_defaults=True)
        state = "" if on else "(disabled) "
        print(f"  {spec.label:<28} {state}{secrets.mask(json.dumps(opts, default=str))}")
    if getattr(args, "check", False):
        from pipeline.checks import run_checks

        return run_checks(cfg, missing)
    return 0
