"""The argument parser every command uses: argparse's, except that help it cannot write is an error."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


class Parser(argparse.ArgumentParser):
    """argparse drops an OSError from writing `--help`, `--version` or a usage error (`> /dev/full`) without a
    word, so the command exited 0 (or 120 when the interpreter's last flush failed); here it is one line, exit 1."""

    def _print_message(self, message: str, file: Any = None) -> None:  # (a stream, or None: stderr)
        out = file or sys.stderr
        if not message or out is None:  # (stdout closed: argparse hands over None, and help goes to stderr)
            return
        try:
            out.write(message)
            out.flush()
        except BrokenPipeError:  # `pipeline --help | head -1`: the reader left; not an error
            drop_stdout()
        except OSError as exc:
            if out is not sys.stdout:  # a usage error on a full stderr: nowhere to say so; its exit code 2 stands
                return
            drop_stdout()
            print(f"pipeline: cannot write its output: {exc.strerror or exc}", file=sys.stderr)
            raise SystemExit(1) from None


def drop_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of what is left does not fail again."""
    if sys.stdout is None:
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
