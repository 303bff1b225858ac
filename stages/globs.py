"""Glob lists (`display:*`, `mic:*`) compiled once into a single matcher."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable


def glob_matcher(patterns: Iterable[str] | None) -> Callable[[str], bool] | None:
    """One compiled regex for all globs (case-sensitive, like rtstream names); None = match all."""
    pats = list(patterns or [])
    if not pats:
        return None
    rx = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in pats))
    return lambda name: rx.match(name) is not None
