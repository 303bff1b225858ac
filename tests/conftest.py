"""Shared fixtures: a stage Context wired to a temporary dead-letter file."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.api import Context, StateStore
from pipeline.deadletter import DeadLetter
from pipeline.session import SessionLink
from pipeline.stats import StageStats

# The test-suite plugin package (entry point `shout`) is visible to this test run only: its
# dist-info beside the package makes importlib.metadata find the entry point on sys.path.
PLUGIN_PKG = Path(__file__).resolve().parent / "plugin_pkg"
sys.path.insert(0, str(PLUGIN_PKG))


@pytest.fixture
def make_context(tmp_path: Path) -> Callable[..., Context]:
    """Build a Context for constructing one stage directly in a test."""

    def make(stage: str = "test", *, session: SessionLink | None = None,
             state: StateStore | None = None) -> Context:
        return Context(
            pipeline="test",
            stage=stage,
            dead_letter=DeadLetter(tmp_path / "dead-letter.jsonl"),
            session=session or SessionLink(),
            stats=StageStats(stage, "test"),
            state=state or StateStore(),
            out_dir=tmp_path,
            state_dir=tmp_path,
        )

    return make
