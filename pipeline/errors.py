"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations

from collections.abc import Iterable


class PipelineError(Exception):
    """A user-facing error: the message is the whole story, no traceback needed."""

    exit_code = 2


class ConfigError(PipelineError):
    """The configuration is invalid (message names file:line:col and key path)."""


class StageError(PipelineError):
    """A stage could not start or run (bad path, unreachable service...)."""

    exit_code = 1


class SinkFailed(StageError):
    """A sink failed and has itself dead-lettered everything it had accepted but not written."""


def suggest(word: str, choices: Iterable[str], *, shown: Iterable[str] | None = None, cutoff: float = 0.6) -> str:
    """The tail of an "unknown X" message: ` (did you mean 'y'?)` for a close choice, else
    `; expected one of: a, b` (`shown`, by default the choices), or "" when there is nothing to list.

    Why one helper: every "unknown" error reads the same, whichever part of the tool reports it.
    """
    import difflib

    options = list(choices)
    near = difflib.get_close_matches(word, options, n=1, cutoff=cutoff)
    if near:
        return f" (did you mean {near[0]!r}?)"
    listed = options if shown is None else list(shown)
    return f"; expected one of: {', '.join(listed)}" if listed else ""
