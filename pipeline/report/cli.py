"""`pipeline report INPUT... [-o OUT] [--gap 30s]`."""

from __future__ import annotations

import argparse

from pipeline.argparsing import Parser
from pipeline.errors import ConfigError
from pipeline.logs import log_options
from pipeline.types import parse_duration


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="pipeline report",
        description="build one self-contained HTML page per capture session from the pipeline's JSONL output")
    p.add_argument("inputs", nargs="+", metavar="OUT_DIR_OR_FILES",
                   help="JSONL files, or directories searched for *.jsonl (dead-letter files skipped)")
    p.add_argument("-o", "--output", help="page to write (x.html; several sessions: x-<session>.html) or a "
                                          "directory (default: the input directory, else the current one)")
    p.add_argument("--gap", default="30s", help="report stretches this long without any event (default 30s)")
    log_options(p, True)
    return p


def main(argv: list[str]) -> int:
    from pipeline.report.build import build_reports

    args = _parser().parse_args(argv)
    try:
        gap = parse_duration(args.gap)
    except ValueError as exc:
        raise ConfigError(f"--gap: {exc}") from None
    for path in build_reports(args.inputs, args.output, max(1, int(gap * 1000))):
        print(path)
    return 0
