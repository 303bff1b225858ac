"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


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
