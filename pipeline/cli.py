"""`pipeline` command line: run, validate, test, stages, schema, listen, emulate, worker, report.

User mistakes print one line (`pipeline: <file>:<line>:<col>: <key>: <what>`)
and exit non-zero; set PIPELINE_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipeline import secrets
from pipeline.argparsing import Parser, drop_stdout
from pipeline.errors import ConfigError, PipelineError, StageError


def _setup_logging(level: str, fmt: str = "text") -> None:
    from pipeline.logs import formatter

    if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"unknown log level {level!r} (expected debug, info, warning or error)")
    if fmt not in ("text", "json"):
        raise ConfigError(f"unknown log format {fmt!r} (expected text or json)")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet = logging.DEBUG if level.lower() == "debug" else logging.WARNING
    for noisy in ("websockets", "faust", "mode", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(quiet)
    # urllib3 warns of each retry of the VideoDB SDK's requests; the failed call itself is reported once
    logging.getLogger("urllib3").setLevel(logging.DEBUG if quiet == logging.DEBUG else logging.ERROR)
    # aiokafka logs an ERROR per reconnect attempt; our sink/source already say it once, clearly
    logging.getLogger("aiokafka").setLevel(logging.DEBUG if quiet == logging.DEBUG else logging.CRITICAL)


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.runtime import hup

    hup.hold()  # a SIGHUP (reload) that comes while starting must not end the run
    from pipeline.config import load_config

    cfg = load_config(args.config)
    from pipeline.validate import input_problems

    problems = input_problems(cfg)  # as `validate` does: a missing replay file is one line before anything starts
    if problems:
        raise ConfigError("\n".join(problems))
    if args.new_session:
        import dataclasses

        cfg = dataclasses.replace(cfg, new_session=True)
    from pipeline.runner import run_local

    if args.http:
        cfg = _with_http(cfg, args.http)
    if args.summary_json:
        from pipeline.summary import check_summary_path

        check_summary_path(args.summary_json)
    progress = not args.quiet and args.log_format == "text" and sys.stderr.isatty()
    rt = asyncio.run(run_local(cfg, watch=args.watch, progress=progress))
    if rt.error is not None:
        print(f"pipeline: {secrets.mask(str(rt.error))}", file=sys.stderr)
    if not args.quiet:
        _print_summary(rt, args.log_format)
    if args.summary_json:
        from pipeline.summary import write_summary

        write_summary(rt, args.summary_json)
    return rt.exit_code


def _print_summary(rt: Any, log_format: str) -> None:
    """The exit summary: text on stderr, or one JSON log record (`fields`) with --log-format json."""
    if log_format == "json":
        from pipeline.summary import summary_dict

        logging.getLogger("pipeline.summary").info("summary", extra={"fields": summary_dict(rt)})
    else:
        print(secrets.mask(rt.summary()), file=sys.stderr)


def _with_http(cfg: Any, address: str) -> Any:
    """`--http ADDR` overrides `runtime.http`."""
    import dataclasses

    from pipeline.http.address import parse_address

    try:
        parse_address(address)
    except ValueError as exc:
        raise ConfigError(f"--http: {exc}") from None
    return dataclasses.replace(cfg, runtime=cfg.runtime.model_copy(update={"http": address}), http_override=address)


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.validate import cmd_validate as validate

    return validate(args)


def _all_stage_classes() -> list[tuple[str, str, Any]]:
    from pipeline.registry import LookupFailed, default_registry

    out = []
    for kind in ("source", "processor", "sink", "controller"):
        for name in default_registry.names(kind):
            try:
                out.append((kind, name, default_registry.resolve(kind, name)))
            except LookupFailed:
                continue
    return out


def cmd_stages(args: argparse.Namespace) -> int:
    for kind, name, cls in _all_stage_classes():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{kind:<10} {name:<16} {doc}")
        if args.verbose:
            _print_fields(cls.Options, "    ")
    return 0


def _print_fields(model: Any, indent: str) -> None:
    """Options with defaults and descriptions; nested option models (rules, on_active…) indented."""
    from pipeline.config import inner_model

    for fname, f in model.model_fields.items():
        inner = inner_model(f.annotation)
        values = _literal_values(f.annotation)
        if f.is_required():
            default = "required"
        elif inner is not None:
            default = "(see below)"
        else:
            default = f"default {f.get_default(call_default_factory=True)!r}"
        desc = f.description or ""
        if values:
            desc = f"one of: {', '.join(values)}" + (f"; {desc}" if desc else "")
        print(f"{indent}{fname:<20} {default:<28} {desc}")
        if inner is not None:
            _print_fields(inner, indent + "  ")


def _literal_values(annotation: Any) -> list[str]:
    """`Literal["word", "substring"]` (also inside Optional) -> ["word", "substring"]; beside a `bool` in a union,
    `true` and `false` too (`bool | Literal["auto"]` was listed as "one of: auto")."""
    from typing import Literal, get_args, get_origin

    if get_origin(annotation) is Literal:
        return [str(a) for a in get_args(annotation)]
    for arg in get_args(annotation):
        found = _literal_values(arg)
        if found:
            return (["true", "false"] if bool in get_args(annotation) else []) + found
    return []


def cmd_schema(args: argparse.Namespace) -> int:
    from pipeline.schema import json_schema

    print(json.dumps(json_schema(_all_stage_classes()), indent=2))
    return 0


DELEGATED = {
    "listen": ("pipeline.listen:main", "drop-in for VideoDB's ws_listener.py"),
    "emulate": ("pipeline.emulator.cli:main", "run the local VideoDB-compatible emulator"),
    "worker": ("pipeline.runtime.faust:worker_main", "run a faust worker for a faust-engine config"),
    "tap": ("pipeline.ops.tap:main", "follow the events at one point of a running pipeline"),
    "top": ("pipeline.ops.top:main", "live table of a running pipeline's stages and sinks"),
    "report": ("pipeline.report.cli:main", "build an HTML page per capture session from JSONL output"),
}


def _run_delegated(command: str, argv: list[str]) -> int:
    """Commands with their own argument parsers get the rest of the command line untouched."""
    import importlib

    module, _, func = DELEGATED[command][0].partition(":")
    main: Callable[[list[str]], int] = getattr(importlib.import_module(module), func)
    return main(argv)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("videodb-pipeline")
    except PackageNotFoundError:
        return "unknown"


def parser() -> argparse.ArgumentParser:
    from pipeline.logs import log_options

    p = Parser(prog="pipeline", description="VideoDB capture-session event pipeline",
               epilog="PIPELINE_DEBUG=1 shows tracebacks instead of one-line errors")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    log_options(p, True)
    common = Parser(add_help=False)
    log_options(common, argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser("run", help="run a pipeline until its source ends, the session ends or a signal",
                       parents=[common])
    r.add_argument("config")
    r.add_argument("-q", "--quiet", action="store_true", help="no exit summary")
    r.add_argument("--watch", action="store_true",
                   help="reload the config when the file changes (SIGHUP always reloads)")
    r.add_argument("--new-session", action="store_true",
                   help="create a new capture session instead of resuming the one in state_dir")
    r.add_argument("--http", metavar="ADDR", help="serve metrics, health, tap and a status page at HOST:PORT "
                   "(overrides runtime.http; e.g. 127.0.0.1:9464)")
    r.add_argument("--summary-json", metavar="PATH", help="also write the exit summary as JSON to PATH")
    r.set_defaults(func=cmd_run)
    v = sub.add_parser("validate", help="check a config file, its files and (--check) its connections",
                       parents=[common])
    v.add_argument("config")
    v.add_argument("--offline", action="store_true",
                   help="accept unset ${VAR}s as placeholders (check a config without its secrets)")
    v.add_argument("--check", action="store_true",
                   help="also try every external connection (VideoDB, Kafka, webhooks) without changing anything")
    v.set_defaults(func=cmd_validate)
    s = sub.add_parser("stages", help="list stage types (-v: with options)", parents=[common])
    s.add_argument("-v", "--verbose", action="store_true")
    s.set_defaults(func=cmd_stages)
    sub.add_parser("schema", help="print a JSON Schema for config files", parents=[common]).set_defaults(
        func=cmd_schema)
    from pipeline.testing.command import add_parser as add_test

    add_test(sub, common)
    for name, (_, help_) in DELEGATED.items():
        sub.add_parser(name, help=help_ + f" (pipeline {name} --help)", add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = Parser(add_help=False)
    pre.add_argument("--log-level", default=os.environ.get("PIPELINE_LOG_LEVEL", "info"))
    pre.add_argument("--log-format", default=os.environ.get("PIPELINE_LOG_FORMAT", "text"))
    known, rest = pre.parse_known_args(argv)
    delegated = bool(rest) and rest[0] in DELEGATED
    args = known if delegated else parser().parse_args(argv)
    try:
        _setup_logging(args.log_level, args.log_format)
        if delegated:
            extra = (["--log-level", args.log_level, "--log-format", args.log_format]  # (taken by the pre-parser)
                     if rest[0] == "worker" else [])
            return _run_delegated(rest[0], rest[1:] + extra)
        if sys.stdout is None and args.command in ("schema", "stages"):  # their output is the point
            raise StageError("cannot write its output: stdout is closed")
        code = int(args.func(args))
        if sys.stdout is not None:  # None: started with stdout closed (`>&-`); print() wrote nothing
            sys.stdout.flush()  # inside the try: a closed pipe is handled below, not at interpreter exit
        return code
    except PipelineError as exc:
        if os.environ.get("PIPELINE_DEBUG"):
            raise
        for line in str(exc).splitlines() or [""]:
            print(f"pipeline: {secrets.mask(line)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `pipeline validate x | head -1`: the reader left; not an error of ours
        drop_stdout()
        return 0
    except OSError as exc:  # stdout on a full disk (`> /dev/full`), a terminal gone: one line, not a traceback
        if os.environ.get("PIPELINE_DEBUG"):
            raise
        drop_stdout()
        where = f"{exc.filename}: " if exc.filename else "cannot write its output: "
        print(f"pipeline: {secrets.mask(where + (exc.strerror or str(exc)))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
